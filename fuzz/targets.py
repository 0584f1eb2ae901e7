"""Fuzz targets: usbd's sans-IO decoders (and the request loop) fed arbitrary client bytes.

Each target takes one input (bytes) and raises on a finding: any exception but the
protocol's own :class:`ProtocolError` is a crash, a :class:`nbdspec.Violation` is a reply
or a state that breaks the specification or an invariant. The targets are plain functions,
so that a test can call them on a regression input without any fuzzing engine; ``run.py``
drives them with atheris.

* ``handshake``: :class:`Handshake` fed the input as a client's stream, whole, one byte at a
  time, and split at pseudo-random points; every reply is parsed by :mod:`nbdspec`, the
  outcomes must agree, and what was consumed plus what is left over must be what was fed.
* ``transmission``: :class:`RequestBuffer` (small capacities, pinned views, swaps, poisoned
  free space), :func:`check` against the specification's rules, and the reply encoders.
* ``engine``: a :class:`Connection` serving a RAM disk over a socketpair, fed the input as a
  request stream; every reply is parsed and every read checked against a model of the disk.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import socket
import struct
import tempfile
import zlib
from dataclasses import dataclass

import nbdspec
import trio
from nbdspec import Violation, expect

from usbd.core import (
    Connection,
    Device,
    Export,
    ExportInfo,
    Handshake,
    Negotiated,
    ProtocolError,
    RequestBuffer,
    Session,
    SocketTransport,
    TransmissionFlag,
    check,
    session_for,
)
from usbd.core._handshake import (
    BASE_ALLOCATION_ID,
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    TLSMode,
)
from usbd.core._transmission import (
    Request,
    block_status_reply,
    new_storage,
    simple_reply,
    structured_data_header,
    structured_error_reply,
    structured_hole_reply,
)
from usbd.filedisk import FileDisk
from usbd.ramdisk import RamDisk

TF = TransmissionFlag
EXPORTS = [
    ExportInfo(
        name="fuzz",
        size=64 * 1024 * 1024,
        flags=TF.HAS_FLAGS
        | TF.SEND_FLUSH
        | TF.SEND_FUA
        | TF.SEND_TRIM
        | TF.SEND_WRITE_ZEROES
        | TF.SEND_CACHE
        | TF.SEND_FAST_ZERO
        | TF.CAN_MULTI_CONN,
        description="usbd fuzzing",
    ),
    ExportInfo(
        name="ro",
        size=4096,
        flags=TF.HAS_FLAGS | TF.READ_ONLY,
        min_block=512,
        preferred_block=4096,
        max_payload=1 << 20,
    ),
    ExportInfo(name="\u00e9t\u00e9", size=1 << 40, flags=TF.HAS_FLAGS, description="\u2603"),
]
DEFAULT_EXPORT = "fuzz"
MODEL_EXPORTS = [
    nbdspec.OfferedExport(e.name, e.size, int(e.flags), e.description) for e in EXPORTS
]
#: Whole inputs are also fed one byte at a time up to this length (then in small steps).
BYTEWISE_MAX = 2048


# -- handshake -------------------------------------------------------------------------------


@dataclass
class _Run:
    output: bytes
    error: str | None
    handshake: Handshake
    fed: int


_TLS_MODES: tuple[TLSMode, ...] = ("off", "on", "require")


def _feed(data: bytes, cuts: list[int], tls: TLSMode) -> _Run:
    """Feed ``data`` cut at ``cuts``; stop at the end of the handshake or at an error.

    After an acknowledged STARTTLS the I/O layer would run the TLS handshake: here it is
    taken to succeed, and the bytes after it to be what came over TLS."""
    hs = Handshake(EXPORTS, DEFAULT_EXPORT, tls=tls)
    out = bytearray()
    fed = 0
    for cut in [*cuts, len(data)]:
        if cut <= fed:
            continue
        try:
            out += hs.receive_data(data[fed:cut])
        except ProtocolError as exc:
            return _Run(bytes(out), str(exc), hs, cut)
        fed = cut
        if hs.finished:
            break
        if hs.starttls:
            hs.tls_started()
    return _Run(bytes(out), None, hs, fed)


def _model(tls: str) -> nbdspec.ServerModel:
    return nbdspec.ServerModel(MODEL_EXPORTS, DEFAULT_EXPORT, max_name=MAX_NAME_LENGTH, tls=tls)


def _check_greeting() -> None:
    greeting = Handshake(EXPORTS, DEFAULT_EXPORT).start()
    magic, opt, flags = struct.unpack(">QQH", greeting)
    expect(magic == nbdspec.NBDMAGIC and opt == nbdspec.IHAVEOPT, "bad greeting magic")
    expect(flags & nbdspec.FIXED_NEWSTYLE, "greeting without FIXED_NEWSTYLE")


def _check_state(
    run: _Run, client: nbdspec.ClientHandshake, data: bytes, tls: str
) -> nbdspec.Outcome:
    """The replies of one run are well-formed, and the handshake's state agrees with them."""
    model = _model(tls)
    hs = run.handshake
    if run.error is not None:
        outcome = model.judge(client, run.output, complete=False)
        expect(not hs.finished, "a handshake that raised says it finished")
        return outcome
    outcome = model.judge(client, run.output, complete=True)
    expect(not outcome.protocol_error, f"no ProtocolError for a stream that {client.stop}")
    expect(hs.finished == outcome.finished, f"finished={hs.finished}, replies say otherwise")
    if outcome.finished:
        end = client.options[outcome.answered - 1].end
        expect(hs.leftover == data[end : run.fed], "leftover is not the bytes after the end")
        if outcome.aborted:
            expect(hs.result is None, "ABORT gave a result")
        else:
            result = hs.result
            expect(result is not None, "no result after a successful end")
            assert result is not None
            assert outcome.export is not None
            expect(result.export.name == outcome.export.name, "result names another export")
            expect(int(result.flags) == outcome.flags, "result flags differ from those sent")
            expect(result.structured_replies == outcome.structured, "structured replies")
            expect(result.base_allocation == outcome.base_allocation, "base:allocation")
            expect(result.no_zeroes == outcome.no_zeroes, "no_zeroes")
    else:
        expect(hs.result is None and hs.leftover == b"", "unfinished with a result or leftover")
        # Whatever was fed and not answered is still buffered: nothing lost, nothing invented.
        pending = bytes(hs._buffer)
        start = 0 if client.flags is None else (client.options[-1].end if client.options else 4)
        expect(pending == data[start : run.fed], "buffered bytes are not the unanswered tail")
    return outcome


