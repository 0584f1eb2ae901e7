"""Regenerate the seed corpora from real client traffic: ``python fuzz/capture.py``.

A recording proxy sits between real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io,
nbd-client, python3-libnbd) and a ``usbd-ramdisk`` process; it relays both ways and keeps
what each client sent. Each connection's bytes are split where the handshake ends (the
sans-IO :class:`Handshake` finds the point, and what was negotiated) into:

* ``corpus/handshake/<client>``: the client's handshake stream (what it sent before the
  transmission phase, or everything when it never got there);
* ``corpus/transmission/<client>``: a transmission-target input (its configuration header,
  with structured replies and base:allocation as negotiated, then the request stream);
* ``corpus/engine/<client>``: the same stream for the engine target.

Request streams are cut at a request boundary after :data:`MAX_SEED` bytes to keep the
files small. The kernel speaks only the transmission phase over a socketpair, so its
traffic cannot be captured this way without a VM; ``kernel-*`` seeds are synthesised instead
from what drivers/block/nbd.c sends (see :func:`kernel_streams`), and ``starttls-*`` ones
because what follows STARTTLS is ciphertext on the wire (see :func:`tls_handshakes`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nbdspec  # noqa: E402
import targets  # noqa: E402

from usbd.core import Handshake, ProtocolError  # noqa: E402

#: A request stream is cut at the first request boundary past this many bytes.
MAX_SEED = 32 * 1024
#: The capture disk: as large as the engine target's, so the clients' offsets stay in range.
DISK_SIZE = targets.ENGINE_SIZE
EXPORT = "fuzz"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


class Recorder:
    """A unix-socket proxy to ``upstream`` that records what each client sends."""

    def __init__(self, listen: str, upstream: str) -> None:
        self.upstream = upstream
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(listen)
        self.sock.listen(16)
        self.streams: list[bytes] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(self.upstream)
        sent = bytearray()
        open_ends = {client: server, server: client}
        try:
            while open_ends:
                ready, _, _ = select.select(list(open_ends), [], [], 30)
                if not ready:
                    break
                for end in ready:
                    try:
                        data = end.recv(1 << 20)
                    except OSError:
                        data = b""
                    other = open_ends[end]
                    if not data:
                        del open_ends[end]
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                        continue
                    if end is client:
                        sent += data
                    with contextlib.suppress(OSError):
                        other.sendall(data)
        finally:
            client.close()
            server.close()
            with self._lock:
                self.streams.append(bytes(sent))

    def take(self) -> list[bytes]:
        """The streams of every connection so far (waiting for open ones to end)."""
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        with self._lock:
            streams, self.streams = self.streams, []
        return streams

    def close(self) -> None:
        self.sock.close()


def split(stream: bytes) -> tuple[bytes, bytes | None, bool, bool]:
    """(handshake part, transmission part or None, structured, base_allocation)."""
    hs = Handshake(targets.EXPORTS, targets.DEFAULT_EXPORT)
    try:
        hs.receive_data(stream)
    except ProtocolError:
        return stream, None, False, False
    if not hs.finished or hs.result is None:
        return stream, None, False, False
    cut = len(stream) - len(hs.leftover)
    result = hs.result
    return stream[:cut], hs.leftover, result.structured_replies, result.base_allocation


def trim_requests(stream: bytes, max_payload: int = 32 * 1024 * 1024) -> bytes:
    """``stream`` cut at the first request boundary past :data:`MAX_SEED` bytes."""
    end = 0
    for request in nbdspec.iter_requests(stream, max_payload):
        end = request.end
        if end > MAX_SEED:
            break
    return stream[:end] if end else stream[:MAX_SEED]


# -- the clients --------------------------------------------------------------------------


def _run(*argv: str, stdin: bytes | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        print(f"  ({' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-300:]})")


def clients(sock: str, scratch: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, run) for each client session to record; each makes one or more connections."""
    uri = f"nbd+unix:///{EXPORT}?socket={sock}"
    image = scratch / "image.raw"
    rng = random.Random(14)
    data = bytearray(DISK_SIZE)
    for i in range(0, DISK_SIZE, 16384):  # data, zeros and text: something for each path
        if i % 49152 == 0:
            data[i : i + 8192] = rng.randbytes(8192)
        elif i % 49152 == 16384:
            data[i : i + 4096] = b"usbd fuzz seed " * 273 + b"u"
    image.write_bytes(bytes(data))
    out = scratch / "out.raw"
    yield "nbdinfo", lambda: _run("nbdinfo", uri)
    yield "nbdinfo-list", lambda: _run("nbdinfo", "--list", uri)
    yield "nbdinfo-map", lambda: _run("nbdinfo", "--map", uri)
    yield "nbdinfo-content", lambda: _run("nbdinfo", "--content", "--map=base:allocation", uri)
    yield "nbdcopy-in", lambda: _run("nbdcopy", "--request-size=16384", str(image), uri)
    yield "nbdcopy-out", lambda: _run("nbdcopy", uri, str(out))
    yield "nbdcopy-flush", lambda: _run("nbdcopy", "--flush", "--target-is-zero", str(image), uri)
    yield "qemu-img-info", lambda: _run("qemu-img", "info", uri)
    yield (
        "qemu-img-convert-in",
        lambda: _run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri),
    )
    yield (
        "qemu-img-convert-out",
        lambda: _run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)),
    )
    qemu_io = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -z 64k 64k",
        "discard 128k 64k",
        "write -f -P 0x11 4096 4096",
        "aio_write -P 0x22 8192 512",
        "aio_read 0 4096",
        "aio_flush",
        "flush",
        "read 255k 1k",
    ]
    yield (
        "qemu-io",
        lambda: _run("qemu-io", "-f", "raw", *(a for c in qemu_io for a in ("-c", c)), uri),
    )
    yield "nbd-client-list", lambda: _run("nbd-client", "-l", "-u", sock)
    yield (
        "nbd-client",
        lambda: _run("nbd-client", "-N", EXPORT, "-u", sock, "/dev/nbd15", "-nofork"),
    )
    yield "libnbd", lambda: _libnbd(uri, structured=True)
    yield "libnbd-simple", lambda: _libnbd(uri, structured=False)
    yield "libnbd-opt", lambda: _libnbd_options(uri)


