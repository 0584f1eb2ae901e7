"""The transmission phase of NBD, without any I/O: request decoding, checks and reply encoding.

:class:`RequestBuffer` is the receive side. The caller receives straight into
:meth:`RequestBuffer.space` (no per-request allocation) and then pops whole requests; a WRITE
comes with its payload as a view into the buffer, valid until the next call to ``space``.
:func:`check` decides, from what was negotiated, whether a request may reach the device and
which NBD error answers it otherwise. The ``*_reply`` functions encode replies.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ._constants import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    CMD_WRITES,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAGS_ALL,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TF_READ_ONLY,
    TF_SEND_FAST_ZERO,
    TF_SEND_FUA,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    TransmissionFlag,
)
from ._errors import ProtocolError, wire_message

__all__ = [
    "REQUEST_HEADER",
    "RequestBuffer",
    "Session",
    "block_status_reply",
    "check",
    "new_storage",
    "simple_reply",
    "structured_data_header",
    "structured_error_reply",
    "structured_hole_reply",
]

REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
STRUCTURED_HEADER: Final = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER: Final = struct.Struct(">IHHQIQ")

#: A decoded request: (command, flags, cookie, offset, length, payload or None).
Request = tuple[int, int, int, int, int, memoryview | None]

# Plain ints throughout (the wire table in _constants): every IntFlag operator goes through
# enum machinery (about a microsecond each), and check() runs for every request that misses the
# fast path.
_NEEDS: Final = {
    int(Command.FLUSH): int(TransmissionFlag.SEND_FLUSH),
    int(Command.TRIM): int(TransmissionFlag.SEND_TRIM),
    int(Command.WRITE_ZEROES): int(TransmissionFlag.SEND_WRITE_ZEROES),
    int(Command.CACHE): int(TransmissionFlag.SEND_CACHE),
}
# The only command each command-specific flag may accompany (FUA goes with any command).
_FLAG_OWNER: Final = tuple(
    (int(flag), int(command))
    for flag, command in (
        (CommandFlag.NO_HOLE, Command.WRITE_ZEROES),
        (CommandFlag.FAST_ZERO, Command.WRITE_ZEROES),
        (CommandFlag.DF, Command.READ),
        (CommandFlag.REQ_ONE, Command.BLOCK_STATUS),
    )
)


@dataclass(frozen=True, slots=True)
class Session:
    """What the engine must know about a connection to judge its requests."""

    size: int
    flags: TransmissionFlag
    structured_replies: bool = False
    base_allocation: bool = False
    min_block: int = 1
    max_payload: int = 32 * 1024 * 1024
    #: ``flags`` as a plain int, for cheap tests on the request path.
    raw_flags: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_flags", int(self.flags))


def check(session: Session, command: int, flags: int, offset: int, length: int) -> Errno | None:
    """The error a request must be answered with, or None when the device may serve it.

    The order matters only for which error a request with several faults gets; it follows
    the specification's advice (and nbdkit): permission, then range, then flags.
    """
    advertised = session.raw_flags
    if command in CMD_WRITES and advertised & TF_READ_ONLY:
        return Errno.EPERM
    if command == CMD_FLUSH:
        if offset or length:
            return Errno.EINVAL
    elif CMD_READ <= command <= CMD_BLOCK_STATUS and command != CMD_DISC:
        if length == 0 or offset + length > session.size:
            if command in (CMD_WRITE, CMD_WRITE_ZEROES):
                return Errno.ENOSPC
            return Errno.EINVAL
        if session.min_block > 1 and (offset | length) % session.min_block:
            return Errno.EINVAL
    else:
        return Errno.EINVAL
    if flags:
        if flags & ~FLAGS_ALL:
            return Errno.EINVAL
        for flag, owner in _FLAG_OWNER:
            if flags & flag and command != owner:
                return Errno.EINVAL
        if flags & FLAG_FUA and not advertised & TF_SEND_FUA:
            return Errno.EINVAL
        if flags & FLAG_DF and not session.structured_replies:
            return Errno.EINVAL
        if flags & FLAG_FAST_ZERO and not advertised & TF_SEND_FAST_ZERO:
            return Errno.EINVAL
    if command <= CMD_WRITE and length > session.max_payload:
        return Errno.EINVAL
    needed = _NEEDS.get(command)
    if needed is not None and not advertised & needed:
        return Errno.EINVAL
    if command == CMD_BLOCK_STATUS and not session.base_allocation:
        return Errno.EINVAL
    return None


def new_storage(size: int) -> mmap.mmap:
    """Zeroed memory to receive into that takes none until it is written: an anonymous
    mapping, whose pages the kernel provides as they are first touched.

    A ``bytearray`` is zero-filled when made, so all of it is resident at once, received
    into or not: every connection's 4 MiB receive buffer, and 32 MiB more for each WRITE
    header announcing that much. 200 idle connections took 820 MiB, and 50 clients stopping
    256 KiB into 32 MiB WRITEs 1.4 GiB more. Mapped, a connection holds what its client
    has sent. A mapping is also unmapped when dropped, where a freed bytearray may stay in
    the allocator's heap. Private: Python's default for ``-1`` is a shared mapping, which
    the kernel accounts as shared memory and does not back with transparent huge pages."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class RequestBuffer:
    """A receive buffer that yields whole requests without copying their payloads.

    A WRITE longer than ``max_payload`` is not buffered: its payload is discarded as it
    arrives (the request is still returned, with payload None, so that it can be answered
    with an error) and the stream stays in step.

    Payload views stay valid until the next :meth:`space`, which may reuse the memory. A
    caller that keeps views longer (the engine's writer thread writes from them) **pins**
    the buffer: it then never starts over at its beginning, and :meth:`would_move` says when
    the next :meth:`space` would overwrite or move bytes anyway; before that, the caller
    :meth:`swap` s in fresh storage and keeps the old one for as long as its views are in use.
    """

    def __init__(self, max_payload: int, capacity: int = 4 * 1024 * 1024) -> None:
        self._max_payload = max_payload
        self._buf = new_storage(max(capacity, REQUEST_SIZE))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._discard = 0
        self._pinned = False

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a returned request."""
        return self._end - self._start

    @property
    def discarding(self) -> bool:
        """True while the payload of an oversized WRITE is still arriving to be dropped."""
        return bool(self._discard)

    @property
    def idle(self) -> bool:
        """True between requests: nothing partial is buffered or being discarded."""
        return self._start == self._end and not self._discard

    @property
    def capacity(self) -> int:
        """The size of the storage received into."""
        return len(self._buf)

    @property
    def pinned(self) -> bool:
        """Payload views handed out must stay valid until :meth:`unpin` or :meth:`swap`."""
        return self._pinned

    def pin(self) -> None:
        self._pinned = True

    def unpin(self) -> None:
        """Whoever held the payload views is done with them: the memory may be reused."""
        self._pinned = False

    def would_move(self) -> bool:
        """True if the next :meth:`space` would overwrite or move bytes already received,
        invalidating payload views handed out earlier."""
        if self._start == self._end and not self._pinned:
            return self._start != 0
        return len(self._buf) - self._start < self._wanted()

    def better_swapped(self) -> bool:
        """Pinned, and fresh storage now saves a copy later: the next receive would move
        received bytes, or the buffer is between requests with over half of it used (fresh
        storage costs no copy now, where a long request straddling the end later would have
        to be moved)."""
        if not self._pinned:
            return False
        return self.would_move() or (self.idle and self._end > len(self._buf) // 2)

    def swap(self, fresh: mmap.mmap) -> mmap.mmap:
        """Go on in ``fresh`` (what is pending moves over, and the buffer is unpinned) and
        return the old storage, which the buffer never touches again: payload views into it
        stay valid for as long as their holder needs them (a thread still writing them)."""
        old = self._buf
        pending = self.pending
        if len(fresh) < pending:
            fresh = new_storage(len(old))
        # Through a memoryview, which copies overlapping bytes correctly should ``fresh``
        # be the storage in use itself (bytearray slice assignment would memcpy them).
        memoryview(fresh)[:pending] = self._view[self._start : self._end]
        self._buf = fresh
        self._view = memoryview(fresh)
        self._start = 0
        self._end = pending
        self._pinned = False
        return old

    def space(self) -> memoryview:
        """Where to receive into next; invalidates earlier payload views if
        :meth:`would_move` says so. Once everything received has been taken, the buffer
        starts over at its beginning, unless it is pinned: then it goes on behind the
        payloads that are still in use."""
        if self._start == self._end and not self._pinned:
            self._start = self._end = 0
        needed = self._wanted()
        if len(self._buf) - self._start < needed:
            if needed > len(self._buf):
                grown = new_storage(needed)
                grown[: self.pending] = self._view[self._start : self._end]
                self._buf = grown
                self._view = memoryview(grown)
            else:
                self._view[: self.pending] = self._view[self._start : self._end]
            self._end -= self._start
            self._start = 0
        if self._discard:
            # Receive discarded bytes at the end of the buffer, bounded by what is owed.
            return self._view[
                self._end : self._end + min(self._discard, len(self._buf) - self._end)
            ]
        stop = len(self._buf)
        front_end = self._start + needed
        if front_end > self._end and stop - front_end < needed:
            # No room behind the partial request at the front for another as long: receive
            # up to its end only. The next request then begins where the buffer can start
            # over (or be swapped) with nothing to move, instead of straddling the end.
            stop = front_end
        return self._view[self._end : stop]

    def commit(self, n: int) -> None:
        """Record that ``n`` bytes were received into :meth:`space`."""
        if self._discard:
            self._discard -= n
            return
        self._end += n

    def _wanted(self) -> int:
        """Bytes the request at the front needs in the buffer, header and payload together."""
        if self.pending < REQUEST_SIZE:
            return REQUEST_SIZE
        _, _, command, _, _, length = REQUEST_HEADER.unpack_from(self._buf, self._start)
        if command == CMD_WRITE and length <= self._max_payload:
            return REQUEST_SIZE + int(length)
        return REQUEST_SIZE

    def pop(self) -> Request | None:
        """The next whole request, or None until more bytes arrive. Bad magic is fatal."""
        if self._discard or self._end - self._start < REQUEST_SIZE:
            return None
        start = self._start
        magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack_from(self._buf, start)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if command != CMD_WRITE:
            self._start = start + REQUEST_SIZE
            return command, flags, cookie, offset, length, None
        if length > self._max_payload:
            # Too big to hold: drop the payload as it streams past, answer the header.
            buffered = min(length, self._end - start - REQUEST_SIZE)
            self._start = start + REQUEST_SIZE + buffered
            self._discard = length - buffered
            return command, flags, cookie, offset, length, None
        end = start + REQUEST_SIZE + length
        if end > self._end:
            return None
        self._start = end
        return command, flags, cookie, offset, length, self._view[start + REQUEST_SIZE : end]


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_data_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data must follow it."""
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ChunkType.OFFSET_DATA,
        cookie,
        length + 8,
        offset,
    )


def structured_hole_reply(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        ChunkType.OFFSET_HOLE,
        cookie,
        12,
    ) + struct.pack(">QI", offset, length)


def structured_error_reply(cookie: int, error: int, message: str = "") -> bytes:
    text = wire_message(message)
    body = struct.pack(">IH", error, len(text)) + text
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.ERROR, cookie, len(body)
        )
        + body
    )


def block_status_reply(cookie: int, context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk listing (length, flags) pairs."""
    body = struct.pack(f">I{2 * len(extents)}I", context_id, *(v for e in extents for v in e))
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.BLOCK_STATUS, cookie, len(body)
        )
        + body
    )