def handshake(data: bytes) -> None:
    """The client's stream fed whole, byte by byte and at random cuts, in one of the TLS
    modes (chosen by the input's checksum, so that every mode sees every kind of input).
    Each feed is cut where a STARTTLS ends (the TLS handshake comes between); a feed that
    is not (``plain``) must refuse what follows an acknowledged STARTTLS unencrypted."""
    _check_greeting()
    rng = random.Random(zlib.crc32(data))
    tls = _TLS_MODES[zlib.crc32(data) % 3]
    client = nbdspec.parse_client_handshake(data, MAX_OPTION_LENGTH)
    ends = [o.end for o in client.options if o.option == nbdspec.OPT_STARTTLS]
    whole = _feed(data, ends, tls)
    step = 1 if len(data) <= BYTEWISE_MAX else len(data) // BYTEWISE_MAX + 1
    bytewise = _feed(data, sorted({*range(step, len(data), step), *ends}), tls)
    cuts = sorted({*(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 6))), *ends})
    split = _feed(data, cuts, tls)
    reference = _check_state(bytewise, client, data, tls)
    if bytewise.error is not None and step == 1:
        # Fed byte by byte, every option before the bad one was answered on its own.
        outcome = _model(tls).judge(client, bytewise.output, complete=True)
        expect(outcome.protocol_error, f"ProtocolError ({bytewise.error}) on a valid stream")
    plain = _feed(data, [], tls)
    first_tls = reference.tls_ends[0] if reference.tls_ends else None
    if first_tls is not None and first_tls < len(data):
        # CVE-2021-3716 (nbdkit): bytes behind STARTTLS in the same receive are plaintext a
        # man in the middle may have injected; acting on them is a finding.
        expect(plain.error is not None, "plaintext after STARTTLS was acted on")
        expect(bytewise.output.startswith(plain.output), "output before STARTTLS differs")
        runs: tuple[_Run, ...] = (whole, split)
    else:
        runs = (whole, split, plain)
    for run in runs:
        _check_state(run, client, data, tls)
        expect(run.error == bytewise.error, f"errors differ: {run.error!r} / {bytewise.error!r}")
        if run.error is None:
            expect(run.output == bytewise.output, "output depends on how the input was split")
            expect(run.handshake.result == bytewise.handshake.result, "results differ")
            # The leftover may differ only by the bytes not yet fed.
            rest = data[run.fed :]
            expect(
                run.handshake.leftover + rest == bytewise.handshake.leftover + data[bytewise.fed :],
                "leftover depends on how the input was split",
            )
        else:
            expect(bytewise.output.startswith(run.output), "output before the error differs")


