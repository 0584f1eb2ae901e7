"""An independent reading of the NBD wire format, for the fuzzers to judge the server by.

Written from the protocol specification (doc/proto.md of the reference implementation and
the notes in shared/reference), not from usbd's own encoders: nothing here imports usbd, so
a bug in the server's encoding cannot hide behind the same bug in the checker. It parses
both directions: what a client sent (to know what the server was asked) and what the server
answered (to hold every reply to the specification). A reply that breaks it raises
:class:`Violation`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server and client).
FIXED_NEWSTYLE, NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = REP_ERR + 1, REP_ERR + 2, REP_ERR + 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN = REP_ERR + 5, REP_ERR + 6
#: The error replies the specification defines (ERR_UNSUP .. ERR_TOO_BIG).
REP_ERRORS = frozenset(range(REP_ERR + 1, REP_ERR + 10))

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# Transmission flags.
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF = 32, 64, 128
TF_SEND_CACHE, TF_SEND_FAST_ZERO = 1024, 2048
TF_KNOWN = (1 << 12) - 1

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
F_KNOWN = 31

# The only error values allowed on the wire.
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNOS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
REPLY_DONE = 1

BASE_ALLOCATION = "base:allocation"

REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = REQUEST.size


class Violation(AssertionError):
    """The server broke the specification (or an invariant the fuzzer holds it to)."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Violation(message)