def _nbd() -> Any:
    """python3-libnbd's ``nbd`` module, which Debian installs outside any virtualenv."""
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    return importlib.import_module("nbd")


def _libnbd(uri: str, *, structured: bool) -> None:
    """Every command python3-libnbd can send, with their flags."""
    nbd = _nbd()
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    h.pwrite(b"\x5a" * 4096, 0)
    h.pwrite(b"libnbd" * 100, 5000, nbd.CMD_FLAG_FUA)
    h.pread(4096, 0)
    if structured:
        h.pread_structured(65536 * 2, 0, lambda *args: 0, nbd.CMD_FLAG_DF)
        h.pread_structured(65536 * 2, 0, lambda *args: 0)
        h.block_status(65536, 0, lambda *args: 0)
        h.block_status(65536, 4096, lambda *args: 0, nbd.CMD_FLAG_REQ_ONE)
    h.zero(8192, 65536)
    h.zero(4096, 131072, nbd.CMD_FLAG_NO_HOLE)
    with contextlib.suppress(nbd.Error):
        h.zero(4096, 196608, nbd.CMD_FLAG_FAST_ZERO)
    h.trim(65536, 131072)
    if h.can_cache():
        h.cache(4096, 0)
    h.flush()
    cookies = [h.aio_pwrite(bytes([i]) * 512, i * 512) for i in range(16)]
    cookies += [h.aio_pread(nbd.Buffer(512), i * 1024) for i in range(16)]
    pending = set(cookies)
    while pending:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(-1)
    h.shutdown()


def _libnbd_options(uri: str) -> None:
    """The option haggling libnbd's opt mode can do."""
    nbd = _nbd()
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_list(lambda name, description: 0)
    h.opt_info()
    h.opt_list_meta_context(lambda name: 0)
    with contextlib.suppress(nbd.Error):
        h.set_export_name("no-such-export")
        h.opt_info()
    h.set_export_name(EXPORT)
    h.opt_abort()


# -- the kernel -----------------------------------------------------------------------------


def _kernel_request(command: int, tag: int, offset: int, length: int, flags: int = 0) -> bytes:
    # nbd.c: the cookie is the blk-mq tag in the low 32 bits and a per-command counter above.
    cookie = (tag + 1) << 32 | tag
    return struct.pack(">IHHQQI", nbdspec.REQUEST_MAGIC, flags, command, cookie, offset, length)