# -- transmission: RequestBuffer, check(), the encoders ----------------------------------------

_MAX_PAYLOADS = (64, 4096, 65536, 32 * 1024 * 1024)
_CAPACITIES = (28, 29, 64, 100, 1000, 4096, 65536, 4 * 1024 * 1024)
_SIZES = (4096, 1 << 20, 64 << 20, 1 << 62)
_OPTIONAL_FLAGS = (
    TF.SEND_FLUSH,
    TF.SEND_FUA,
    TF.SEND_TRIM,
    TF.SEND_WRITE_ZEROES,
    TF.SEND_CACHE,
    TF.SEND_FAST_ZERO,
)
#: Bytes of fake configuration before the request stream in a transmission input.
CONFIG_SIZE = 4


def transmission_config(
    *,
    structured: bool,
    base_allocation: bool = False,
    read_only: bool = False,
    min_block_512: bool = False,
    max_payload: int = 3,
    capacity: int = 7,
    pin: int = 0,
    seed: int = 0,
    flags: int = 0x3F,
    size: int = 2,
) -> bytes:
    """The configuration header of a transmission input (seeds are written with it)."""
    b0 = structured | base_allocation << 1 | read_only << 2 | min_block_512 << 3
    b0 |= max_payload << 4
    return bytes([b0, capacity | pin << 3, seed & 0xFF, flags | size << 6])


@dataclass
class _Config:
    session: Session
    model: nbdspec.SessionModel
    capacity: int
    pin: int
    seed: int


def _config(head: bytes) -> _Config:
    b0, b1, b2, b3 = head
    flags = TF.HAS_FLAGS | (TF.READ_ONLY if b0 & 4 else TF(0))
    for i, flag in enumerate(_OPTIONAL_FLAGS):
        if b3 >> i & 1:
            flags |= flag
    structured = bool(b0 & 1)
    if structured:
        flags |= TF.SEND_DF
    session = Session(
        size=_SIZES[b3 >> 6],
        flags=flags,
        structured_replies=structured,
        base_allocation=structured and bool(b0 & 2),
        min_block=512 if b0 & 8 else 1,
        max_payload=_MAX_PAYLOADS[b0 >> 4 & 3],
    )
    model = nbdspec.SessionModel(
        size=session.size,
        flags=int(flags),
        structured=structured,
        base_allocation=session.base_allocation,
        min_block=session.min_block,
        max_payload=session.max_payload,
    )
    return _Config(session, model, _CAPACITIES[b1 & 7], b1 >> 3 & 3, b2)


def _same_request(got: Request, want: nbdspec.Request) -> None:
    command, flags, cookie, offset, length, payload = got
    expect(
        (command, flags, cookie, offset, length)
        == (want.command, want.flags, want.cookie, want.offset, want.length),
        f"request {got[:5]} decoded, {want} sent",
    )
    if want.payload is None:
        expect(payload is None, "a payload where none was held")
    else:
        expect(payload is not None and bytes(payload) == want.payload, "payload differs")


