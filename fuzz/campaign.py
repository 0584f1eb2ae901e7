"""The fuzzing campaign: every decoder target, then the network fuzzer, and the figures.

``python fuzz/campaign.py`` (what ``nox -s fuzz`` runs) runs each atheris target of
``targets.py`` for its number of inputs, from the committed seeds in ``fuzz/corpus`` (new
inputs go to a scratch corpus under ``--workdir``, never into the committed one), then
``netfuzz.py`` against a ``usbd-ramdisk`` and a ``usbd-filedisk`` process, and prints the
figures: inputs run, crashes and the files that hold them, connections, desyncs, peak RSS.
A target that finds something is restarted for the rest of its inputs, so one finding does
not end the campaign; the exit status is 1 if anything was found.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
#: libFuzzer options per target: longest input, and a per-input ceiling (a hang is a finding).
OPTIONS = {
    "handshake": ["-max_len=8192", "-timeout=30"],
    "transmission": ["-max_len=65536", "-timeout=30"],
    "engine": ["-max_len=65536", "-timeout=60"],
    "engine_file": ["-max_len=65536", "-timeout=60"],
}
#: Targets that start from another target's seeds (the same input format).
SEEDS = {"engine_file": "engine"}
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"Done (\d+) runs")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
#: Restarts of one target after findings before the campaign gives up on it.
MAX_RESTARTS = 20


def fuzz_target(name: str, runs: int, workdir: Path, log: Path) -> dict[str, object]:
    """Run target ``name`` for ``runs`` inputs, restarting after each finding."""
    corpus = workdir / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    done = 0
    findings: list[str] = []
    started = time.monotonic()
    for _ in range(MAX_RESTARTS + 1):
        if done >= runs:
            break
        argv = [
            sys.executable,
            str(HERE / "run.py"),
            name,
            f"-runs={runs - done}",
            f"-dict={HERE / 'nbd.dict'}",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-",
            *OPTIONS[name],
            str(corpus),
            str(HERE / "corpus" / SEEDS.get(name, name)),
        ]
        before = set(artifacts.iterdir())
        with log.open("a") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
        text = log.read_text(errors="replace")
        tail = text[text.rfind("INFO: Running with") :] if "INFO: Running with" in text else text
        executed = _EXECUTED.findall(tail) or _DONE.findall(tail) or _PROGRESS.findall(tail)
        done += int(executed[-1]) if executed else 0
        new = sorted(str(p) for p in set(artifacts.iterdir()) - before)
        if proc.returncode != 0:
            findings += new or [f"exit status {proc.returncode} (see {log})"]
            if not executed:
                break  # it cannot even start: do not spin
        elif not executed:
            break
    return {
        "target": name,
        "inputs": done,
        "seconds": round(time.monotonic() - started, 1),
        "findings": findings,
        "corpus": len(list(corpus.iterdir())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshake", type=int, default=1_000_000, help="inputs")
    parser.add_argument("--transmission", type=int, default=1_000_000, help="inputs")
    parser.add_argument("--engine", type=int, default=100_000, help="inputs")
    parser.add_argument("--engine-file", type=int, default=50_000, help="inputs")
    parser.add_argument("--connections", type=int, default=100_000, help="network, per driver")
    parser.add_argument("--filedisk-connections", type=int, default=None, help="default: 1/5")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="usbd-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"campaign: working in {workdir}", flush=True)
    results: list[dict[str, object]] = []
    for name in ("handshake", "transmission", "engine", "engine_file"):
        runs = getattr(args, name)
        if runs > 0:
            result = fuzz_target(name, runs, workdir, workdir / f"{name}.log")
            print(json.dumps(result), flush=True)
            results.append(result)
    network: list[dict[str, object]] = []
    filedisk = args.filedisk_connections
    if filedisk is None:
        filedisk = args.connections // 5
    for driver, connections in (("ramdisk", args.connections), ("filedisk", filedisk)):
        if connections <= 0:
            continue
        argv = [sys.executable, str(HERE / "netfuzz.py"), "--driver", driver]
        argv += ["--connections", str(connections), "--workdir", str(workdir / driver), "--json"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        sys.stderr.write(proc.stderr[-4000:])
        lines = proc.stdout.strip().splitlines()
        try:
            figures = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            figures = {"driver": driver, "error": f"netfuzz exited {proc.returncode}"}
        print(json.dumps(figures), flush=True)
        network.append(figures)
    found = _summary(results, network)
    sys.exit(1 if found else 0)


def _summary(results: list[dict[str, object]], network: list[dict[str, object]]) -> bool:
    decoder_inputs = sum(int(str(r["inputs"])) for r in results)
    crashes = sum(len(cast(list[str], r["findings"])) for r in results)
    print("\n== fuzzing figures ==")
    for r in results:
        print(
            f"{r['target']:>13}: {r['inputs']:>9} inputs in {r['seconds']} s, "
            f"{len(r['findings'])} findings, corpus {r['corpus']}"  # type: ignore[arg-type]
        )
        for finding in r["findings"]:  # type: ignore[attr-defined]
            print(f"               finding: {finding}")
    print(f"decoder inputs: {decoder_inputs}, crashes/violations: {crashes}")
    bad = crashes > 0
    for n in network:
        if "error" in n:
            print(f"network {n['driver']}: {n['error']}")
            bad = True
            continue
        print(
            f"network {n['driver']}: {n['connections']} connections in {n['batches']} batches "
            f"({n['seconds']} s), clean checks {n['checks']}, desyncs {n['desyncs']}, "
            f"daemon deaths {n['deaths']}, server errors {n['server_errors']}, "
            f"peak RSS {n['peak_rss_mib']} MiB (after the last batch {n['last_rss_mib']} MiB, "
            f"first {n['first_rss_mib']} MiB), log lines {n['log_lines']}"
        )
        bad = bad or bool(n["desyncs"] or n["deaths"] or n["server_errors"])
    return bad


if __name__ == "__main__":
    main()
