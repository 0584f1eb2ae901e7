"""fio's nbd engine (a libnbd client) against usbd-ramdisk, with crc32c verification.

fio writes blocks carrying a header and checksum and reads them back; any byte the server
loses, misplaces or mixes up between requests in flight fails the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ServerFactory

MiB = 1024 * 1024
Run = Callable[..., Any]


def _fio(tools: Run, uri: str, output: Path, *options: str, check: bool = True) -> Any:
    """Run fio with its JSON report in ``output``; return (process, report)."""
    proc = tools(
        "fio",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        f"--output={output}",
        *options,
        check=check,
        cwd=output.parent,  # fio writes *-verify.state files into its working directory
    )
    report = json.loads(output.read_text())
    return proc, report


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_randrw_verify_crc32c(
    transport: str, start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    server = start_server(transport, size=32 * MiB)
    jobs = 4
    _, report = _fio(
        tools,
        server.uri,
        tmp_path / "fio.json",
        "--name=usbd-randrw",
        "--rw=randrw",
        "--bsrange=4k-64k",
        f"--numjobs={jobs}",
        "--size=8M",  # each job owns its own 8 MiB slice of the 32 MiB disk
        "--offset_increment=8M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    )
    assert len(report["jobs"]) == jobs
    for job in report["jobs"]:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] > 0
        assert job["read"]["io_bytes"] > 0


def test_verify_in_a_later_run_and_detect_damage(
    start_server: ServerFactory, tools: Run, tmp_path: Path
) -> None:
    """Data written by one fio run verifies in another (new connections); after a block is
    overwritten behind fio's back, verification fails: the check is real."""
    server = start_server("unix", size=16 * MiB)
    common = [
        "--name=usbd-seq",
        "--rw=write",
        "--bs=16k",
        "--size=4M",
        "--offset=8M",
        "--iodepth=8",
        "--verify=crc32c",
    ]
    _fio(tools, server.uri, tmp_path / "write.json", *common, "--do_verify=0")
    _, report = _fio(tools, server.uri, tmp_path / "verify.json", *common, "--verify_only")
    assert report["jobs"][0]["error"] == 0
    assert report["jobs"][0]["read"]["io_bytes"] == 4 * MiB

    tools("qemu-io", "-f", "raw", "-c", "write -P 0 9M 16k", server.uri)
    proc, report = _fio(
        tools, server.uri, tmp_path / "bad.json", *common, "--verify_only", check=False
    )
    assert proc.returncode != 0
    assert report["jobs"][0]["error"] != 0
    assert f"offset {9 * MiB}" in proc.stdout + proc.stderr