def transmission(data: bytes) -> None:
    if len(data) < CONFIG_SIZE:
        return
    config = _config(data[:CONFIG_SIZE])
    stream = data[CONFIG_SIZE:]
    session = config.session
    expected = nbdspec.parse_requests(stream, session.max_payload)
    buf = RequestBuffer(session.max_payload, config.capacity)
    rng = random.Random(config.seed ^ zlib.crc32(stream))
    held: list[tuple[memoryview, bytes]] = []  # payload views handed out, what they must hold
    old_storage: list[mmap.mmap] = []  # swapped out: views into it must stay valid
    got: list[nbdspec.Request] = []
    error: str | None = None
    pos = 0
    while pos < len(stream) and error is None:
        if not buf.pinned:
            held.clear()  # views are valid only until the next space() unless pinned
        elif buf.would_move() or (config.pin == 2 and buf.better_swapped()):
            fresh = new_storage(rng.choice((28, 64, config.capacity)))
            old_storage.append(buf.swap(fresh))
            expect(not buf.pinned, "still pinned after a swap")
        space = buf.space()
        expect(len(space) > 0, "space() offers no room: a receive would read as end of stream")
        n = min(len(space), len(stream) - pos, rng.choice((1, 2, 7, 28, 29, 100, 4096, 1 << 20)))
        # Poison what lies past the bytes received: a decoder that reads them is caught.
        poison = min(len(space), n + 64)
        space[n:poison] = b"\xa5" * (poison - n)
        space[:n] = stream[pos : pos + n]
        buf.commit(n)
        pos += n
        while True:
            try:
                request = buf.pop()
            except ProtocolError as exc:
                error = str(exc)
                break
            if request is None:
                break
            expect(len(got) < len(expected.requests), f"request {request[:5]} was never sent")
            want = expected.requests[len(got)]
            _same_request(request, want)
            got.append(want)
            if request[5] is not None and config.pin:
                held.append((request[5], bytes(request[5])))
                buf.pin()
        for view, content in held:
            expect(bytes(view) == content, "a pinned payload view changed under its holder")
        if config.pin == 2 and rng.random() < 0.3:
            buf.unpin()
        _check_buffer(buf, got, pos, error)
    expect(
        (error is not None) == (expected.stop == "bad-magic"),
        f"ProtocolError {error!r}, stream stops with {expected.stop}",
    )
    expect(len(got) == len(expected.requests), f"{len(got)} of {len(expected.requests)} decoded")
    for want in got:
        _judge_request(config, want, stream)
    del old_storage


def _check_buffer(
    buf: RequestBuffer, got: list[nbdspec.Request], pos: int, error: str | None
) -> None:
    if error is not None:
        return
    last_end = got[-1].end if got else 0
    if last_end > pos:  # an oversized WRITE whose payload is still being dropped
        expect(buf.discarding and buf.pending == 0, "not discarding inside an oversized WRITE")
    else:
        expect(not buf.discarding, "discarding past the end of an oversized WRITE")
        expect(buf.pending == pos - last_end, f"pending {buf.pending}, {pos - last_end} unread")
    expect(buf.idle == (buf.pending == 0 and not buf.discarding), "idle disagrees")


def _judge_request(config: _Config, req: nbdspec.Request, stream: bytes) -> None:
    """check() against the specification's rules, then every reply the request could get."""
    session = config.session
    if req.command == nbdspec.DISC:
        return
    error = check(session, req.command, req.flags, req.offset, req.length)
    allowed = nbdspec.acceptable(config.model, req.command, req.flags, req.offset, req.length)
    expect(
        (error is None) == allowed,
        f"check() says {error!r} to {req} (the spec {'allows' if allowed else 'refuses'} it)",
    )
    if error is not None:
        expect(int(error) in nbdspec.ERRNOS, f"error {error!r} is not an NBD error")
        _judge_reply(simple_reply(req.cookie, int(error)), req, want_error=int(error))
        if session.structured_replies:
            text = stream[req.end - min(req.end, 5000) : req.end].decode("utf-8", "replace")
            chunk = _one_chunk(structured_error_reply(req.cookie, int(error), text), req)
            expect(chunk.error == int(error), "error chunk with another error")
            sent = text.replace("\0", " ")
            expect(sent.startswith(chunk.message), "error message is not the one given")
        return
    _judge_reply(simple_reply(req.cookie), req, want_error=0)
    if not session.structured_replies or req.command != nbdspec.READ:
        if req.command == nbdspec.BLOCK_STATUS:
            rng = random.Random(req.cookie)
            extents = [
                (rng.randrange(1, 1 << 32), rng.randrange(4)) for _ in range(rng.randrange(1, 9))
            ]
            chunk = _one_chunk(block_status_reply(req.cookie, BASE_ALLOCATION_ID, extents), req)
            expect(chunk.extents == tuple(extents), "extents differ from those given")
            expect(chunk.context_id == BASE_ALLOCATION_ID, "context id differs")
        return
    data = bytes(min(req.length, 256))
    for done in (False, True):
        header = structured_data_header(req.cookie, req.offset, len(data), done)
        chunk = _one_chunk(header + data, req)
        expect(chunk.offset == req.offset and chunk.data == data, "OFFSET_DATA differs")
        expect(bool(chunk.flags & nbdspec.REPLY_DONE) == done, "DONE flag")
        chunk = _one_chunk(structured_hole_reply(req.cookie, req.offset, req.length, done), req)
        expect((chunk.offset, chunk.length) == (req.offset, req.length), "OFFSET_HOLE differs")


