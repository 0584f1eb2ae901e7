"""The smoke of ``nox -s fuzz`` that CI runs (``nox -s fuzz_smoke``): about half a minute.

Each atheris target runs for a few thousand inputs from the committed seeds, in a
subprocess of its own (atheris instruments what it imports, which must not leak into this
process), then the network fuzzer runs a few hundred connections against a real
``usbd-ramdisk`` and a ``usbd-filedisk``. In-process, every committed seed replays through
its target without a finding, and each target is shown to catch a broken decoder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import capture  # noqa: E402
import nbdspec  # noqa: E402
import targets  # noqa: E402

from usbd.core import Handshake, _engine, _handshake  # noqa: E402
from usbd.core._transmission import RequestBuffer, simple_reply  # noqa: E402
from usbd.ramdisk import RamDisk  # noqa: E402

#: Inputs per target: a few seconds each here.
SMOKE_RUNS = {"handshake": 20_000, "transmission": 10_000, "engine": 1_000, "engine_file": 500}
#: Targets that start from another target's seeds (the same input format).
SEEDS = {"engine_file": "engine"}
SMOKE_CONNECTIONS = {"ramdisk": 400, "filedisk": 150}
SMOKE_CONCURRENCY = 16
CEILING = 300


def _missing(what: str) -> None:
    """Skip for lack of ``what`` on a developer's machine; fail in CI (as tests/conftest.py)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but is not installed", pytrace=False)
    pytest.skip(f"{what} is not installed")


def _seeds(kind: str) -> list[Path]:
    return sorted((HERE / "corpus" / kind).iterdir())


@pytest.mark.parametrize("target", list(SMOKE_RUNS))
def test_seeds_replay_cleanly(target: str) -> None:
    """Every committed seed (real client traffic) goes through its target with no finding."""
    seeds = _seeds(SEEDS.get(target, target))
    assert len(seeds) >= 10
    for seed in seeds:
        targets.TARGETS[target](seed.read_bytes())


@pytest.mark.parametrize("target", list(SMOKE_RUNS))
def test_target_smoke(target: str, tmp_path: Path) -> None:
    """A short atheris run from the seeds: no crash, no violation."""
    if importlib.util.find_spec("atheris") is None:
        _missing("atheris")
    argv = [
        sys.executable,
        str(HERE / "run.py"),
        target,
        f"-runs={SMOKE_RUNS[target]}",
        f"-dict={HERE / 'nbd.dict'}",
        "-max_len=65536",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path / "corpus"),
        str(HERE / "corpus" / SEEDS.get(target, target)),
    ]
    (tmp_path / "corpus").mkdir()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CEILING, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"Done {SMOKE_RUNS[target]} runs" in proc.stderr


