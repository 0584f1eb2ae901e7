"""Sessions for the usbd monorepo: ``nox`` runs lint, each package's tests, integration and kernel.

Each package's unit tests run in an environment that holds only that package and what it
declares, so an undeclared import fails here rather than on a user's machine. Slow cases
(``@pytest.mark.slow``) are deselected by the shared pytest configuration unless a session is
given ``-- -m slow`` or the ``slow`` session runs them.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "integration", "slow", "kernel", "fuzz_smoke"]
nox.options.error_on_missing_interpreters = True

#: Each package with the local packages it needs installed alongside it (in order).
PACKAGES: dict[str, list[str]] = {
    "usbd-core": ["./packages/usbd-core[testing]"],
    "usbd-ramdisk": ["./packages/usbd-core[testing]", "./packages/usbd-ramdisk"],
    "usbd-filedisk": ["./packages/usbd-core[testing]", "./packages/usbd-filedisk"],
    "usbd-objstore": ["./packages/usbd-core[testing]", "./packages/usbd-objstore[test]"],
    "usbd-dedup": ["./packages/usbd-core[testing]", "./packages/usbd-dedup[test]"],
    "usbdsrvd": [
        "./packages/usbd-core[testing]",
        "./packages/usbd-ramdisk",
        "./packages/usbdsrvd",
    ],
}
ALL = [
    "./packages/usbd-core[testing]",
    "./packages/usbd-ramdisk",
    "./packages/usbd-filedisk",
    "./packages/usbd-objstore[test]",
    "./packages/usbd-dedup[test]",
    "./packages/usbdsrvd",
]


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("pytest", "--import-mode=importlib", *session.posargs, *paths)


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Unit tests of one package, installed alone (not editable) with its declared deps."""
    session.install(*PACKAGES[package])
    _pytest(session, f"packages/{package}/tests")


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests against real NBD clients (nbdinfo, nbdcopy, libnbd, qemu, fio)."""
    session.install(*ALL)
    _pytest(session, "--ignore=tests/kernel", "tests")


@nox.session
def slow(session: nox.Session) -> None:
    """Only the cases marked slow, across every package and tests/."""
    session.install(*ALL)
    session.run(
        "pytest",
        "--import-mode=importlib",
        "-m",
        "slow",
        *session.posargs,
        *(f"packages/{package}/tests" for package in PACKAGES),
        "--ignore=tests/kernel",
        "tests",
    )


@nox.session(default=False)
def crash(session: nox.Session) -> None:
    """The long kill -9 loops (``@pytest.mark.crash``): minutes each, so not in CI's run,
    which has their short variants. Among them tests/crash's, 100 cycles for each persistent
    driver, whose figures (cycles, kills during FLUSH and startup, blocks verified, losses)
    end the output. ``nox -s crash -- -k dedup`` for one driver's."""
    session.install(*ALL)
    session.run(
        "pytest",
        "--import-mode=importlib",
        "-m",
        "crash",
        *session.posargs,
        *(f"packages/{package}/tests" for package in PACKAGES),
        "tests/crash",
    )


@nox.session
def kernel(session: nox.Session) -> None:
    """Tests inside a real Linux kernel with nbd.ko, in QEMU VMs (tests/kernel/vm.py).

    The only session that runs tests/kernel, so it runs all of it, slow cases included
    (``-m ""``; a ``-m`` among the posargs still wins). The guest runs this session's python.
    """
    session.install(*ALL)
    session.run("pytest", "--import-mode=importlib", "-m", "", *session.posargs, "tests/kernel")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) everywhere; mypy strict on the packages."""
    session.install("ruff", "mypy", "types-tqdm", *ALL)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run(
        "mypy",
        "packages/usbd-core/src/usbd/core",
        "packages/usbd-ramdisk/src/usbd/ramdisk",
        "packages/usbd-filedisk/src/usbd/filedisk",
        "packages/usbd-objstore/src/usbd/objstore",
        "packages/usbd-dedup/src/usbd/dedup",
        "packages/usbdsrvd/src/usbd/srvd",
    )


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """fio over NBD: usbd against nbdkit (C memory plugin and a Python plugin), as ratios."""
    session.install(*ALL)
    session.run("python", "bench/run.py", *session.posargs)


#: What the fuzzers need: the core, the two drivers the network fuzzer runs, and atheris
#: (coverage-guided, libFuzzer's engine; its wheel carries libFuzzer, no clang needed).
FUZZ = [
    "./packages/usbd-core[testing]",
    "./packages/usbd-ramdisk",
    "./packages/usbd-filedisk",
    "atheris",
]


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """The long fuzzing campaign (fuzz/campaign.py): 10^6 inputs to each sans-IO decoder,
    10^5 to the request loop, 10^5 hostile connections to usbd-ramdisk and 2*10^4 to
    usbd-filedisk; prints the figures, exits 1 on any finding. Options after ``--`` go to
    the campaign (``-- --handshake 10000 --connections 1000`` for a shorter one)."""
    session.install(*FUZZ)
    session.run("python", "fuzz/campaign.py", *session.posargs)


@nox.session
def fuzz_smoke(session: nox.Session) -> None:
    """The fuzzers briefly (fuzz/test_fuzz_smoke.py, about 30 s): each target for a few
    thousand inputs, a few hundred hostile connections per driver, every seed replayed."""
    session.install(*FUZZ)
    _pytest(session, "fuzz")
