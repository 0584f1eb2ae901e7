"""docs/objstore.md's quick start, run as written: the blocks after its
``<!-- objstore-quick-start: NAME -->`` markers are the commands, and the blocks marked
``NAME output`` what they must print.

The commands run in bash with two substitutions: ``.venv/bin/`` becomes this python's bin
directory, and ``/tmp/`` a fresh directory of the test's (so that runs never share a volume or
a socket). The daemon block is started once, stopped with SIGINT (Ctrl+C), and started again
for the "after a restart" block: the volume must come back from its objects alone (the
"after a stop" block shows that the cache is gone by then).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from quickstart import Daemon, shell, tools

DOC = Path(__file__).resolve().parent.parent / "docs" / "objstore.md"
MARKER = re.compile(r"<!-- objstore-quick-start: (.+?) -->\n```\n(.*?)```", re.DOTALL)
TIMEOUT = 60.0
#: A data object's generation (after the dot) depends on the order uploads started in.
GENERATION = re.compile(r"(/data/[0-9a-f]{8})\.[0-9a-f]{16}$")


def blocks() -> dict[str, str]:
    found = dict(MARKER.findall(DOC.read_text()))
    assert set(found) >= {
        "daemon",
        "daemon output",
        "client",
        "client output",
        "after a stop",
        "after a stop output",
        "after a restart",
        "after a restart output",
    }, sorted(found)
    return found


def test_the_quick_start_of_docs_objstore_md_runs_as_written(workdir: Path) -> None:
    tools("nbdinfo", "nbdcopy", "qemu-img")
    here = blocks()
    bindir = str(Path(sys.executable).parent)

    def local(text: str) -> str:
        # /tmp/ first: the venv may itself live under /tmp (CI's clone does).
        return text.replace("/tmp/", f"{workdir}/").replace(".venv/bin/", f"{bindir}/")

    daemon = Daemon(local(here["daemon"]), workdir / "daemon.log", "usbd-objstore")
    try:
        for line in local(here["daemon output"]).splitlines():
            assert line + "\n" in daemon.stdout, (line, daemon.report())
        printed = shell(local(here["client"]))
    finally:
        daemon.stop()
    # nbdinfo's report, then find's listing: every line the doc shows (generations aside,
    # and "..." standing for the data objects in between), and eight data objects.
    assert "export-size: 1073741824 (1G)" in printed
    listing = [GENERATION.sub(r"\1", line) for line in printed.splitlines()]
    for line in local(here["client output"]).splitlines():
        if line != "...":
            assert GENERATION.sub(r"\1", line) in listing, (line, printed)
    assert len([line for line in listing if "/objects/vol/data/" in line]) == 8, printed

    printed = shell(local(here["after a stop"]))
    assert printed.splitlines() == local(here["after a stop output"]).splitlines(), printed

    daemon = Daemon(local(here["daemon"]), workdir / "daemon-again.log", "usbd-objstore")
    try:
        printed = shell(local(here["after a restart"]))
    finally:
        daemon.stop()
    assert printed.splitlines() == local(here["after a restart output"]).splitlines(), printed
