"""The per-driver part of the crash loops: how to start each persistent driver, and what
"persistent" means for it.

An :class:`Adapter` is the command line of a driver's real console script serving a unix
socket, the directory its state lives in (a restart reopens it; the loops watch the
daemon's descriptors for it to tell when its open has begun), and whether it offers
multi-conn. Nothing else differs between drivers: the loop, the writers, the kills and the
judge are shared (crash_harness.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The device every loop writes: 1024 blocks of 4 KiB, read back whole after each kill.
SIZE = 4 << 20
VOLUME = "vol"
HERE = Path(__file__).resolve().parent


def command(name: str) -> str:
    """A console script of the environment running the tests (nox's, or /work/venv)."""
    return str(Path(sys.executable).with_name(name))


@dataclass(frozen=True)
class Adapter:
    """One persistent driver as the loops see it.

    ``argv(workdir, socket)`` is the command serving the volume whose state is under
    ``workdir / "store"`` (the same state on every start); ``persistent`` says in a few
    words what survives a kill -9 and what a FLUSH makes durable there.
    """

    name: str
    persistent: str
    argv: Callable[[Path, Path], list[str]]
    multi_conn: bool = True
    #: Strings to leave out of failure reports (the S3 secret).
    secrets: tuple[str, ...] = field(default=())
    #: After a failed start: a description of the volume's state, for the report.
    diagnose: Callable[[], str] | None = None


def _common(workdir: Path, socket: Path) -> list[str]:
    return [
        "--listen", str(socket),
        "--store-dir", str(workdir / "store"),
        "--store-name", VOLUME,
        "--store-size", str(SIZE),
    ]  # fmt: skip


def filedisk() -> Adapter:
    return Adapter(
        "filedisk",
        "the file <store>/vol.bin; FLUSH is fdatasync",
        lambda workdir, socket: [command("usbd-filedisk"), *_common(workdir, socket)],
    )


def dedup() -> Adapter:
    return Adapter(
        "dedup",
        "the block files and LevelDB index in <store>/vol.dedup; FLUSH syncs the data, then "
        "commits the index in one synced batch; the open after a kill checks the volume",
        lambda workdir, socket: [command("usbd-dedup"), *_common(workdir, socket)],
    )


#: Small objects and a round every 0.2 s, as the driver's own crash tests: uploads are under
#: way much of the time.
OBJSTORE_FLAGS = [
    "--objstore-objsize", "64KiB",
    "--objstore-flushevery", "0.2",
    "--objstore-timeout", "10s",
    "--objstore-persistcache",
]  # fmt: skip


def objstore(cfg: dict[str, Any], client: Any = None) -> Adapter:
    """usbd-objstore on the S3 bucket ``cfg`` names (a real SeaweedFS), with its persistent
    local cache; ``client`` (boto3's, for that server) lets a failure report show the
    bucket's manifest and lease as stored."""

    def diagnose() -> str:
        if client is None:
            return ""
        lines = [f"the bucket {cfg['bucket']} as stored:"]
        for key in (f"{VOLUME}/manifest", f"{VOLUME}/lease"):
            try:
                answer = client.get_object(Bucket=cfg["bucket"], Key=key)
                body = answer["Body"].read()
            except Exception as exc:
                lines.append(f"  {key}: GET failed: {exc}")
                continue
            lines.append(
                f"  {key}: {len(body)} bytes (Content-Length {answer.get('ContentLength')}), "
                f"ETag {answer.get('ETag')}, modified {answer.get('LastModified')}, "
                f"starts {body[:48]!r}"
            )
        return "\n".join(lines)

    return Adapter(
        "objstore",
        "the persistent local cache in <store>/vol.cache (FLUSH makes it durable there; "
        "uploads to the SeaweedFS bucket follow)",
        lambda workdir, socket: [
            command("usbd-objstore"),
            *_common(workdir, socket),
            *("--objstore-kind", "s3", "--objstore-cfg", json.dumps(cfg)),
            *OBJSTORE_FLAGS,
        ],
        secrets=(str(cfg.get("secret_key", "")),),
        diagnose=diagnose,
    )


def writeback_filedisk(flush: str) -> Adapter:
    """The test-only write-back file disk (writeback_filedisk.py): ``sound`` writes its
    buffer out on FLUSH, ``broken`` only when it closes, so a FLUSH makes nothing durable."""
    script = str(HERE / "writeback_filedisk.py")
    return Adapter(
        f"writeback-filedisk-{flush}",
        "the file, behind a write buffer in the daemon's memory that FLUSH writes out"
        + (" (or, broken, does not)" if flush == "broken" else ""),
        lambda workdir, socket: [sys.executable, script, flush, *_common(workdir, socket)],
    )