def _one_chunk(reply: bytes, req: nbdspec.Request) -> nbdspec.Chunk:
    reader = nbdspec.ReplyReader(reply)
    chunk = reader.next()
    expect(reader.at_end(), "bytes after a reply")
    expect(chunk.structured and chunk.cookie == req.cookie, "structured reply cookie")
    return chunk


def _judge_reply(reply: bytes, req: nbdspec.Request, *, want_error: int) -> None:
    reader = nbdspec.ReplyReader(reply)
    chunk = reader.next()
    expect(reader.at_end(), "bytes after a simple reply")
    expect(not chunk.structured, "a simple reply that is not")
    expect((chunk.cookie, chunk.error) == (req.cookie, want_error), "cookie or error differs")


# -- engine: the real request loop over a socketpair -------------------------------------------

ENGINE_SIZE = 1024 * 1024
_ENGINE_MAX_PAYLOADS = (4096, 65536, 1 << 20, 32 * 1024 * 1024)
#: A run that takes longer than this has hung (a stuck request loop is a finding too).
_ENGINE_DEADLINE = 20.0


class _Errors(logging.Handler):
    """Collects the server's ERROR records: the engine logs its own bugs at that level."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_errors = _Errors()


def _collect_errors() -> None:
    """Route usbd's log to :data:`_errors` only (once): its warnings about the fuzzer's
    bad requests are expected by the thousand."""
    log = logging.getLogger("usbd")
    if _errors not in log.handlers:
        log.addHandler(_errors)
        log.setLevel(logging.ERROR)
        log.propagate = False


def engine_config(
    *,
    structured: bool,
    base_allocation: bool = False,
    read_only: bool = False,
    max_payload: int = 3,
    seed: int = 0,
) -> bytes:
    """The configuration header of an engine input."""
    return bytes([structured | base_allocation << 1 | read_only << 2 | max_payload << 3, seed])


def engine(data: bytes) -> None:
    """The request loop over a RAM disk: inline, so replies come in request order."""
    if len(data) < 2:
        return
    _engine_run(RamDisk(ENGINE_SIZE), data, in_order=True)


#: Where engine_file keeps its backing file: tmpfs, so that the disk costs no I/O.
_FILE_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def engine_file(data: bytes) -> None:
    """The request loop over usbd-filedisk: a blocking device, so requests run in worker
    threads and plain WRITEs go to the connection's writer thread (WriteBehind); replies
    come in any order and are matched by cookie (the harness makes cookies unique)."""
    if len(data) < 2:
        return
    path = os.path.join(_FILE_DIR, f"usbd-fuzz-{os.getpid()}.img")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        _engine_run(FileDisk(path, ENGINE_SIZE), data, in_order=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _unique_cookies(stream: bytes, max_payload: int) -> bytes:
    """``stream`` with each request's cookie replaced by its number (from 1)."""
    out = bytearray(stream)
    for i, req in enumerate(nbdspec.iter_requests(stream, max_payload)):
        struct.pack_into(">Q", out, req.start + 8, i + 1)
    return bytes(out)


def _engine_run(device: Device, data: bytes, *, in_order: bool) -> None:
    b0, seed = data[0], data[1]
    stream = data[2:]
    structured = bool(b0 & 1)
    export = Export(
        device,
        "fuzz",
        read_only=bool(b0 & 4),
        max_payload=_ENGINE_MAX_PAYLOADS[b0 >> 3 & 3],
    )
    if not in_order:
        stream = _unique_cookies(stream, export.info.max_payload)
    negotiated = Negotiated(
        export.info, structured_replies=structured, base_allocation=structured and bool(b0 & 2)
    )
    session = session_for(export, negotiated)
    model = nbdspec.SessionModel(
        size=session.size,
        flags=int(session.flags),
        structured=structured,
        base_allocation=session.base_allocation,
        min_block=session.min_block,
        max_payload=session.max_payload,
    )
    _collect_errors()
    _errors.records.clear()
    output = trio.run(_exchange, export, session, stream, random.Random(seed ^ zlib.crc32(stream)))
    if _errors.records:
        record = _errors.records[0]
        raise Violation(f"the server logged an error: {record.getMessage()} {record.exc_info}")
    if in_order:
        _judge_engine(model, stream, output)
    else:
        _judge_unordered(model, stream, output)


