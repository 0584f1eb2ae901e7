"""docs/operations.md: its metrics reference is generated from the code and must match it; its
example Prometheus configuration and alert rules must pass Prometheus' own checks, and the
rules must fire (and only then) on the series the daemons really expose."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from usbd.core.driver import discover_drivers

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "operations.md"
#: A ceiling, not an expectation.
TIMEOUT = 120.0
Require = Callable[[str], str]


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_operations", DOCS / "gen_operations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker -->`` in the page."""
    found = re.search(rf"<!-- {marker} -->\n```yaml\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert found, f"no yaml block after <!-- {marker} --> in {PAGE.name}"
    return found.group(1)


def promtool(require: Require, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [require("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_metrics_reference_matches_the_code() -> None:
    text = PAGE.read_text()
    assert _generator().generate(text) == text, (  # type: ignore[attr-defined]
        "docs/operations.md is out of date: run python docs/gen_operations.py"
    )


def test_the_reference_names_every_drivers_figures() -> None:
    """Belt and braces: every installed driver's declared metric is in the page."""
    text = PAGE.read_text()
    declared = [
        metric.exposed_name(found.driver.name)
        for found in discover_drivers()
        if found.driver is not None
        for metric in found.driver.metrics
    ]
    assert len(declared) >= 10
    for name in declared:
        assert f"`{name}`" in text, name


def test_the_example_configuration_and_rules_pass_promtool(
    tmp_path: Path, require: Require
) -> None:
    (tmp_path / "prometheus.yml").write_text(block("prometheus-config"))
    (tmp_path / "usbd-rules.yml").write_text(block("prometheus-rules"))
    promtool(require, "check", "config", "prometheus.yml", cwd=tmp_path)  # loads the rules too
    out = promtool(require, "check", "rules", "usbd-rules.yml", cwd=tmp_path)
    found = re.search(r"SUCCESS: (\d+) rules found", out)
    assert found, out
    assert int(found.group(1)) >= 6


#: promtool's unit tests of the rules: series as a daemon exposes them, and what must fire.
RULE_TESTS = """\
rule_files:
  - usbd-rules.yml
evaluation_interval: 1m
tests:
  # Dirty bytes that stay up while nothing is uploaded: the alert fires after 30 min more.
  - interval: 1m
    input_series:
      - series: 'usbd_objstore_dirty_bytes{instance="a",job="usbd"}'
        values: '4194304x90'
      - series: 'usbd_objstore_uploaded_bytes_total{instance="a",job="usbd"}'
        values: '1048576x90'
      # Another daemon whose uploads progress: never alerts, whatever its dirty bytes.
      - series: 'usbd_objstore_dirty_bytes{instance="b",job="usbd"}'
        values: '4194304x90'
      - series: 'usbd_objstore_uploaded_bytes_total{instance="b",job="usbd"}'
        values: '0+1048576x90'
      - series: 'up{instance="a",job="usbd"}'
        values: '1x90'
      - series: 'usbd_request_errors_total{instance="a",job="usbd",errno="EINVAL",export=""}'
        values: '0+5x90'
      - series: 'usbd_request_errors_total{instance="a",job="usbd",errno="EIO",export=""}'
        values: '0+1x90'
    alert_rule_test:
      - eval_time: 20m
        alertname: UsbdObjstoreDirtyBytesNotFalling
        exp_alerts: []
      - eval_time: 75m
        alertname: UsbdObjstoreDirtyBytesNotFalling
        exp_alerts:
          - exp_labels:
              instance: a
              job: usbd
            exp_annotations:
              summary: "a: 4.194304e+06 dirty bytes and no upload for 30 min"
      - eval_time: 75m
        alertname: UsbdDown
        exp_alerts: []
      # EIO alerts; EINVAL (clients' mistakes) does not.
      - eval_time: 30m
        alertname: UsbdRequestErrors
        exp_alerts:
          - exp_labels:
              instance: a
              errno: EIO
            exp_annotations:
              summary: "a: requests fail with EIO"
"""


def test_the_example_rules_fire_when_they_should(tmp_path: Path, require: Require) -> None:
    (tmp_path / "usbd-rules.yml").write_text(block("prometheus-rules"))
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    out = promtool(require, "test", "rules", "tests.yml", cwd=tmp_path)
    assert "SUCCESS" in out