@pytest.mark.parametrize("driver", list(SMOKE_CONNECTIONS))
def test_network_fuzzer_smoke(driver: str, tmp_path: Path) -> None:
    """Hostile connections against a real daemon; clean libnbd clients between batches."""
    if not os.path.exists("/usr/lib/python3/dist-packages/nbd.py"):
        _missing("python3-libnbd (the 'nbd' module)")
    connections = SMOKE_CONNECTIONS[driver]
    argv = [sys.executable, str(HERE / "netfuzz.py"), "--driver", driver, "--json"]
    argv += ["--connections", str(connections), "--batch", str(connections // 3 + 1)]
    argv += ["--concurrency", str(SMOKE_CONCURRENCY)]
    argv += ["--workdir", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=CEILING, check=False)
    assert proc.stdout, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, json.dumps(figures, indent=1)
    assert figures["connections"] == connections
    assert figures["checks"] == figures["batches"] >= 3
    assert figures["desyncs"] == figures["deaths"] == figures["server_errors"] == 0
    # Each connection may hold its in-flight budget (64 MiB) of replies its client does not
    # read; the rest is the interpreter, the disk and the allocator's slack.
    assert figures["peak_rss_mib"] < SMOKE_CONCURRENCY * 64 + 512, figures


# -- the targets catch what they are there to catch ------------------------------------------


def test_handshake_target_catches_a_bad_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option reply whose length field is off by one is a Violation."""
    real = _handshake._reply

    def off_by_one(option: int, reply: object, data: bytes = b"") -> bytes:
        return real(option, reply, data)[:-1] if data else real(option, reply, data)  # type: ignore[arg-type]

    seed = (HERE / "corpus" / "handshake" / "nbdinfo-list").read_bytes()
    targets.handshake(seed)
    monkeypatch.setattr(_handshake, "_reply", off_by_one)
    with pytest.raises(nbdspec.Violation):
        targets.handshake(seed)


def test_handshake_target_catches_split_dependence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that answers differently when an option arrives in pieces is caught."""
    real = Handshake.receive_data

    def forgetful(self: Handshake, data: bytes) -> bytes:
        if len(data) == 1:
            self._buffer.clear()  # drops what came before, but only when fed byte by byte
        return real(self, data)

    seed = (HERE / "corpus" / "handshake" / "nbdinfo").read_bytes()
    monkeypatch.setattr(Handshake, "receive_data", forgetful)
    with pytest.raises(nbdspec.Violation):
        targets.handshake(seed)


def test_transmission_target_catches_a_lax_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """check() letting through a FLUSH that was never advertised is a Violation."""
    flush = struct.pack(">IHHQQI", nbdspec.REQUEST_MAGIC, 0, nbdspec.FLUSH, 1, 0, 0)
    data = targets.transmission_config(structured=False, flags=0) + flush
    targets.transmission(data)
    monkeypatch.setattr(targets, "check", lambda *args: None)
    with pytest.raises(nbdspec.Violation):
        targets.transmission(data)


def test_transmission_target_catches_a_stale_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """A RequestBuffer handing out a WRITE payload from beyond what was received is caught."""
    real = RequestBuffer.pop

    def stale(self: RequestBuffer) -> object:
        request = real(self)
        if request is not None and request[5] is not None and len(request[5]) > 1:
            command, flags, cookie, offset, length, _ = request
            start = self._start - length
            return (
                command,
                flags,
                cookie,
                offset,
                length,
                self._view[start + 1 : start + 1 + length],
            )
        return request

    seed = (HERE / "corpus" / "transmission" / "libnbd").read_bytes()
    targets.transmission(seed)
    monkeypatch.setattr(RequestBuffer, "pop", stale)
    with pytest.raises(nbdspec.Violation):
        targets.transmission(seed)


def test_engine_target_catches_wrong_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that returns one wrong byte is caught through the real request loop."""
    real = RamDisk.read

    def corrupt(self: RamDisk, offset: int, length: int) -> bytes:
        data = bytearray(real(self, offset, length))
        data[-1] ^= 0x40
        return bytes(data)

    seed = (HERE / "corpus" / "engine" / "libnbd").read_bytes()
    targets.engine(seed)
    monkeypatch.setattr(RamDisk, "read", corrupt)
    with pytest.raises(nbdspec.Violation):
        targets.engine(seed)


def test_unordered_engine_target_catches_a_lost_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies matched by cookie: a reply that never comes is caught (usbd-filedisk)."""
    real = simple_reply
    lost: list[int] = []

    def drop_one(cookie: int, error: int = 0) -> bytes:
        if not lost:
            lost.append(cookie)
            return b""
        return real(cookie, error)

    seed = (HERE / "corpus" / "engine" / "libnbd").read_bytes()
    targets.engine_file(seed)
    monkeypatch.setattr(_engine, "simple_reply", drop_one)
    with pytest.raises(nbdspec.Violation):
        targets.engine_file(seed)


def test_capture_tool_splits_real_traffic() -> None:
    """The seeds' regeneration script finds the handshake's end the way the server does."""
    if shutil.which("nbdinfo") is None:
        _missing("the 'nbdinfo' program")
    seed = (HERE / "corpus" / "handshake" / "libnbd").read_bytes()
    handshake, rest, structured, base_allocation = capture.split(seed + b"tail")
    assert handshake == seed and rest == b"tail"
    assert structured and base_allocation