def kernel_streams() -> dict[str, bytes]:
    """Request streams as the Linux nbd driver sends them (drivers/block/nbd.c):
    simple replies only, no handshake; offsets and lengths whole 512-byte sectors
    (blk_rq_pos << 9, blk_rq_bytes) in the device's block size; READ, WRITE with its data,
    FLUSH with offset and length 0, TRIM, WRITE_ZEROES (NO_HOLE for REQ_NOUNMAP), FUA on
    REQ_FUA writes, and several tags in flight; DISC at the end."""
    rng = random.Random(1)
    streams = {}
    for name, block in (("kernel-1k", 1024), ("kernel-4k", 4096)):
        out = bytearray()
        for tag in range(48):
            choice = rng.random()
            offset = rng.randrange(0, DISK_SIZE // block) * block
            length = min(rng.choice((1, 2, 8, 32)) * block, DISK_SIZE - offset)
            if choice < 0.35:
                out += _kernel_request(nbdspec.READ, tag, offset, length)
            elif choice < 0.7:
                fua = nbdspec.F_FUA if rng.random() < 0.2 else 0
                out += _kernel_request(nbdspec.WRITE, tag, offset, length, fua)
                out += rng.randbytes(length)
            elif choice < 0.8:
                out += _kernel_request(nbdspec.FLUSH, tag, 0, 0)
            elif choice < 0.9:
                out += _kernel_request(nbdspec.TRIM, tag, offset, length)
            else:
                nohole = nbdspec.F_NO_HOLE if rng.random() < 0.5 else 0
                out += _kernel_request(nbdspec.WRITE_ZEROES, tag, offset, length, nohole)
        out += _kernel_request(nbdspec.DISC, 0, 0, 0)
        streams[name] = bytes(out)
    return streams


def tls_handshakes() -> dict[str, bytes]:
    """Handshakes through STARTTLS, as libnbd and qemu send them to a TLS server (the bytes
    after STARTTLS travel inside TLS, so a capture shows only ciphertext there): the fuzz
    target takes the TLS handshake to succeed and feeds the rest as what came through it."""

    def option(opt: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", nbdspec.IHAVEOPT, opt, len(data)) + data

    name = EXPORT.encode()
    go = option(nbdspec.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 15) + b"base:allocation"
    flags = struct.pack(">I", nbdspec.FIXED_NEWSTYLE | nbdspec.NO_ZEROES)
    return {
        "starttls-go": flags
        + option(nbdspec.OPT_STARTTLS)
        + option(nbdspec.OPT_STRUCTURED_REPLY)
        + option(nbdspec.OPT_SET_META, meta)
        + go,
        "starttls-late": flags
        + option(nbdspec.OPT_STRUCTURED_REPLY)
        + option(nbdspec.OPT_LIST)
        + option(nbdspec.OPT_STARTTLS)
        + option(nbdspec.OPT_STARTTLS)
        + option(nbdspec.OPT_EXPORT_NAME, name),
    }


# -- writing the corpora -----------------------------------------------------------------


def write_seed(corpus: Path, kind: str, name: str, data: bytes) -> None:
    directory = corpus / kind
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def save(corpus: Path, name: str, stream: bytes) -> None:
    handshake, transmission, structured, base_allocation = split(stream)
    if handshake:
        write_seed(corpus, "handshake", name, handshake)
    if transmission:
        requests = trim_requests(transmission)
        header = targets.transmission_config(
            structured=structured, base_allocation=base_allocation, size=1
        )
        write_seed(corpus, "transmission", name, header + requests)
        engine = targets.engine_config(structured=structured, base_allocation=base_allocation)
        write_seed(corpus, "engine", name, engine + requests)


def capture(corpus: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="usbd-capture-", dir="/tmp"))
    upstream, proxy = str(scratch / "usbd.sock"), str(scratch / "proxy.sock")
    argv = [sys.executable, "-m", "usbd.ramdisk", "--listen", upstream]
    argv += ["--store-size", str(DISK_SIZE), "--export-name", EXPORT]
    argv += ["--description", "usbd fuzzing"]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            if " is serving " in line:
                break
        recorder = Recorder(proxy, upstream)
        for name, run in clients(proxy, scratch):
            print(f"capturing {name}")
            run()
            for i, stream in enumerate(recorder.take()):
                save(corpus, name if i == 0 else f"{name}-{i}", stream)
        recorder.close()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    for name, stream in tls_handshakes().items():
        write_seed(corpus, "handshake", name, stream)
    for name, stream in kernel_streams().items():
        header = targets.transmission_config(structured=False, size=1)
        write_seed(corpus, "transmission", name, header + trim_requests(stream))
        engine = targets.engine_config(structured=False)
        write_seed(corpus, "engine", name, engine + trim_requests(stream))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus")
    args = parser.parse_args()
    if shutil.which("nbdinfo") is None:
        sys.exit("capture.py needs the Debian clients: libnbd-bin, qemu-utils, nbd-client")
    capture(args.corpus)
    for kind in ("handshake", "transmission", "engine"):
        files = list((args.corpus / kind).iterdir())
        total = sum(f.stat().st_size for f in files)
        print(f"{kind}: {len(files)} seeds, {total} bytes")


if __name__ == "__main__":
    main()