def _utf8(data: bytes, what: str) -> str:
    """A string as the specification defines one: UTF-8, no NUL, at most 4096 bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Violation(f"{what} is not valid UTF-8: {data[:80]!r}") from None
    expect("\0" not in text, f"{what} contains NUL: {data[:80]!r}")
    expect(len(data) <= 4096, f"{what} is {len(data)} bytes long (4096 at most)")
    return text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the client's side of the handshake ----------------------------------------------------


@dataclass
class ClientOption:
    option: int
    data: bytes
    end: int  # offset in the client's stream just past this option


@dataclass
class ClientHandshake:
    """What a client's handshake stream says, option by option, before any server logic.

    ``stop`` is why parsing stopped: ``"incomplete"`` (the stream ends inside the flags or
    an option), ``"bad-flags"``, ``"bad-magic"`` or ``"too-long"`` (an option longer than
    ``max_option``; the server may refuse such a header before its data arrives).
    """

    flags: int | None
    options: list[ClientOption]
    stop: str
    stop_at: int  # where the unparsed (or offending) part begins


def parse_client_handshake(data: bytes, max_option: int) -> ClientHandshake:
    if len(data) < 4:
        return ClientHandshake(None, [], "incomplete", 0)
    (flags,) = struct.unpack_from(">I", data)
    if flags & ~(FIXED_NEWSTYLE | NO_ZEROES):
        return ClientHandshake(flags, [], "bad-flags", 0)
    options: list[ClientOption] = []
    pos = 4
    while True:
        if len(data) - pos < 16:
            return ClientHandshake(flags, options, "incomplete", pos)
        magic, option, length = struct.unpack_from(">QII", data, pos)
        if magic != IHAVEOPT:
            return ClientHandshake(flags, options, "bad-magic", pos)
        if length > max_option:
            return ClientHandshake(flags, options, "too-long", pos)
        if len(data) - pos - 16 < length:
            return ClientHandshake(flags, options, "incomplete", pos)
        options.append(ClientOption(option, data[pos + 16 : pos + 16 + length], pos + 16 + length))
        pos += 16 + length


# -- the server's side of the handshake -----------------------------------------------------


@dataclass(frozen=True)
class OfferedExport:
    """An export as the fuzz harness configured the server with it."""

    name: str
    size: int
    flags: int
    description: str = ""


@dataclass
class Outcome:
    """What the handshake came to, as the replies show it."""

    finished: bool = False
    aborted: bool = False
    export: OfferedExport | None = None
    flags: int | None = None  # transmission flags sent with the chosen export
    structured: bool = False
    base_allocation: bool = False
    no_zeroes: bool = False
    answered: int = 0  # options answered
    protocol_error: bool = False  # the client broke the protocol: the server must close
    tls_ends: list[int] = field(default_factory=list)  # where acknowledged STARTTLSes end


@dataclass
class _Replies:
    data: bytes
    pos: int = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int, what: str) -> bytes:
        expect(self.pos + n <= len(self.data), f"server output ends inside {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = struct.unpack(">QIII", self.take(20, "an option reply"))
        expect(magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}")
        expect(opt == option, f"reply for option {opt} to option {option}")
        return reply, self.take(length, f"the data of a reply to option {option}")


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    expect(len(data) - pos >= 4, f"{what}: no room for its length")
    (n,) = struct.unpack_from(">I", data, pos)
    expect(len(data) - pos - 4 >= n, f"{what}: length {n} overruns its reply")
    return _utf8(data[pos + 4 : pos + 4 + n], what), pos + 4 + n


def _client_string(data: bytes, pos: int) -> tuple[bytes, int] | None:
    if len(data) - pos < 4:
        return None
    (n,) = struct.unpack_from(">I", data, pos)
    if len(data) - pos - 4 < n:
        return None
    return data[pos + 4 : pos + 4 + n], pos + 4 + n


def _parse_info_request(data: bytes) -> tuple[bytes, list[int]] | None:
    """The export name and info requests of INFO/GO data, or None when malformed."""
    got = _client_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if len(data) - pos < 2:
        return None
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        return None
    return name, list(struct.unpack_from(f">{count}H", data, pos))


def _parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]] | None:
    got = _client_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if len(data) - pos < 4:
        return None
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query = _client_string(data, pos)
        if query is None:
            return None
        queries.append(query[0])
        pos = query[1]
    if pos != len(data):
        return None
    return name, queries


@dataclass
class ServerModel:
    """The exports a server offers, for judging its option replies."""

    exports: list[OfferedExport]
    default_export: str | None = None
    max_name: int = 4096
    #: "off" (no TLS), "on" (STARTTLS offered), "require" (nothing but ABORT without it).
    tls: str = "off"
    _structured: bool = field(default=False, init=False)
    _meta_export: str | None = field(default=None, init=False)
    _tls_active: bool = field(default=False, init=False)

    def lookup(self, raw: bytes) -> OfferedExport | None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if name == "" and self.default_export is not None:
            name = self.default_export
        for export in self.exports:
            if export.name == name:
                return export
        return None

    def judge(self, client: ClientHandshake, output: bytes, *, complete: bool) -> Outcome:
        """Hold ``output`` (everything the server sent after its greeting) to the spec.

        ``complete``: the server has seen the whole client stream, so every option in it
        must be answered (up to the one that finished or broke the handshake); otherwise
        the output may stop after any whole option's replies.
        """
        self._structured = False
        self._meta_export = None
        self._tls_active = False
        outcome = Outcome(no_zeroes=bool(client.flags and client.flags & NO_ZEROES))
        replies = _Replies(output)
        for opt in client.options:
            if replies.at_end() and not complete:
                return outcome
            self._answer(opt, replies, outcome)
            outcome.answered += 1
            if outcome.finished or outcome.protocol_error:
                break
        expect(replies.at_end(), f"{len(output) - replies.pos} bytes of output answer nothing")
        broken = client.stop in ("bad-flags", "bad-magic", "too-long")
        if (
            broken
            and not outcome.finished
            and (complete or outcome.answered == len(client.options))
        ):
            outcome.protocol_error = True
        return outcome

    def _answer(self, opt: ClientOption, replies: _Replies, outcome: Outcome) -> None:
        option, data = opt.option, opt.data
        tls_missing = self.tls == "require" and not self._tls_active
        if option == OPT_EXPORT_NAME and tls_missing:
            outcome.protocol_error = True  # no way to refuse it but to close
            return
        if option == OPT_EXPORT_NAME:
            export = self.lookup(data)
            if export is None:
                # No error reply exists for EXPORT_NAME: the server must just close.
                outcome.protocol_error = True
                return
            size, flags = struct.unpack(">QH", replies.take(10, "the EXPORT_NAME reply"))
            if not outcome.no_zeroes:
                expect(replies.take(124, "the EXPORT_NAME zeroes") == bytes(124), "not zeroes")
            self._check_flags(flags)
            expect(size == export.size, f"EXPORT_NAME size {size} for {export}")
            self._finish(outcome, export, flags)
            return
        # Every other option: zero or more informational replies, then one final reply.
        infos: list[tuple[int, bytes]] = []
        while True:
            reply, payload = replies.option_reply(option)
            if reply == REP_ACK or reply & REP_ERR:
                break
            infos.append((reply, payload))
        if reply & REP_ERR:
            expect(reply in REP_ERRORS, f"undefined error reply {reply:#x} to option {option}")
            _utf8(payload, f"the message of error {reply:#x}")
            expect(not infos, f"option {option}: data replies, then an error")
        else:
            expect(payload == b"", f"ACK to option {option} with {len(payload)} bytes of data")
        ok = reply == REP_ACK
        if option == OPT_STARTTLS:
            if self._starttls(data, infos, ok, reply):
                outcome.tls_ends.append(opt.end)
            return
        if tls_missing and option != OPT_ABORT:
            expect(
                reply == REP_ERR_TLS_REQD and not infos, f"option {option} without TLS: {reply:#x}"
            )
            return
        if option == OPT_ABORT:
            expect(not infos, "ABORT answered with data")
            # ACK is optional: a server may just close; either way negotiation is over.
            outcome.finished = outcome.aborted = True
            return
        if option == OPT_LIST:
            expect(ok == (data == b""), f"LIST with {len(data)} bytes of data answered {reply:#x}")
            names = []
            for kind, payload in infos:
                expect(kind == REP_SERVER, f"LIST answered with reply type {kind}")
                name, _ = _string(payload, 0, "a LIST name")
                _utf8(payload[4 + len(name.encode()) :], "a LIST description")
                names.append(name)
            expect(
                not ok or sorted(names) == sorted(e.name for e in self.exports),
                f"LIST named {names}",
            )
            return
        if option in (OPT_INFO, OPT_GO):
            self._info(option, data, infos, ok, outcome, reply)
            return
        if option == OPT_STRUCTURED_REPLY:
            expect(not infos, "STRUCTURED_REPLY answered with data")
            if data:
                expect(reply == REP_ERR_INVALID, "STRUCTURED_REPLY with data was not refused")
            if ok:
                self._structured = True
            return
        if option in (OPT_LIST_META, OPT_SET_META):
            self._meta(option, data, infos, ok, reply)
            return
        # Anything else (STARTTLS and PEEK_EXPORT included, on a server without TLS): refused.
        expect(not ok and not infos, f"unknown option {option} answered {reply:#x}")

    def _starttls(self, data: bytes, infos: list[tuple[int, bytes]], ok: bool, reply: int) -> bool:
        """Judge the answer to STARTTLS; True when it was acknowledged (TLS starts)."""
        expect(not infos, "STARTTLS answered with data")
        if self.tls == "off" or self._tls_active:
            expect(not ok, f"STARTTLS accepted (tls={self.tls}, active={self._tls_active})")
            return False
        if data:
            expect(reply == REP_ERR_INVALID, "STARTTLS with data was not refused")
            return False
        expect(ok, f"STARTTLS refused with {reply:#x} on a server with TLS {self.tls}")
        # No negotiation state survives the upgrade (spec).
        self._tls_active = True
        self._structured = False
        self._meta_export = None
        return True

    def _check_flags(self, flags: int) -> None:
        expect(flags & TF_HAS_FLAGS, f"transmission flags {flags:#x} lack HAS_FLAGS")
        expect(not flags & ~TF_KNOWN, f"undefined transmission flags in {flags:#x}")
        expect(not flags & TF_SEND_DF or self._structured, "DF without structured replies")

    def _finish(self, outcome: Outcome, export: OfferedExport, flags: int) -> None:
        outcome.finished = True
        outcome.export = export
        outcome.flags = flags
        outcome.structured = self._structured
        outcome.base_allocation = self._structured and self._meta_export == export.name

    def _info(
        self,
        option: int,
        data: bytes,
        infos: list[tuple[int, bytes]],
        ok: bool,
        outcome: Outcome,
        reply: int,
    ) -> None:
        parsed = _parse_info_request(data)
        if parsed is None:
            expect(reply == REP_ERR_INVALID, f"malformed INFO/GO data answered {reply:#x}")
            return
        raw, _requests = parsed
        export = self.lookup(raw) if len(raw) <= self.max_name else None
        if export is None:
            expect(not ok, f"INFO/GO for unknown export {raw[:80]!r} succeeded")
            return
        expect(ok, f"INFO/GO for export {export.name!r} refused with {reply:#x}")
        seen: dict[int, bytes] = {}
        for kind, payload in infos:
            expect(kind == REP_INFO, f"INFO/GO answered with reply type {kind}")
            expect(len(payload) >= 2, "an INFO reply without its type")
            (info,) = struct.unpack_from(">H", payload)
            body = payload[2:]
            expect(info not in seen, f"info {info} sent twice")
            seen[info] = body
            if info == INFO_EXPORT:
                expect(len(body) == 10, f"INFO_EXPORT of {len(body)} bytes")
                size, flags = struct.unpack(">QH", body)
                expect(size == export.size, f"INFO_EXPORT size {size} for {export}")
                self._check_flags(flags)
                expect(
                    (flags & TF_READ_ONLY) == (export.flags & TF_READ_ONLY),
                    "INFO_EXPORT read-only flag differs from the export's",
                )
            elif info == INFO_NAME:
                expect(_utf8(body, "INFO_NAME") == export.name, f"INFO_NAME {body!r}")
            elif info == INFO_DESCRIPTION:
                expect(_utf8(body, "INFO_DESCRIPTION") == export.description, "description")
            elif info == INFO_BLOCK_SIZE:
                expect(len(body) == 12, f"INFO_BLOCK_SIZE of {len(body)} bytes")
                minimum, preferred, maximum = struct.unpack(">III", body)
                expect(minimum & (minimum - 1) == 0 and 1 <= minimum <= 65536, "minimum block")
                expect(preferred & (preferred - 1) == 0 and preferred >= minimum, "preferred")
                expect(maximum >= preferred or maximum >= 1 << 25, "maximum payload")
                expect(maximum == 0xFFFFFFFF or maximum % minimum == 0, "maximum/minimum")
            else:
                raise Violation(f"undefined info type {info}")
        expect(INFO_EXPORT in seen, "INFO/GO succeeded without INFO_EXPORT")
        if option == OPT_GO:
            (flags,) = struct.unpack_from(">H", seen[INFO_EXPORT], 8)
            self._finish(outcome, export, flags)

    def _meta(
        self, option: int, data: bytes, infos: list[tuple[int, bytes]], ok: bool, reply: int
    ) -> None:
        setting = option == OPT_SET_META
        if setting:
            self._meta_export = None  # a SET replaces earlier selections, even when it fails
        parsed = _parse_meta_request(data)
        if setting and not self._structured:
            expect(not ok, "SET_META_CONTEXT before structured replies succeeded")
            return
        if parsed is None:
            expect(reply == REP_ERR_INVALID, f"malformed META_CONTEXT data answered {reply:#x}")
            return
        raw, queries = parsed
        export = self.lookup(raw) if len(raw) <= self.max_name else None
        if export is None or any(len(q) > self.max_name or not _is_utf8(q) for q in queries):
            expect(not ok, "META_CONTEXT: unknown export, or a long or non-UTF-8 query, accepted")
            return
        if not ok:
            # Refusing is allowed only for a reason; queries are fine, the export exists.
            raise Violation(f"META_CONTEXT on {export.name!r} refused with {reply:#x}")
        selected = False
        for kind, payload in infos:
            expect(kind == REP_META_CONTEXT, f"META_CONTEXT answered with reply type {kind}")
            expect(len(payload) > 4, "META_CONTEXT reply without a name")
            (context_id,) = struct.unpack_from(">I", payload)
            name = _utf8(payload[4:], "a meta context name")
            expect(name == BASE_ALLOCATION, f"meta context {name!r} offered")
            # LIST has no ids to give; a SET's id is the server's choice.
            expect(setting or context_id == 0, f"LIST_META_CONTEXT gave id {context_id}")
            listed = not setting and (b"base:" in queries or not queries)
            wanted = name.encode() in queries or listed
            expect(wanted, f"context {name!r} returned for queries {queries}")
            selected = True
        expect(len(infos) <= 1, "base:allocation returned more than once")
        asked = BASE_ALLOCATION.encode() in queries
        if setting:
            expect(selected == asked, f"SET_META_CONTEXT {queries} selected {selected}")
            self._meta_export = export.name if selected else None
        else:
            expect(selected == (asked or b"base:" in queries or not queries), "LIST_META")


# -- transmission: requests -------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytes | None  # a WRITE's data when the server buffers it; None otherwise
    end: int  # offset in the stream just past the request (its payload included)
    start: int = 0  # offset of its header in the stream


@dataclass
class Requests:
    requests: list[Request]
    stop: str  # "end" (stream ends between requests), "incomplete", "bad-magic"
    stop_at: int
    discarding: int = 0  # bytes of an oversized WRITE's payload still to come


def parse_requests(data: bytes, max_payload: int) -> Requests:
    """Split a client's transmission stream into requests, as the spec frames them.

    A WRITE longer than ``max_payload`` is still framed by its length (its payload follows
    it on the wire) but a server that refuses to hold it returns it without a payload.
    """
    out: list[Request] = []
    pos = 0
    while True:
        if pos == len(data):
            return Requests(out, "end", pos)
        if len(data) - pos < REQUEST_SIZE:
            return Requests(out, "incomplete", pos)
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(data, pos)
        if magic != REQUEST_MAGIC:
            return Requests(out, "bad-magic", pos)
        end = pos + REQUEST_SIZE
        payload: bytes | None = None
        if command == WRITE:
            if length > max_payload:
                end += length
                out.append(Request(flags, command, cookie, offset, length, None, end, pos))
                if end > len(data):
                    return Requests(out, "incomplete", pos, discarding=end - len(data))
                pos = end
                continue
            if len(data) - end < length:
                return Requests(out, "incomplete", pos)
            payload = data[end : end + length]
            end += length
        out.append(Request(flags, command, cookie, offset, length, payload, end, pos))
        pos = end


def iter_requests(data: bytes, max_payload: int) -> Iterator[Request]:
    yield from parse_requests(data, max_payload).requests


@dataclass(frozen=True)
class SessionModel:
    """What a transmission-phase client was promised: the flags and sizes to judge by."""

    size: int
    flags: int
    structured: bool
    base_allocation: bool
    min_block: int = 1
    max_payload: int = 32 * 1024 * 1024


def acceptable(session: SessionModel, command: int, flags: int, offset: int, length: int) -> bool:
    """May a server carry this request out (rather than refuse it), per the specification?"""
    advertised = session.flags
    if command not in (READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS):
        return False
    if command in (WRITE, TRIM, WRITE_ZEROES) and advertised & TF_READ_ONLY:
        return False
    if flags & ~F_KNOWN:
        return False
    if flags & F_FUA and not advertised & TF_SEND_FUA:
        return False
    if flags & (F_NO_HOLE | F_FAST_ZERO) and command != WRITE_ZEROES:
        return False
    if flags & F_FAST_ZERO and not advertised & TF_SEND_FAST_ZERO:
        return False
    if flags & F_DF and (command != READ or not session.structured):
        return False
    if flags & F_REQ_ONE and command != BLOCK_STATUS:
        return False
    needs = {FLUSH: TF_SEND_FLUSH, TRIM: TF_SEND_TRIM, WRITE_ZEROES: TF_SEND_WRITE_ZEROES}
    if command == CACHE:
        needs[CACHE] = TF_SEND_CACHE
    if command in needs and not advertised & needs[command]:
        return False
    if command == BLOCK_STATUS and not session.base_allocation:
        return False
    if command == FLUSH:
        return offset == 0 and length == 0
    if length == 0 or offset + length > session.size:
        return False
    if (offset % session.min_block) or (length % session.min_block):
        return False
    return not (command in (READ, WRITE) and length > session.max_payload)


# -- transmission: replies -----------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One reply on the wire: a simple reply, or one structured chunk."""

    structured: bool
    flags: int  # structured flags (DONE); 0 for simple replies
    kind: int  # chunk type; -1 for simple replies
    cookie: int
    error: int  # simple reply error, or an error chunk's error
    offset: int = 0  # OFFSET_DATA / OFFSET_HOLE / ERROR_OFFSET
    length: int = 0  # OFFSET_HOLE length
    data: bytes = b""  # OFFSET_DATA data, or a READ's simple-reply data
    message: str = ""
    context_id: int = 0
    extents: tuple[tuple[int, int], ...] = ()


