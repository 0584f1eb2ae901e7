"""Progress of long work: log lines without a terminal, a bar with one, quiet when quick."""

from __future__ import annotations

import io
import logging
import threading

import pytest

from usbd.core.progress import Progress, progress

MiB = 1024 * 1024


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "usbd"]


def test_without_a_terminal_it_logs_lines_with_amount_total_and_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    with progress("uploading", 4 * MiB, unit="B", stream=io.StringIO(), every=0) as work:
        work.advance(MiB)
        work.advance(MiB)
    logged = lines(caplog)
    assert logged[0].startswith("uploading: 1.0 MiB of 4.0 MiB (25%), ")
    assert logged[0].endswith("/s")
    assert logged[1].startswith("uploading: 2.0 MiB of 4.0 MiB (50%)")
    assert logged[-1].startswith("uploading: done, 2.0 MiB in ")


def test_an_unknown_total_counts_items(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    with progress("listing objects", stream=io.StringIO(), every=0) as work:
        work.advance(1000)
        work.set_total(2000)
        work.advance(1000)
    logged = lines(caplog)
    assert logged[0].startswith("listing objects: 1000, ")
    assert logged[1].startswith("listing objects: 2000 of 2000 (100%)")
    assert logged[-1].startswith("listing objects: done, 2000 in ")


def test_quick_work_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    with progress("checking", 10, stream=io.StringIO()) as work:
        work.advance(10)
    assert lines(caplog) == []


def test_work_that_fails_ends_its_progress_as_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    with (
        pytest.raises(OSError, match="gone"),
        progress("uploading", 10, stream=io.StringIO(), every=0) as work,
    ):
        work.advance(1)
        raise OSError("gone")
    assert lines(caplog)[-1].startswith("uploading: stopped, 1 in ")


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    caplog.set_level(logging.INFO, logger="usbd")
    work = Progress("growing", 8 * MiB, unit="B", stream=out, bar=True, every=0)
    work.advance(4 * MiB)
    work.close()
    drawn = out.getvalue()
    assert "growing" in drawn
    assert "50%" in drawn
    assert lines(caplog) == []  # the work was quick


def test_advances_from_many_threads_add_up() -> None:
    work = Progress("uploading", stream=io.StringIO(), every=3600)
    threads = [
        threading.Thread(target=lambda: [work.advance(1) for _ in range(10_000)]) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    work.close()
    assert work.done == 40_000


def test_the_interval_is_read_when_the_work_starts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    monkeypatch.setattr("usbd.core.progress.LOG_EVERY", 0.0)
    with progress("growing", 2, stream=io.StringIO()) as work:
        work.advance()
    assert lines(caplog)[0].startswith("growing: 1 of 2 (50%)")


def test_on_a_terminal_quick_work_draws_no_bar() -> None:
    out = io.StringIO()
    work = Progress("listing objects", stream=out, bar=True)
    work.advance(3)
    work.close()
    assert "listing" not in out.getvalue()
