"""docs/dedup.md's quick start, run as written: the blocks after its
``<!-- dedup-quick-start: NAME -->`` markers are the commands, and the blocks marked
``NAME output`` what they must print.

The commands run in bash with two substitutions: ``.venv/bin/`` becomes this python's bin
directory, and ``/tmp/`` a fresh directory of the test's. The daemon block is started, the
client block run, the daemon stopped with SIGINT (Ctrl+C); then the stats and check blocks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from quickstart import Daemon, shell, tools

DOC = Path(__file__).resolve().parent.parent / "docs" / "dedup.md"
MARKER = re.compile(r"<!-- dedup-quick-start: (.+?) -->\n```\n(.*?)```", re.DOTALL)


def test_the_quick_start_of_docs_dedup_md_runs_as_written(workdir: Path) -> None:
    tools("nbdcopy")
    here = dict(MARKER.findall(DOC.read_text()))
    assert set(here) == {
        "daemon",
        "client",
        "stats",
        "stats output",
        "check",
        "check output",
    }, sorted(here)
    bindir = str(Path(sys.executable).parent)

    def local(text: str) -> str:
        # /tmp/ first: the venv may itself live under /tmp (CI's clone does).
        return text.replace("/tmp/", f"{workdir}/").replace(".venv/bin/", f"{bindir}/")

    daemon = Daemon(local(here["daemon"]), workdir / "daemon.log", "usbd-dedup")
    try:
        shell(local(here["client"]))
    finally:
        daemon.stop()
    printed = shell(local(here["stats"])).splitlines()
    # Every line the doc shows, in order; --stats adds what du shows of the data files.
    assert printed[:-1] == here["stats output"].splitlines(), printed
    assert re.fullmatch(r"allocated bytes: \d+", printed[-1]), printed
    # The data files hold one copy: 8 MiB, give or take the file system's rounding.
    assert abs(int(printed[-1].split()[-1]) - (8 << 20)) <= 1 << 20, printed
    printed = shell(local(here["check"])).splitlines()
    assert printed[-1:] == here["check output"].splitlines(), printed
