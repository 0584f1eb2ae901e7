"""The request loop: one connection in the transmission phase, network client or kernel alike.

Requests are received straight into a :class:`RequestBuffer` and handled in batches: every
whole request that has arrived is dealt with, then all replies that are ready go out in one
``sendmsg``. For an inline device (one that answers at once) the batch is answered on the
spot, with no task or thread per request; that is what lets a Python server keep up with a C
one. Other devices get a task per request, under a budget of bytes in flight, and reply as
they finish. Either way one coroutine, :meth:`Connection._execute`, holds the semantics of
every command.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from ._constants import (
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ExtentFlag,
)
from ._device import BytesLike, Device
from ._errors import ProtocolError, nbd_errno
from ._export import Export, drive
from ._handshake import BASE_ALLOCATION_ID
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
from ._writer import Finished, Writer

__all__ = ["Connection"]

log = logging.getLogger("usbd.core.engine")

#: Reads at least this long are split into data and hole chunks when the device has extents.
_SPARSE_READ_MIN = 64 * 1024
#: Non-blocking receives that may extend one batch before its replies are sent.
_MAX_EXTRA_READS = 4
# Commands and flags as plain ints: attribute access on an enum class and IntFlag operators
# each cost far more than the int operation they stand for, on every request.
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_FLUSH = int(Command.FLUSH)
_TRIM = int(Command.TRIM)
_CACHE = int(Command.CACHE)
_WRITE_ZEROES = int(Command.WRITE_ZEROES)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_ZERO_EXTENT = int(ExtentFlag.ZERO)
_WRITES = (_WRITE, _TRIM, _WRITE_ZEROES)
_COUNTED = 16
#: Receive buffers a connection may have at once while its writer thread still writes from
#: the payloads in them (the one being received into included).
_MAX_BUFFERS = 4


def _try_write(device: Device) -> Callable[[int, memoryview, bool], int]:
    """``try_write`` in the shape of ``write`` (the fast path never has FUA)."""
    attempt = device.try_write

    def write(offset: int, data: memoryview, fua: bool) -> int:
        return attempt(offset, data)

    return write


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
    ) -> None:
        self.transport = transport
        self.export = export
        self.session = session
        self.name = name
        self._initial = initial
        self._max_in_flight = max_in_flight
        self._out: list[BytesLike] = []
        self._sending = False
        self._in_flight = 0
        self._room = trio.Event()
        self._seq = 0
        self._writes: set[int] = set()  # sequence numbers of writes not yet finished
        self._write_done = trio.Event()
        self._dirty = False
        # The writer thread and what it holds: receive buffers it still writes from, each with
        # the sequence number of the last batch pointing into it; spare buffers to receive into.
        self._writer: Writer | None = None
        self._queued = 0  # batches queued to the writer and not yet finished
        self._written_upto = -1  # sequence number of the last batch it finished
        self._retired: list[tuple[int, bytearray]] = []
        self._spares: list[bytearray] = []
        self._buffers = 1
        self._buffer_free = trio.Event()
        self._wake = trio.Event()

    async def serve(self) -> None:
        """Run until the client disconnects or sends DISC; flush what it wrote; never raise
        for anything the peer did."""
        try:
            async with trio.open_nursery() as nursery:
                sender = trio.CancelScope()
                if self.export.can_try_write:  # only a writer thread leaves replies to send
                    nursery.start_soon(self._sender, sender)
                try:
                    await self._receive(nursery)
                    self._set_busy(False)
                    await self._barrier(self._seq)  # the writer's replies go out too
                finally:
                    sender.cancel()
            await self._send_pending()
        except* ProtocolError as group:
            log.warning("%s: closing: %s", self.name, group.exceptions[0])
        except* TransportClosed as group:
            log.info("%s: peer went away: %s", self.name, group.exceptions[0])
        finally:
            # Shut down, not only close: the kernel's NBD_DO_IT returns only on the shutdown.
            self.transport.shutdown()
            self.transport.close()
            if self._writer is not None:  # it writes what was queued before the flush below
                with trio.CancelScope(shield=True):
                    await self._writer.aclose()
                # Let the buffers go now, not when a garbage collection finds the cycle.
                self._writer = None
                self._spares.clear()
                self._retired.clear()
            if self._dirty and not self.export.closed:
                with trio.CancelScope(shield=True):
                    try:
                        await self.export.flush()
                    except Exception:
                        log.exception("%s: flush at disconnect failed", self.name)

    # -- receiving -------------------------------------------------------------------------

    async def _receive(self, nursery: trio.Nursery) -> None:
        export = self.export
        session = self.session
        buffer = RequestBuffer(session.max_payload)
        if self._initial:
            space = buffer.space()
            space[: len(self._initial)] = self._initial
            buffer.commit(len(self._initial))
        inline = export.inline
        simple = not session.structured_replies
        device = export.device
        size = session.size
        max_payload = session.max_payload
        # The longest READ the fast path answers (0: none). Structured reads qualify too,
        # unless they are long enough to be worth splitting into data and holes.
        # A blocking device that can try a READ or WRITE without blocking (a file whose data
        # is in the page cache) takes the same fast path; when a try fails, the request goes
        # on to a worker thread as usual.
        attempt_read = inline or export.can_try_read
        fast_read = max_payload if attempt_read and session.min_block == 1 else 0
        if not simple and export.sparse_reads:
            fast_read = min(fast_read, _SPARSE_READ_MIN - 1)
        read = device.read if inline else device.try_read
        write: Callable[[int, memoryview, bool], int | None] = (
            device.write if inline else _try_write(device)
        )
        data_header = OFFSET_DATA_HEADER.pack
        data_magic = STRUCTURED_REPLY_MAGIC
        data_done = REPLY_FLAG_DONE
        data_type = int(ChunkType.OFFSET_DATA)
        write_ok = (
            (inline and export.can_write) or export.can_try_write
        ) and session.min_block == 1
        out = self._out
        # Replies to oversized WRITEs wait until their payload has been drained: a client
        # (libnbd) that gets a reply while it is still sending the request drops the
        # connection ("no matching cookie").
        held: list[bytes] = []
        pack = SIMPLE_REPLY.pack
        magic = SIMPLE_REPLY_MAGIC
        extra = 0
        counts = export.counts
        # Plain WRITEs a try_write could not finish, queued together to the writer thread
        # before anything else is dispatched (a FLUSH waits for them). Their payloads stay in
        # the receive buffer, which is swapped for a spare before it would be overwritten.
        deferred: list[tuple[int, int, memoryview]] = []
        lent = -1  # sequence number of the last batch pointing into the buffer, or -1
        before_wait = self._before_wait if export.can_try_write else None
        while True:
            while (request := buffer.pop()) is not None:
                command, flags, cookie, offset, length, payload = request
                if command < _COUNTED:
                    counts[command] += 1
                # The fast path: plain inline READ and WRITE, checked in one comparison.
                if not flags and 0 < length <= max_payload and offset + length <= size:
                    if command == 0 and length <= fast_read:
                        try:
                            data = read(offset, length)
                            if data is not None and len(data) != length:
                                data = export.check_read(data, length)
                        except Exception as exc:
                            out.append(self._error(cookie, command, exc))
                            continue
                        if data is not None:
                            if simple:
                                out.append(pack(magic, 0, cookie))
                            else:
                                out.append(
                                    data_header(
                                        data_magic,
                                        data_done,
                                        data_type,
                                        cookie,
                                        length + 8,
                                        offset,
                                    )
                                )
                            out.append(data)
                            continue
                    elif command == 1 and write_ok and payload is not None:
                        self._dirty = True
                        if deferred or self._queued:  # after writes still to do: in order
                            deferred.append((cookie, offset, payload))
                            continue
                        try:
                            done = write(offset, payload, False)
                        except Exception as exc:
                            out.append(self._error(cookie, command, exc))
                            continue
                        if done is None or done == length or inline:  # inline: written
                            out.append(pack(magic, 0, cookie))
                        else:
                            deferred.append((cookie, offset + done, payload[done:]))
                        continue
                if deferred:
                    lent = self._queue_writes(deferred)
                if command == _DISC:
                    log.debug("%s: client sent DISC", self.name)
                    return
                error = check(session, command, flags, offset, length)
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
                    if buffer.discarding:
                        held.extend(reply)
                    else:
                        out.extend(reply)
                    continue
                if command in _WRITES:
                    self._dirty = True
                if inline:
                    out.extend(
                        drive(self._execute(command, flags, cookie, offset, length, payload))
                    )
                    continue
                cost = length if command in (_READ, _WRITE) else 0
                while self._in_flight and self._in_flight + cost > self._max_in_flight:
                    # A fresh event before sending: work that finishes during the send
                    # must find it, or the wait below would miss that wake-up for good.
                    self._room = trio.Event()
                    self._set_busy(False)  # a FLUSH task may be waiting for the writer's batches
                    self._collect()
                    await self._send_pending()
                    await self._room.wait()
                self._in_flight += cost
                if payload is not None:
                    payload = memoryview(bytes(payload))  # the buffer is reused
                seq = self._seq
                self._seq += 1
                if command in _WRITES:
                    self._writes.add(seq)
                nursery.start_soon(
                    self._task, seq, cost, command, flags, cookie, offset, length, payload
                )
            if deferred:
                lent = self._queue_writes(deferred)
            self._collect()
            if lent >= 0 and (
                lent <= self._written_upto
                or buffer.would_move(keep=True)
                # Between requests with half the buffer used: a fresh one costs no copy now,
                # where a long request straddling the end later would have to be moved.
                or (buffer.idle and buffer.room < len(buffer.storage) // 2)
            ):
                lent = await self._unlend(buffer, lent)
            if held and not buffer.discarding:
                out.extend(held)
                held.clear()
            if out and extra < _MAX_EXTRA_READS:
                # More requests may have arrived while these were answered: take them into
                # this batch, so that one send (and one wake-up of the client) covers more.
                more = self.transport.try_recv_into(buffer.space(keep=lent >= 0))
                if more:
                    buffer.commit(more)
                    extra += 1
                    continue
            extra = 0
            await self._send_pending()
            received = await self.transport.recv_into(buffer.space(keep=lent >= 0), before_wait)
            self._set_busy(True)
            if not received:
                if not buffer.idle:
                    log.info("%s: client disconnected in the middle of a request", self.name)
                return
            buffer.commit(received)

    async def _unlend(self, buffer: RequestBuffer, lent: int) -> int:
        """Once the writer is done with ``buffer`` (batch ``lent`` was the last to point into
        it), or before the buffer would move bytes it may still be writing from, in which
        case a spare takes its place: returns -1, "not lent"."""
        if lent > self._written_upto:  # else the writer is done with it: reuse it in place
            self._retired.append((lent, buffer.storage))
            buffer.swap(await self._spare_buffer(len(buffer.storage)))
        return -1

    def _set_busy(self, busy: bool) -> None:
        """Tell the writer whether the loop will look at its finished batches before it next
        waits (True) or must be woken for them (False)."""
        if self._writer is not None:
            self._writer.loop_busy = busy

    def _collect(self) -> bool:
        """Take in the batches the writer has finished; True if there were any."""
        writer = self._writer
        if writer is None or not writer.finished:
            return False
        finished = writer.finished
        self._written([finished.popleft() for _ in range(len(finished))])
        return True

    def _before_wait(self) -> None:
        """The loop is about to wait for the client: from now on the writer wakes it."""
        self._set_busy(False)
        self._poked()

    def _poked(self) -> None:
        """On the event loop, from the writer thread: batches finished while the loop waited."""
        if self._collect():
            self._wake.set()  # the sender sends their replies

    def _queue_writes(self, deferred: list[tuple[int, int, memoryview]]) -> int:
        """Hand the deferred batch to the writer thread; return its sequence number."""
        if self._writer is None:
            self._writer = Writer(self.export.device.write, self._poked, f"{self.name} writer")
        seq = self._seq
        self._seq += 1
        self._writes.add(seq)
        self._queued += 1
        self._writer.submit(seq, deferred[:])
        deferred.clear()
        return seq

    def _written(self, finished: list[Finished]) -> None:
        """On the event loop: the writer finished these batches; queue their replies."""
        out = self._out
        for seq, writes, results in finished:
            for (cookie, _, _), error in zip(writes, results, strict=True):
                out.append(
                    simple_reply(cookie) if error is None else self._error(cookie, _WRITE, error)
                )
            self._writes.discard(seq)
        self._queued -= len(finished)
        last = self._written_upto = finished[-1][0]
        while self._retired and self._retired[0][0] <= last:
            self._spares.append(self._retired.pop(0)[1])
        self._write_done.set()
        self._buffer_free.set()

    async def _spare_buffer(self, size: int) -> bytearray:
        """A buffer to receive into that nothing points into, waiting for one if the writer
        holds them all."""
        while not self._spares:
            if self._buffers < _MAX_BUFFERS:
                self._buffers += 1
                return bytearray(size)
            self._buffer_free = trio.Event()
            self._set_busy(False)  # the loop waits for the writer: it must be woken
            if self._collect():
                continue
            await self._send_pending()
            await self._buffer_free.wait()
        return self._spares.pop()

    async def _sender(self, scope: trio.CancelScope) -> None:
        """Send the replies the writer thread's batches leave, whatever the loop is doing."""
        with scope:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._send_pending()

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
        try:
            if command == _FLUSH:
                await self._barrier(seq)
            chunks = await self._execute(command, flags, cookie, offset, length, payload)
        finally:
            self._in_flight -= cost
            self._room.set()
            if seq in self._writes:
                self._writes.discard(seq)
                self._write_done.set()
        self._out.extend(chunks)
        await self._send_pending()

    async def _barrier(self, seq: int) -> None:
        """Wait until every write received before request ``seq`` has finished."""
        while min(self._writes, default=math.inf) < seq:
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
        fua = bool(flags & _FUA)
        try:
            if command == _READ:
                return await self._read(cookie, offset, length, flags)
            if command == _WRITE:
                assert payload is not None
                await export.write(offset, payload, fua)
            elif command == _FLUSH:
                await export.flush()
            elif command == _TRIM:
                await export.trim(offset, length, fua)
            elif command == _WRITE_ZEROES:
                await export.zero(
                    offset,
                    length,
                    may_trim=not flags & _NO_HOLE,
                    fua=fua,
                    fast=bool(flags & _FAST_ZERO),
                )
            elif command == _CACHE:
                await export.cache(offset, length)
            elif command == _BLOCK_STATUS:
                runs = await export.extents(offset, length)
                if flags & _REQ_ONE:
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
        if export.sparse_reads and length >= _SPARSE_READ_MIN and not flags & _DF:
            runs = await export.extents(offset, length)
        chunks: list[BytesLike] = []
        pos = offset
        end = offset + length
        for run_length, run_flags in runs:
            run = min(run_length, end - pos)
            done = pos + run >= end
            if run_flags & _ZERO_EXTENT:  # reads as zeros: say so instead of reading
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
        if self.session.structured_replies and command in (_READ, _BLOCK_STATUS):
            return [structured_error_reply(cookie, int(error), message)]
        return [simple_reply(cookie, int(error))]

    # -- sending ---------------------------------------------------------------------------

    async def _send_pending(self) -> None:
        """Send every queued reply; whoever is already sending picks up what others queue."""
        if self._sending:
            return
        self._sending = True
        try:
            while self._out:
                chunks = self._out[:]
                self._out.clear()
                await self.transport.send(chunks)
        finally:
            self._sending = False