@dataclass
class ReplyReader:
    """Reads replies one after another out of a server's output."""

    data: bytes
    pos: int = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def _take(self, n: int, what: str) -> bytes:
        expect(self.pos + n <= len(self.data), f"server output ends inside {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def next(self, read_length: int | Callable[[int], int | None] | None = None) -> Chunk:
        """The next reply; ``read_length``: what a simple reply's successful READ carries
        (None when the reply cannot be to a READ), or a function of the reply's cookie that
        says so (replies out of order)."""
        (magic,) = struct.unpack(">I", self._take(4, "a reply magic"))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._take(12, "a simple reply"))
            expect(error == 0 or error in ERRNOS, f"simple reply with error {error}")
            data = b""
            if callable(read_length):
                read_length = read_length(cookie)
            if error == 0 and read_length is not None:
                data = self._take(read_length, "the data of a simple READ reply")
            return Chunk(False, 0, -1, cookie, error, data=data)
        expect(magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}")
        flags, kind, cookie, length = struct.unpack(">HHQI", self._take(16, "a chunk header"))
        expect(not flags & ~REPLY_DONE, f"undefined reply flags {flags:#x}")
        body = self._take(length, f"the payload of a chunk of type {kind}")
        return parse_chunk(flags, kind, cookie, body)


