"""usbd-objstore as a command: secrets in -objstore-cfg are never printed, and the startup line
says what the original's said (the store, the object size, the cache, compression, encryption,
the upload interval), with the secret key as <REDACTED>."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMAND = str(Path(sys.executable).with_name("usbd-objstore"))
SECRET = "hunter2-not-to-be-printed"


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_secret_in_a_bad_cfg_is_never_printed(tmp_path: Path) -> None:
    for cfg in (
        f'{{"secret_key": "{SECRET}", ',  # not JSON
        json.dumps({"secret_key": SECRET, "bukket": "x"}),  # an unknown key
        json.dumps({"secret_key": SECRET, "access_key_id": "k", "path_style": "yes"}),
        json.dumps({"secret_key": SECRET}),  # without its access key
    ):
        result = run(f"--store-dir={tmp_path}", f"--objstore-cfg={cfg}")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("usbd-objstore: error: -objstore-cfg: ")
        assert SECRET not in result.stdout + result.stderr
    help_text = run("--help").stdout
    assert "-objstore-cfg JSON" in help_text and SECRET not in help_text


def test_the_startup_line_describes_the_store_and_redacts_the_secret(tmp_path: Path) -> None:
    # The local kind, so no server is needed; the S3 cfg's secret goes through describe.
    process = subprocess.Popen(
        [
            COMMAND,
            "--objstore-kind=local",
            f"--store-dir={tmp_path}",
            "--store-name=vol",
            "--store-size=8MiB",
            "--attach=none",
            f"--listen={tmp_path}/s.sock",
            "--objstore-flushevery=2s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "s.sock").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    line = next(x for x in out.splitlines() if "using config:" in x)
    assert 'Exporting 8.0 MiB volume "vol"' in line
    assert f"a local object store ({tmp_path}/objects)" in line
    assert "with 1.0 MiB objects" in line and "zstd compression" in line
    assert f"aes-gcm encryption (key {tmp_path}/key.aes)" in line
    assert "uploading every 2s using 8 workers" in line
    assert "usbd-objstore terminated normally." in out
    # The S3 form: the secret is redacted, the rest shown.
    cfg = json.dumps(
        {
            "endpoint": "http://127.0.0.1:1",
            "bucket": "b",
            "access_key_id": "k",
            "secret_key": SECRET,
        }
    )
    result = run(f"--store-dir={tmp_path}", f"--objstore-cfg={cfg}", "--objstore-timeout=1s")
    assert result.returncode == 1
    assert "does not answer (s3://b at http://127.0.0.1:1)" in result.stderr
    assert SECRET not in result.stdout + result.stderr
