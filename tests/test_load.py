"""Load (issue 14, section 3): many connections at once, many clients doing verified I/O.

Against a real ``usbd-ramdisk`` process over its unix socket:

* 1,000 connections opened at once: each is served (GO answered, and later a write read
  back) or cleanly refused (the connection limit's ERR_POLICY with its reason, or, beyond
  the refusals under way, closed before a word): nothing else, no reset, no hang. The
  daemon logs the refusals rate-limited: a few lines, not hundreds.
* 100 clients doing verified I/O together (10 s here; a minute in the slow run), each on a
  region of its own, every read compared with a model of what it wrote; no error.
* 100 clients that announce a 32 MiB WRITE, send 1 MiB of it and stop: the daemon holds
  about what they sent, and serves others meanwhile.

The daemons come from the ``start_server`` fixture (tests/conftest.py), which also insists
on a clean stop. Every test measures the daemon's resident set from /proc and bounds its
growth generously: a server that kept a zero-filled 4 MiB buffer per connection (as this
one once did) would take over a GiB in the first test. The figures are printed (run with
``-s`` to see them).
"""

from __future__ import annotations

import os
import random
import re
import resource
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from usbd.core.testing import NbdClient

MiB = 1 << 20
SIZE = 64 * MiB
CONNECTIONS = 1000
LIMIT = 256  # the daemon's default --max-connections
CLIENTS = 100
#: Ceilings, not expectations.
CEILING = 300.0

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_OPT_GO, _OPT_ABORT = 7, 2
_REP_ACK, _REP_ERR_POLICY = 1, (1 << 31) + 2


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for a few thousand descriptors in this process (1,000 sockets at once)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if wanted < CONNECTIONS + 100:
        pytest.fail(f"RLIMIT_NOFILE's hard limit {hard} is below {CONNECTIONS + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Outcomes:
    served: list[trio.SocketStream] = field(default_factory=list)
    refused_with_reason: int = 0
    closed_at_once: int = 0
    other: list[str] = field(default_factory=list)


async def _recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = await stream.receive_some(n - len(data))
        if not more:
            raise EOFError(len(data))
        data += more
    return data


async def _one(path: str, outcomes: Outcomes, everyone: trio.Event) -> None:
    """Connect and ask for the export; record how it went; hold a served connection open
    until every connection has its outcome."""
    stream = await trio.open_unix_socket(path)
    try:
        try:
            greeting = await _recv_exactly(stream, 18)
        except EOFError as exc:
            if exc.args[0] == 0:
                outcomes.closed_at_once += 1
            else:
                outcomes.other.append(f"greeting cut after {exc.args[0]} bytes")
            await stream.aclose()
            return
        magic, opt, _ = struct.unpack(">QQH", greeting)
        assert (magic, opt) == (_NBDMAGIC, _IHAVEOPT)
        go = struct.pack(">IH", 0, 0)
        await stream.send_all(
            struct.pack(">I", 3) + struct.pack(">QII", _IHAVEOPT, _OPT_GO, 6) + go
        )
        while True:
            _, _, reply, length = struct.unpack(">QIII", await _recv_exactly(stream, 20))
            message = await _recv_exactly(stream, length)
            if reply == _REP_ACK:
                outcomes.served.append(stream)
                await everyone.wait()
                return
            if reply == _REP_ERR_POLICY:
                assert b"too many connections" in message
                outcomes.refused_with_reason += 1
                await stream.send_all(struct.pack(">QII", _IHAVEOPT, _OPT_ABORT, 0))
                await stream.aclose()
                return
            if reply & (1 << 31):
                outcomes.other.append(f"option reply {reply:#x}: {message!r}")
                await stream.aclose()
                return
    except (trio.BrokenResourceError, EOFError, OSError) as exc:
        outcomes.other.append(f"{type(exc).__name__}: {exc}")
        await stream.aclose()


async def _verify(stream: trio.SocketStream, index: int) -> None:
    """One write and read back on a served connection (it is in the transmission phase)."""
    offset = index * 4096
    data = os.urandom(4096)
    header = struct.pack(">IHHQQI", 0x25609513, 0, 1, index, offset, len(data))
    await stream.send_all(header + data)
    magic, error, cookie = struct.unpack(">IIQ", await _recv_exactly(stream, 16))
    assert (magic, error, cookie) == (0x67446698, 0, index)
    await stream.send_all(struct.pack(">IHHQQI", 0x25609513, 0, 0, index, offset, len(data)))
    magic, error, cookie = struct.unpack(">IIQ", await _recv_exactly(stream, 16))
    assert (magic, error, cookie) == (0x67446698, 0, index)
    assert await _recv_exactly(stream, len(data)) == data
    await stream.send_all(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # DISC
    await stream.aclose()


async def test_a_thousand_connections_at_once_are_served_or_cleanly_refused(
    many_files: None, start_server: Any
) -> None:
    server = start_server("unix", size=SIZE)
    try:
        assert server.socket_path is not None
        base = _status(server.process.pid)["VmRSS"]
        outcomes = Outcomes()
        everyone = trio.Event()
        with trio.fail_after(CEILING):
            async with trio.open_nursery() as nursery:
                for _ in range(CONNECTIONS):
                    nursery.start_soon(_one, server.socket_path, outcomes, everyone)
                while (
                    len(outcomes.served)
                    + outcomes.refused_with_reason
                    + outcomes.closed_at_once
                    + len(outcomes.other)
                    < CONNECTIONS
                ):
                    await trio.sleep(0.05)
                held = _status(server.process.pid)
                everyone.set()
            async with trio.open_nursery() as nursery:
                for index, stream in enumerate(outcomes.served):
                    nursery.start_soon(_verify, stream, index)
        peak = _status(server.process.pid)["VmHWM"]
        refused = outcomes.refused_with_reason + outcomes.closed_at_once
        print(
            f"\nload: {CONNECTIONS} connections at once: {len(outcomes.served)} served, "
            f"{refused} refused ({outcomes.refused_with_reason} with the reason, "
            f"{outcomes.closed_at_once} closed at once); daemon RSS {base / MiB:.0f} MiB "
            f"before, {held['VmRSS'] / MiB:.0f} MiB with them all open, peak "
            f"{peak / MiB:.0f} MiB"
        )
        assert outcomes.other == []
        assert len(outcomes.served) == LIMIT  # the limit, exactly: all at once
        assert refused == CONNECTIONS - LIMIT
        assert outcomes.refused_with_reason > 0
        # 256 connections held: a few hundred KiB each at most (Python objects, a page or
        # two of buffer). A zero-filled 4 MiB buffer each would be over 1 GiB.
        assert peak - base < 256 * MiB
    finally:
        server.stop()
    log = server.log()
    refusal_lines = [line for line in log.splitlines() if "refused:" in line]
    assert len(refusal_lines) <= 10, "refusals flooded the log"
    assert re.search(r"\d+ more refused connections in the last \d+ s", log), log[-2000:]


async def _worker(
    path: str, index: int, region: int, until: float, counts: list[int], errors: list[str]
) -> None:
    """Random writes and reads (512 B to 64 KiB) in a region of its own, each read checked
    against a model of what this client wrote."""
    rng = random.Random(index)
    base = index * region
    model = bytearray(region)
    stream = await trio.open_unix_socket(path)
    client = await NbdClient.handshake(stream)
    try:
        while trio.current_time() < until:
            length = rng.choice((512, 4096, 16384, 65536))
            offset = rng.randrange(0, region - length + 1) // 512 * 512
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                await client.write(base + offset, data)
                model[offset : offset + length] = data
            else:
                got = await client.read(base + offset, length)
                if got != model[offset : offset + length]:
                    errors.append(f"client {index}: bad data at {base + offset}+{length}")
                    return
            counts[index] += 1
        await client.flush()
        whole = await client.read(base, region)
        if whole != model:
            errors.append(f"client {index}: region differs at the end")
    finally:
        await client.disconnect()


@pytest.mark.parametrize(
    "seconds", [10, pytest.param(60, marks=pytest.mark.slow)], ids=["short", "minute"]
)
async def test_a_hundred_clients_doing_verified_io_together(
    seconds: int, start_server: Any
) -> None:
    server = start_server("unix", size=SIZE)
    try:
        assert server.socket_path is not None
        base = _status(server.process.pid)["VmRSS"]
        region = SIZE // CLIENTS // 4096 * 4096
        counts = [0] * CLIENTS
        errors: list[str] = []
        samples: list[int] = []
        with trio.fail_after(seconds + CEILING):
            until = trio.current_time() + seconds
            async with trio.open_nursery() as nursery:
                for index in range(CLIENTS):
                    nursery.start_soon(
                        _worker, server.socket_path, index, region, until, counts, errors
                    )
                while trio.current_time() < until:
                    samples.append(_status(server.process.pid)["VmRSS"])
                    await trio.sleep(1)
        peak = _status(server.process.pid)["VmHWM"]
        total = sum(counts)
        print(
            f"\nload: {CLIENTS} clients for {seconds} s: {total} verified requests "
            f"({total / seconds:.0f}/s), errors {len(errors)}; daemon RSS {base / MiB:.0f} "
            f"MiB before, at most {max(samples) / MiB:.0f} MiB sampled, peak {peak / MiB:.0f} MiB"
        )
        assert errors == []
        assert all(counts), "a client made no progress"
        # The data is at most SIZE (the ramdisk's); the rest must not grow with the run.
        assert peak - base < SIZE + 256 * MiB
    finally:
        server.stop()


async def test_clients_stalled_mid_payload_hold_what_they_sent(
    many_files: None, start_server: Any
) -> None:
    """100 clients each announce a 32 MiB WRITE, send 1 MiB of it and stop: the daemon
    holds about what arrived (100 MiB), not what was announced (3.2 GiB)."""
    stalled, sent = 100, MiB
    server = start_server("unix", size=SIZE)
    try:
        assert server.socket_path is not None
        base = _status(server.process.pid)["VmRSS"]
        streams = []
        with trio.fail_after(CEILING):
            for index in range(stalled):
                stream = await trio.open_unix_socket(server.socket_path)
                client = await NbdClient.handshake(stream)  # leaves the stream to us
                header = struct.pack(">IHHQQI", 0x25609513, 0, 1, index, 0, 32 * MiB)
                await stream.send_all(header + os.urandom(sent))
                streams.append((client, stream))
            await trio.sleep(1)  # let the daemon take in what was sent
            held = _status(server.process.pid)["VmRSS"]
            for client, _ in streams:
                await client.aclose()
            fresh = await NbdClient.handshake(await trio.open_unix_socket(server.socket_path))
            await fresh.write(0, b"still serving")
            assert await fresh.read(0, 13) == b"still serving"
            await fresh.disconnect()
        print(
            f"\nload: {stalled} clients stalled {sent // MiB} MiB into 32 MiB WRITEs: daemon "
            f"RSS {base / MiB:.0f} MiB before, {held / MiB:.0f} MiB while they stall"
        )
        assert held - base < stalled * 4 * MiB
    finally:
        server.stop()