async def _exchange(export: Export, session: Session, stream: bytes, rng: random.Random) -> bytes:
    ours, theirs = socket.socketpair()
    connection = Connection(SocketTransport(theirs), export, session, name="fuzz")
    client = trio.socket.from_stdlib_socket(ours)
    received = bytearray()

    async def send() -> None:
        pos = 0
        try:
            while pos < len(stream):
                n = rng.choice((1, 5, 28, 29, 512, 4096, 1 << 16, 1 << 20))
                pos += await client.send(stream[pos : pos + n])
                if rng.random() < 0.5:
                    await trio.sleep(0)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed: bad magic or DISC

    try:
        with trio.fail_after(_ENGINE_DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.serve)
                nursery.start_soon(send)
                while True:
                    try:
                        chunk = await client.recv(1 << 20)
                    except OSError:
                        break
                    if not chunk:
                        break
                    received += chunk
    except trio.TooSlowError:
        raise Violation("the request loop hung") from None
    finally:
        client.close()
        await export.aclose()
    return bytes(received)


_CHANGES = (nbdspec.WRITE, nbdspec.TRIM, nbdspec.WRITE_ZEROES)


class _Disk:
    """What the RAM disk must hold: bytes, and which of them a TRIM left unspecified."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.unknown = bytearray(size)  # 1 where a TRIM left the contents unspecified

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.unknown[offset : offset + len(data)] = bytes(len(data))

    def trim(self, offset: int, length: int) -> None:
        self.unknown[offset : offset + length] = b"\x01" * length

    def matches(self, offset: int, data: bytes) -> bool:
        end = offset + len(data)
        if self.data[offset:end] == data:
            return True
        unknown = self.unknown[offset:end]
        want = self.data[offset:end]
        return all(u or w == d for u, w, d in zip(unknown, want, data, strict=True))

    def zeros(self, offset: int, length: int) -> bool:
        return self.matches(offset, bytes(length))

    def matches_until(self, offset: int, data: bytes, later: list[nbdspec.Request]) -> bool:
        """Does ``data`` read at ``offset`` match the disk now, byte by byte, or as any of
        ``later`` (requests received after the read, in flight with it) leaves it?

        A read's reply may be sent after requests received later in the same batch have
        run (the device's data goes out as a view of its memory): the specification lets a
        server process requests in flight in any order, so a read overlapping a later write
        may see either, and the fuzzer accepts each byte as any value it takes meanwhile."""
        if self.matches(offset, data):
            return True
        end = offset + len(data)
        trimmed = bytearray(self.unknown[offset:end])
        values: list[set[int]] = [{v} for v in self.data[offset:end]]
        for req in later:
            lo, hi = max(req.offset, offset), min(req.offset + req.length, end)
            if lo >= hi:
                continue
            if req.command == nbdspec.WRITE and req.payload is not None:
                for p in range(lo, hi):
                    values[p - offset].add(req.payload[p - req.offset])
            elif req.command == nbdspec.WRITE_ZEROES:
                for p in range(lo, hi):
                    values[p - offset].add(0)
            elif req.command == nbdspec.TRIM:
                trimmed[lo - offset : hi - offset] = b"\x01" * (hi - lo)
        return all(t or d in v for t, d, v in zip(trimmed, data, values, strict=True))


def _judge_engine(model: nbdspec.SessionModel, stream: bytes, output: bytes) -> None:
    parsed = nbdspec.parse_requests(stream, model.max_payload)
    reader = nbdspec.ReplyReader(output)
    disk = _Disk(model.size)
    requests = parsed.requests
    for i, req in enumerate(parsed.requests):
        if req.command == nbdspec.DISC:
            requests = requests[:i]
            break
    for i, req in enumerate(requests):
        if reader.at_end():
            # Replies may be missing only where the stream broke off: after bad magic the
            # server drops the connection with what it had not sent yet; an oversized WRITE
            # whose payload never finished arriving is never answered.
            expect(
                parsed.stop == "bad-magic" or req.end > len(stream),
                f"no reply to {req}",
            )
            return
        later = [
            r
            for r in requests[i + 1 :]
            if r.command in _CHANGES
            and nbdspec.acceptable(model, r.command, r.flags, r.offset, r.length)
        ]
        _judge_one(model, req, reader, disk, later)
    expect(reader.at_end(), f"{len(output) - reader.pos} bytes of replies answer no request")


def _judge_unordered(model: nbdspec.SessionModel, stream: bytes, output: bytes) -> None:
    """Replies in any order, matched by (unique) cookie: each request answered once, with
    an error exactly when the spec says it must be refused, each reply well-formed. Reads
    are checked only where nothing in the stream writes (they read as zeros there): with
    requests in flight in threads, a read may see any write sent before or after it."""
    parsed = nbdspec.parse_requests(stream, model.max_payload)
    requests: dict[int, nbdspec.Request] = {}
    for sent in parsed.requests:
        if sent.command == nbdspec.DISC:
            break
        requests[sent.cookie] = sent
    changes = [r for r in requests.values() if r.command in _CHANGES]
    untouched = _Disk(model.size)

    def written(offset: int, length: int) -> bool:
        return any(r.offset < offset + length and offset < r.offset + r.length for r in changes)

    def read_length(cookie: int) -> int | None:
        req = requests.get(cookie)
        return req.length if req is not None and req.command == nbdspec.READ else None

    reader = nbdspec.ReplyReader(output)
    partial: dict[int, list[nbdspec.Chunk]] = {}
    answered: set[int] = set()
    while not reader.at_end():
        chunk = reader.next(read_length if not model.structured else None)
        req = requests.get(chunk.cookie)
        expect(req is not None, f"a reply for cookie {chunk.cookie}, which no request had")
        assert req is not None
        expect(chunk.cookie not in answered, f"{req} answered twice")
        if model.structured and req.command in (nbdspec.READ, nbdspec.BLOCK_STATUS):
            expect(chunk.structured, f"a simple reply to {req}")
            partial.setdefault(chunk.cookie, []).append(chunk)
            if not chunk.flags & nbdspec.REPLY_DONE:
                continue
            chunks = partial.pop(chunk.cookie)
            answered.add(chunk.cookie)
            allowed = nbdspec.acceptable(model, req.command, req.flags, req.offset, req.length)
            errors = [
                c for c in chunks if c.kind in (nbdspec.CHUNK_ERROR, nbdspec.CHUNK_ERROR_OFFSET)
            ]
            expect(bool(errors) != allowed, f"{req}: errors {errors} (allowed: {allowed})")
            if errors:
                continue
            if req.command == nbdspec.READ:
                fresh = not written(req.offset, req.length)
                _judge_read_chunks(req, chunks, untouched if fresh else None, [])
            else:
                _judge_extents(model, req, chunks, None)
            continue
        answered.add(chunk.cookie)
        _judge_simple(model, req, chunk)
        if chunk.error == 0 and req.command == nbdspec.READ and not written(req.offset, req.length):
            expect(chunk.data == bytes(req.length), f"{req}: never-written data is not zero")
    expect(not partial, f"structured replies without their final chunk: {sorted(partial)}")
    missing = [r for c, r in requests.items() if c not in answered]
    if parsed.stop != "bad-magic":
        # Only an oversized WRITE whose payload never finished arriving may go unanswered.
        expect(all(r.end > len(stream) for r in missing), f"no reply to {missing[:3]}")


def _judge_simple(model: nbdspec.SessionModel, req: nbdspec.Request, reply: nbdspec.Chunk) -> None:
    """A reply that is not a structured READ/BLOCK_STATUS: its error against the spec."""
    allowed = nbdspec.acceptable(model, req.command, req.flags, req.offset, req.length)
    if model.structured:
        expect(not reply.structured or reply.kind == nbdspec.CHUNK_ERROR, "structured reply")
        expect(reply.flags & nbdspec.REPLY_DONE or not reply.structured, "not DONE")
    fast_zero = req.command == nbdspec.WRITE_ZEROES and req.flags & nbdspec.F_FAST_ZERO
    if allowed and reply.error == nbdspec.ENOTSUP and fast_zero:
        return  # a device may decline a fast zero it cannot do
    expect((reply.error == 0) == allowed, f"{req} answered error {reply.error} ({allowed})")


def _judge_one(
    model: nbdspec.SessionModel,
    req: nbdspec.Request,
    reader: nbdspec.ReplyReader,
    disk: _Disk,
    later: list[nbdspec.Request],
) -> None:
    allowed = nbdspec.acceptable(model, req.command, req.flags, req.offset, req.length)
    if model.structured and req.command in (nbdspec.READ, nbdspec.BLOCK_STATUS):
        chunks = [reader.next()]
        while not chunks[-1].flags & nbdspec.REPLY_DONE:
            expect(chunks[-1].structured, "a simple reply among a structured reply's chunks")
            chunks.append(reader.next())
        for chunk in chunks:
            expect(chunk.structured, f"a simple reply to {req} after structured replies")
            expect(chunk.cookie == req.cookie, f"chunk for cookie {chunk.cookie} to {req}")
        errors = [c for c in chunks if c.kind in (nbdspec.CHUNK_ERROR, nbdspec.CHUNK_ERROR_OFFSET)]
        expect(bool(errors) != allowed, f"{req}: errors {errors} (allowed: {allowed})")
        if errors:
            return
        if req.command == nbdspec.READ:
            _judge_read_chunks(req, chunks, disk, later)
        else:
            _judge_extents(model, req, chunks, disk)
        return
    read_length = req.length if req.command == nbdspec.READ else None
    reply = reader.next(read_length)
    expect(reply.cookie == req.cookie, f"reply for cookie {reply.cookie} to {req}")
    _judge_simple(model, req, reply)
    if reply.error:
        return
    if req.command == nbdspec.READ:
        expect(disk.matches_until(req.offset, reply.data, later), f"{req}: read data differs")
    elif req.command == nbdspec.WRITE:
        assert req.payload is not None
        disk.write(req.offset, req.payload)
    elif req.command == nbdspec.WRITE_ZEROES:
        disk.write(req.offset, bytes(req.length))
    elif req.command == nbdspec.TRIM:
        disk.trim(req.offset, req.length)


def _judge_read_chunks(
    req: nbdspec.Request,
    chunks: list[nbdspec.Chunk],
    disk: _Disk | None,
    later: list[nbdspec.Request],
) -> None:
    """The chunks of a successful structured READ tile its range; their data is the disk's
    (not checked when ``disk`` is None)."""
    covered: list[tuple[int, int]] = []
    for chunk in chunks:
        if chunk.kind == nbdspec.CHUNK_NONE:
            continue
        expect(chunk.kind in (nbdspec.CHUNK_OFFSET_DATA, nbdspec.CHUNK_OFFSET_HOLE), "chunk type")
        length = len(chunk.data) if chunk.kind == nbdspec.CHUNK_OFFSET_DATA else chunk.length
        expect(
            req.offset <= chunk.offset and chunk.offset + length <= req.offset + req.length,
            f"chunk at {chunk.offset}+{length} outside {req}",
        )
        if disk is None:
            pass
        elif chunk.kind == nbdspec.CHUNK_OFFSET_DATA:
            expect(disk.matches_until(chunk.offset, chunk.data, later), f"{req}: data differs")
        else:
            zeros = bytes(length)
            expect(disk.matches_until(chunk.offset, zeros, later), f"{req}: a hole over data")
        covered.append((chunk.offset, length))
    if req.flags & nbdspec.F_DF:
        expect(len(covered) <= 1, f"{req}: DF read in {len(covered)} chunks")
    pos = req.offset
    for offset, length in sorted(covered):
        expect(offset == pos, f"{req}: chunks overlap or leave a gap at {pos}")
        pos += length
    expect(pos == req.offset + req.length, f"{req}: chunks cover up to {pos} only")


def _judge_extents(
    model: nbdspec.SessionModel,
    req: nbdspec.Request,
    chunks: list[nbdspec.Chunk],
    disk: _Disk | None,
) -> None:
    status = [c for c in chunks if c.kind == nbdspec.CHUNK_BLOCK_STATUS]
    expect(len(status) == 1, f"{req}: {len(status)} BLOCK_STATUS chunks for one context")
    chunk = status[0]
    expect(chunk.context_id == BASE_ALLOCATION_ID, f"context id {chunk.context_id}")
    expect(chunk.extents, "no extents")
    if req.flags & nbdspec.F_REQ_ONE:
        expect(len(chunk.extents) == 1, f"REQ_ONE answered with {len(chunk.extents)} extents")
        expect(chunk.extents[0][0] <= req.length, "REQ_ONE extent longer than asked")
    pos = req.offset
    for length, flags in chunk.extents:
        expect(length > 0 and not flags & ~3, f"extent ({length}, {flags})")
        expect(pos + length <= model.size, "extent past the end of the export")
        if flags & 2 and disk is not None:  # ZERO: every byte it covers must read as zero
            end = min(pos + length, req.offset + req.length)
            expect(pos >= end or disk.zeros(pos, end - pos), f"{req}: a ZERO extent over data")
        pos += length


TARGETS = {
    "handshake": handshake,
    "transmission": transmission,
    "engine": engine,
    "engine_file": engine_file,
}

__all__ = ["CONFIG_SIZE", "TARGETS", "Violation", "engine_config", "transmission_config"]