def parse_chunk(flags: int, kind: int, cookie: int, body: bytes) -> Chunk:
    if kind == CHUNK_NONE:
        expect(flags & REPLY_DONE and not body, "NONE chunk without DONE or with a payload")
        return Chunk(True, flags, kind, cookie, 0)
    if kind == CHUNK_OFFSET_DATA:
        expect(len(body) > 8, f"OFFSET_DATA chunk of {len(body)} bytes")
        (offset,) = struct.unpack_from(">Q", body)
        return Chunk(True, flags, kind, cookie, 0, offset=offset, data=body[8:])
    if kind == CHUNK_OFFSET_HOLE:
        expect(len(body) == 12, f"OFFSET_HOLE chunk of {len(body)} bytes")
        offset, length = struct.unpack(">QI", body)
        expect(length > 0, "an empty hole")
        return Chunk(True, flags, kind, cookie, 0, offset=offset, length=length)
    if kind == CHUNK_BLOCK_STATUS:
        expect(len(body) >= 12 and (len(body) - 4) % 8 == 0, f"BLOCK_STATUS of {len(body)} B")
        (context_id,) = struct.unpack_from(">I", body)
        values = struct.unpack_from(f">{(len(body) - 4) // 4}I", body, 4)
        extents = tuple(zip(values[::2], values[1::2], strict=True))
        return Chunk(True, flags, kind, cookie, 0, context_id=context_id, extents=extents)
    if kind in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
        expect(len(body) >= 6, f"error chunk of {len(body)} bytes")
        error, mlen = struct.unpack_from(">IH", body)
        expect(error in ERRNOS, f"error chunk with error {error}")
        extra = 8 if kind == CHUNK_ERROR_OFFSET else 0
        expect(len(body) == 6 + mlen + extra, f"error chunk: message of {mlen} in {len(body)}")
        message = _utf8(body[6 : 6 + mlen], "an error chunk's message")
        offset = struct.unpack_from(">Q", body, 6 + mlen)[0] if extra else 0
        return Chunk(True, flags, kind, cookie, error, offset=offset, message=message)
    raise Violation(f"undefined chunk type {kind}")
