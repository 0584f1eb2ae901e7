"""Run one fuzz target under atheris (libFuzzer): ``python fuzz/run.py TARGET [libFuzzer args]``.

TARGET is one of :data:`targets.TARGETS` (handshake, transmission, engine). The rest goes to
libFuzzer as it is: ``-runs=N``, ``-max_total_time=S``, ``-max_len=N``, corpus directories
(new inputs are written to the first one: give a scratch directory first and the committed
seeds after it) or single files to replay. Only usbd's code is instrumented for coverage.
A finding (any exception but ProtocolError, or a Violation) stops the run with the input
saved as ``crash-*`` (see ``-artifact_prefix``); replay it with the file as the only argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["usbd.core"]):
    import usbd.core._engine
    import usbd.core._handshake
    import usbd.core._transmission  # noqa: F401  (instrumented before targets imports them)

import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer args]")
    target = targets.TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
