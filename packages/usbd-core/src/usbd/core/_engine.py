"""The request loop: one connection in the transmission phase, network client or kernel alike.

Requests are received straight into a :class:`RequestBuffer` and handled in batches: every
whole request that has arrived is dealt with, then all replies that are ready go out in one
``sendmsg``. A plain READ or WRITE takes the fast path the :class:`Export` resolved for the
device (:attr:`Export.fast`): for an inline device (one that answers at once) that is the
device's own ``read`` and ``write``, called on the spot with no task or thread per request,
which is what lets a Python server keep up with a C one; for a blocking device it may be a
``try_read``/``try_write`` attempt, the rest of a write going to the connection's
:class:`WriteBehind`. Every other request takes the general path: checked, then driven at
once (inline devices) or given a task under a budget of bytes in flight. Either way one
coroutine, :meth:`Connection._execute`, holds the semantics of every command.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import trio

from ._constants import (
    CHUNK_OFFSET_DATA,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_COUNT,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    CMD_WRITES,
    EXTENT_ZERO,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Errno,
)
from ._device import BytesLike
from ._errors import ProtocolError, nbd_errno
from ._execution import check_written
from ._export import Export, drive
from ._handshake import BASE_ALLOCATION_ID
from ._peerlog import PeerLog
from ._stats import SAMPLE_EVERY
from ._transmission import (
    OFFSET_DATA_HEADER,
    SIMPLE_REPLY,
    RequestBuffer,
    Session,
    block_status_reply,
    check,
    simple_reply,
    structured_data_header,
    structured_error_reply,
    structured_hole_reply,
)
from ._transport import SocketTransport, TransportClosed
from ._writer import WriteBehind

__all__ = ["Connection"]

log = logging.getLogger("usbd.core.engine")

#: Reads at least this long are split into data and hole chunks when the device has extents.
_SPARSE_READ_MIN = 64 * 1024
#: Non-blocking receives that may extend one batch before its replies are sent.
_MAX_EXTRA_READS = 4


class Connection:
    """Serve one connection whose handshake is over (or that never had one: the kernel).

    The connection owns its transport and closes it when :meth:`serve` returns.
    """

    def __init__(
        self,
        transport: SocketTransport,
        export: Export,
        session: Session,
        *,
        initial: bytes = b"",
        max_in_flight: int = 64 * 1024 * 1024,
        name: str = "connection",
        idle_timeout: float = 0.0,
        peer_log: PeerLog | None = None,
    ) -> None:
        self.transport = transport
        self.export = export
        self.session = session
        self.name = name
        self._stats = export.stats
        self._buffer = RequestBuffer(session.max_payload)
        if initial:
            self._buffer.space()[: len(initial)] = initial
            self._buffer.commit(len(initial))
        self._max_in_flight = max_in_flight
        # A network client's (the kernel's connections have neither): see _receive_unless_idle.
        self._idle_timeout = idle_timeout
        self._peer_log = peer_log
        self._tasks = 0  # requests given a task and not finished
        self._out: list[BytesLike] = []  # replies ready to send
        # Replies to oversized WRITEs wait until their payload has been drained: a client
        # (libnbd) that gets a reply while it is still sending the request drops the
        # connection ("no matching cookie").
        self._held: list[bytes] = []
        self._extra = 0  # non-blocking receives taken into the current batch
        self._sending = False
        # Bytes of replies queued behind a send in progress: they count against
        # max_in_flight as the work in flight does (see _dispatch).
        self._queued = 0
        self._in_flight = 0
        self._room = trio.Event()
        self._seq = 0  # every request given a task, and every batch of deferred writes
        self._writes: set[int] = set()  # sequence numbers of writes in tasks not finished
        self._write_done = trio.Event()
        self._dirty = False
        self._behind: WriteBehind | None = None
        self._before_wait: Callable[[], None] | None = None  # behind.pause, bound once

    async def serve(self) -> None:
        """Run until the client disconnects or sends DISC; flush what it wrote; never raise
        for anything the peer or the device did."""
        self.export.connections.add(self)
        self._stats.connections_total += 1
        try:
            async with trio.open_nursery() as nursery:
                if self.export.fast.write_behind:
                    self._behind = behind = WriteBehind(
                        self.export.device.write,
                        self._buffer,
                        out=self._out,
                        error_reply=self._write_error,
                        send=self._send_pending,
                        written=self._writes_done,
                        name=f"{self.name} writer",
                        observe=self._stats.observe,
                    )
                    self._before_wait = behind.pause
                    nursery.start_soon(behind.run_sender)
                await self._receive(nursery)
                if self._behind is not None:  # its last replies go out too
                    await self._behind.drain()
            await self._send_pending()  # the last tasks' replies
        except* ProtocolError as group:
            self._peer_event("protocol errors", logging.WARNING, "closing: %s", group.exceptions[0])
        except* TransportClosed as group:
            self._peer_event(
                "connections lost", logging.INFO, "peer went away: %s", group.exceptions[0]
            )
        except* Exception as group:  # a bug, ours or a device's: it costs this connection only
            log.error("%s: closing on an unexpected error", self.name, exc_info=group)  # noqa: TRY400
        finally:
            self.export.connections.discard(self)
            await self._close()

    @property
    def in_flight(self) -> int:
        """Requests taken and not answered yet: in tasks, or writes left to the writer."""
        return self._tasks + (self._behind.pending if self._behind is not None else 0)

    def _peer_event(self, kind: str, level: int, message: str, *args: object) -> None:
        """What the peer did, rate-limited for a network client (:class:`PeerLog`)."""
        if self._peer_log is None:
            log.log(level, "%s: " + message, self.name, *args)
        else:
            self._peer_log.event(kind, level, "%s: " + message, self.name, *args)

    async def _close(self) -> None:
        # Shut down, not only close: the kernel's NBD_DO_IT returns only on the shutdown.
        self.transport.shutdown()
        self.transport.close()
        with trio.CancelScope(shield=True):
            if self._behind is not None:  # it writes what it holds before the flush below
                await self._behind.aclose(self._next_seq())
                # It and the connection refer to each other: let the buffers go now, not
                # when a garbage collection finds the cycle.
                self._behind = self._before_wait = None
            if self._dirty and not self.export.closed:
                try:
                    await self.export.flush()
                except OSError as exc:  # the device's own answer (EIO, ...): no traceback
                    log.error("%s: flush at disconnect failed: %s", self.name, exc)  # noqa: TRY400
                except Exception:
                    log.exception("%s: flush at disconnect failed", self.name)

    # -- receiving -------------------------------------------------------------------------

    async def _receive(self, nursery: trio.Nursery) -> None:
        """The request loop: the fast path written out here, everything else in calls."""
        export, session, buffer, out = self.export, self.session, self._buffer, self._out
        counts, check_read, behind = export.counts, export.check_read, self._behind
        # Figures (usbd.core._stats): a count and bytes per request, one request in
        # SAMPLE_EVERY timed.
        nbytes, observe, clock = export.stats.bytes, export.stats.observe, time.perf_counter
        tick = SAMPLE_EVERY
        size, max_payload = session.size, session.max_payload
        read, fast_read, write = export.fast.read, export.fast.read_max, export.fast.write
        simple = not session.structured_replies
        if not simple and export.sparse_reads:  # long reads are worth splitting into holes
            fast_read = min(fast_read, _SPARSE_READ_MIN - 1)
        pack, data_header = SIMPLE_REPLY.pack, OFFSET_DATA_HEADER.pack
        max_queued = self._max_in_flight
        while True:
            while (request := buffer.pop()) is not None:
                command, flags, cookie, offset, length, payload = request
                if command < CMD_COUNT:
                    counts[command] += 1
                # The fast path: plain READ and WRITE in range, checked in one comparison.
                plain = not flags and 0 < length <= max_payload and offset + length <= size
                if plain:
                    # Bytes are counted for requests in range only (see _dispatch).
                    if command < CMD_COUNT:
                        nbytes[command] += length
                    if command == CMD_READ and length <= fast_read:
                        try:
                            tick -= 1
                            if tick:
                                data = read(offset, length)  # type: ignore[misc]
                            else:
                                tick = SAMPLE_EVERY
                                start = clock()
                                data = read(offset, length)  # type: ignore[misc]
                                if data is not None:
                                    observe(CMD_READ, clock() - start, SAMPLE_EVERY)
                            # Only a contiguous run of exactly ``length`` bytes may be sent.
                            if data is not None and (
                                len(data) != length
                                or (
                                    data.__class__ is not bytes
                                    and data.__class__ is not bytearray
                                    and (
                                        not isinstance(data, memoryview)
                                        or data.nbytes != length
                                        or not data.c_contiguous
                                    )
                                )
                            ):
                                data = check_read(data, length)
                        except Exception as exc:
                            out.append(self._error(cookie, command, exc))
                            continue
                        if data is not None:
                            out.append(
                                pack(SIMPLE_REPLY_MAGIC, 0, cookie)
                                if simple
                                else data_header(
                                    STRUCTURED_REPLY_MAGIC,
                                    REPLY_FLAG_DONE,
                                    CHUNK_OFFSET_DATA,
                                    cookie,
                                    length + 8,
                                    offset,
                                )
                            )
                            out.append(data)
                            self._queued += length
                            if self._queued > max_queued:  # a batch of reads holds no more
                                await self._drain_replies()
                            continue
                    elif command == CMD_WRITE and write is not None and payload is not None:
                        self._dirty = True
                        if behind is not None and behind.active:  # after earlier ones, in order
                            behind.defer(cookie, offset, payload)
                            continue
                        try:
                            tick -= 1
                            if tick:
                                done = write(offset, payload, False)
                            else:
                                tick = SAMPLE_EVERY
                                start = clock()
                                done = write(offset, payload, False)
                                if behind is None or done == length:  # timed only if done
                                    observe(CMD_WRITE, clock() - start, SAMPLE_EVERY)
                            if behind is not None and done != length:  # the rest goes behind
                                # 0, the usual miss, needs no checking
                                done = check_written(done, length) if done else 0
                                behind.defer(cookie, offset + done, payload[done:])
                                continue
                        except Exception as exc:
                            out.append(self._error(cookie, command, exc))
                            continue
                        out.append(pack(SIMPLE_REPLY_MAGIC, 0, cookie))
                        continue
                if not await self._dispatch(nursery, *request[:5], payload, plain):
                    return
            if not await self._end_of_batch():
                return

    async def _dispatch(
        self,
        nursery: trio.Nursery,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: memoryview | None,
        counted: bool,
    ) -> bool:
        """The general path, for every request the fast path did not take; False on DISC.
        ``counted``: _receive has counted the request's bytes (it was plain and in range)."""
        behind = self._behind
        if behind is not None and behind.deferred:  # they come first (a FLUSH waits for them)
            behind.submit(self._next_seq())
        if command == CMD_DISC:
            log.debug("%s: client sent DISC", self.name)
            return False
        error = check(self.session, command, flags, offset, length)
        # The bytes of a request: counted by _receive for a plain one in range, here for the
        # others. A refused request's do not count: a client sending reads of gigabytes past
        # the end moved nothing.
        if command < CMD_COUNT and counted != (error is None):
            self._stats.bytes[command] += length if error is None else -length
        if error is not None:
            log.debug(
                "%s: refused command %d flags %#x offset %d length %d: %s",
                self.name,
                command,
                flags,
                offset,
                length,
                error.name,
            )
            reply = self._error_reply(cookie, command, error, "request refused")
            (self._held if self._buffer.discarding else self._out).extend(reply)
            return True
        if command in CMD_WRITES:
            self._dirty = True
        if self.export.inline:
            start = time.perf_counter()
            self._out.extend(drive(self._execute(command, flags, cookie, offset, length, payload)))
            self._stats.observe(command, time.perf_counter() - start)
            return True
        cost = length if command in (CMD_READ, CMD_WRITE) else 0
        # Replies waiting for a peer that does not read count too (as in _receive's fast
        # path): without them, a client sending READs it never reads made a file-backed
        # server hold every reply (400 MiB for one connection, gigabytes under
        # fuzz/netfuzz.py).
        while (
            self._in_flight and self._in_flight + cost > self._max_in_flight
        ) or self._queued > self._max_in_flight:
            # A fresh event before sending: work that finishes during the send must find it,
            # or the wait below would miss that wake-up for good.
            self._room = trio.Event()
            if behind is not None:  # a FLUSH task may be waiting for the writer's batches
                behind.pause()
            await self._send_pending()
            await self._room.wait()
            if behind is not None:
                behind.resume()
        self._in_flight += cost
        if payload is not None:
            payload = memoryview(bytes(payload))  # the buffer is reused
        seq = self._next_seq()
        if command in CMD_WRITES:
            self._writes.add(seq)
        self._tasks += 1
        nursery.start_soon(self._task, seq, cost, command, flags, cookie, offset, length, payload)
        return True

    async def _end_of_batch(self) -> bool:
        """Between batches: hand deferred writes over, send the replies, receive more.
        False at the end of the stream."""
        buffer, out, behind, transport = self._buffer, self._out, self._behind, self.transport
        if behind is not None:
            if behind.deferred:
                behind.submit(self._next_seq())
            behind.collect()
            await behind.make_room()
        if self._held and not buffer.discarding:
            out.extend(self._held)
            self._held.clear()
        if out and self._extra < _MAX_EXTRA_READS:
            # More requests may have arrived while these were answered: take them into this
            # batch, so that one send (and one wake-up of the client) covers more.
            more = transport.try_recv_into(buffer.space())
            if more:
                buffer.commit(more)
                self._extra += 1
                return True
        self._extra = 0
        await self._send_pending()
        if self._idle_timeout:
            received = await self._receive_unless_idle()
        else:
            received = await transport.recv_into(buffer.space(), self._before_wait)
        if behind is not None:
            behind.resume()
        if received is None:
            return False
        if not received:
            if not buffer.idle:
                self._peer_event(
                    "connections lost",
                    logging.INFO,
                    "client disconnected in the middle of a request",
                )
            return False
        buffer.commit(received)
        return True

    async def _receive_unless_idle(self) -> int | None:
        """Receive as :meth:`_end_of_batch` does; None once the connection has been idle
        for ``idle_timeout``: nothing received and nothing in flight (no task, no write
        behind, no reply unsent), so that closing it loses nothing. A client waiting for a
        slow request is not idle; a partial request that stalls is (it was never answered)."""
        behind = self._behind
        while True:
            with trio.move_on_after(self._idle_timeout):
                return await self.transport.recv_into(self._buffer.space(), self._before_wait)
            # _tasks and _out drop before a reply has gone out: _sending covers the send.
            if self._tasks or self._out or self._sending or (behind is not None and behind.active):
                continue
            self._peer_event(
                "idle connections closed",
                logging.INFO,
                "no request for %s s: closing (--idle-timeout)",
                self._idle_timeout,
            )
            return None

    def _writes_done(self) -> None:
        """Writes finished: FLUSHes waiting in :meth:`_barrier` look again."""
        self._write_done.set()  # the current event: _barrier replaces it

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _write_error(self, cookie: int, error: Exception) -> bytes:
        return self._error(cookie, CMD_WRITE, error)

    async def _task(
        self,
        seq: int,
        cost: int,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: memoryview | None,
    ) -> None:
        start = time.perf_counter()
        try:
            if command == CMD_FLUSH:
                await self._barrier(seq)
            chunks = await self._execute(command, flags, cookie, offset, length, payload)
            self._stats.observe(command, time.perf_counter() - start)
        finally:
            self._tasks -= 1
            self._in_flight -= cost
            self._room.set()
            if seq in self._writes:
                self._writes.discard(seq)
                self._write_done.set()
        self._out.extend(chunks)
        self._queued += sum(map(len, chunks))
        await self._send_pending()

    async def _barrier(self, seq: int) -> None:
        """Wait until every write received before request ``seq`` has finished."""
        behind = self._behind
        while min(self._writes, default=math.inf) < seq or (
            behind is not None and behind.unfinished_before(seq)
        ):
            # Several flushes may wait at once: share the pending event, never replace it
            # (a replaced event would never be set and its waiter would hang).
            if self._write_done.is_set():
                self._write_done = trio.Event()
            await self._write_done.wait()

    # -- executing -------------------------------------------------------------------------

    async def _execute(
        self,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: memoryview | None,
    ) -> list[BytesLike]:
        """Carry out a checked request; return the reply chunks (errors included)."""
        export = self.export
        fua = bool(flags & FLAG_FUA)
        try:
            if command == CMD_READ:
                return await self._read(cookie, offset, length, flags)
            if command == CMD_WRITE:
                assert payload is not None
                await export.write(offset, payload, fua)
            elif command == CMD_FLUSH:
                await export.flush()
            elif command == CMD_TRIM:
                await export.trim(offset, length, fua)
            elif command == CMD_WRITE_ZEROES:
                await export.zero(
                    offset,
                    length,
                    may_trim=not flags & FLAG_NO_HOLE,
                    fua=fua,
                    fast=bool(flags & FLAG_FAST_ZERO),
                )
            elif command == CMD_CACHE:
                await export.cache(offset, length)
            elif command == CMD_BLOCK_STATUS:
                runs = await export.extents(offset, length)
                if flags & FLAG_REQ_ONE:
                    runs = runs[:1]
                return [block_status_reply(cookie, BASE_ALLOCATION_ID, runs)]
            else:  # pragma: no cover - check() lets nothing else through
                raise AssertionError(command)
        except Exception as exc:
            return [self._error(cookie, command, exc)]
        return [simple_reply(cookie)]

    async def _read(self, cookie: int, offset: int, length: int, flags: int) -> list[BytesLike]:
        export = self.export
        if not self.session.structured_replies:
            return [simple_reply(cookie), await export.read(offset, length)]
        runs = [(length, 0)]
        if export.sparse_reads and length >= _SPARSE_READ_MIN and not flags & FLAG_DF:
            runs = await export.extents(offset, length)
        chunks: list[BytesLike] = []
        pos = offset
        end = offset + length
        for run_length, run_flags in runs:
            run = min(run_length, end - pos)
            done = pos + run >= end
            if run_flags & EXTENT_ZERO:  # reads as zeros: say so instead of reading
                chunks.append(structured_hole_reply(cookie, pos, run, done))
            else:
                data = await export.read(pos, run)
                chunks += [structured_data_header(cookie, pos, run, done), data]
            pos += run
            if pos >= end:
                break
        if pos < end:  # the device described less than asked: read the rest as data
            data = await export.read(pos, end - pos)
            chunks += [structured_data_header(cookie, pos, end - pos, True), data]
        return chunks

    def _error(self, cookie: int, command: int, exc: Exception) -> bytes:
        error = nbd_errno(exc)
        if isinstance(exc, OSError):
            log.debug("%s: command %d failed: %s", self.name, command, exc)
        else:
            log.error("%s: command %d failed", self.name, command, exc_info=exc)
        return b"".join(self._error_reply(cookie, command, error, str(exc)))

    def _error_reply(self, cookie: int, command: int, error: Errno, message: str) -> list[bytes]:
        # A structured client must get READ and BLOCK_STATUS errors as error chunks; a simple
        # reply never carries a payload after an error (the original project's desync bug).
        self._stats.error(int(error))
        if self.session.structured_replies and command in (CMD_READ, CMD_BLOCK_STATUS):
            return [structured_error_reply(cookie, int(error), message)]
        return [simple_reply(cookie, int(error))]

    # -- sending ---------------------------------------------------------------------------

    async def _drain_replies(self) -> None:
        """Send everything queued, waiting for a send in progress elsewhere to finish: the
        bound on :attr:`_queued` (replies held for a peer that may not be reading)."""
        behind = self._behind
        await self._send_pending()
        while self._sending or self._out:
            self._room = trio.Event()  # set after every round a sender sends
            if behind is not None:
                behind.pause()
            await self._room.wait()
            if behind is not None:
                behind.resume()
            await self._send_pending()

    async def _send_pending(self) -> None:
        """Send every queued reply; whoever is already sending picks up what others queue."""
        if self._sending:
            return
        self._sending = True
        try:
            while self._out:
                chunks = self._out[:]
                self._out.clear()
                self._queued = 0
                await self.transport.send(chunks)
                self._room.set()  # _dispatch may wait for queued replies to go out
        finally:
            self._sending = False
