"""AES key sources (key:, env:, file:, the generated default); no key in any message."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbd.core._keys import KeySourceError, check_key_spec, describe_key_spec, load_key

# Distinct, non-zero keys of each accepted size.
KEYS = {size: bytes(range(1, size + 1)) for size in (16, 24, 32)}
SECRET_HEX = "5ec2e7" * 10 + "abcd"  # 64 digits, easy to spot in a message
SECRET = bytes.fromhex(SECRET_HEX)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- key: ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_key_spec_each_size(size: int, tmp_path: Path) -> None:
    key = KEYS[size]
    assert load_key(f"key:{key.hex()}", tmp_path) == key
    assert not (tmp_path / "key.aes").exists()  # an explicit key generates nothing


def test_key_spec_ignores_case_and_whitespace(tmp_path: Path) -> None:
    spaced = " ".join(SECRET_HEX[i : i + 8].upper() for i in range(0, 64, 8))
    assert load_key(f"  KEY: {spaced}\n", tmp_path) == SECRET
    assert check_key_spec(f"Key:{spaced}") == f"key:{SECRET_HEX}"


@pytest.mark.parametrize("digits", [0, 2, 30, 31, 33, 34, 40, 62, 66, 96, 128])
def test_key_spec_wrong_length(digits: int, tmp_path: Path) -> None:
    value = ("7" * digits) if digits else ""
    for call in (
        lambda: check_key_spec(f"key:{value}"),
        lambda: load_key(f"key:{value}", tmp_path),
    ):
        with pytest.raises(KeySourceError) as info:
            call()
        message = str(info.value)
        assert "expected 32, 48 or 64 hex digits (16, 24 or 32 bytes)" in message
        assert f"got {digits} characters" in message
        if value:
            assert value not in message


def test_key_spec_not_hex_never_echoed() -> None:
    value = SECRET_HEX[:62] + "zq"
    with pytest.raises(KeySourceError, match="not hex digits") as info:
        check_key_spec(f"key:{value}")
    assert value[:8] not in str(info.value)
    assert "zq" not in str(info.value)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_key_spec_all_zero_refused(size: int, tmp_path: Path) -> None:
    spec = "key:" + "00" * size
    with pytest.raises(KeySourceError, match="all zeros"):
        check_key_spec(spec)
    with pytest.raises(KeySourceError, match="all zeros"):
        load_key(spec, tmp_path)


# --- env: ---------------------------------------------------------------------------------------


def test_env_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USBD_TEST_KEY", f" {SECRET_HEX.upper()}\n")
    assert load_key("env:USBD_TEST_KEY", tmp_path) == SECRET
    monkeypatch.setenv("USBD_TEST_KEY", KEYS[24].hex())
    assert load_key("env: USBD_TEST_KEY ", tmp_path) == KEYS[24]


def test_env_spec_unset_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USBD_TEST_KEY", raising=False)
    with pytest.raises(KeySourceError) as info:
        load_key("env:USBD_TEST_KEY", tmp_path)
    assert str(info.value) == "env:USBD_TEST_KEY: environment variable USBD_TEST_KEY is not set"


@pytest.mark.parametrize("value", ["5ec2e7ab12", SECRET_HEX + "ab", SECRET_HEX[:60] + "wxyz", ""])
def test_env_spec_bad_value_never_echoed(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USBD_KEY", value)
    with pytest.raises(KeySourceError) as info:
        load_key("env:USBD_KEY", tmp_path)
    message = str(info.value)
    assert message.startswith("env:USBD_KEY: expected 32, 48 or 64 hex digits (16, 24 or 32 bytes)")
    if value:
        assert value[:6] not in message
        assert value[-4:] not in message
    if value == "5ec2e7ab12":  # the brief's example, verbatim
        assert message == (
            "env:USBD_KEY: expected 32, 48 or 64 hex digits (16, 24 or 32 bytes), got 10 characters"
        )


def test_env_spec_all_zero_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USBD_KEY", "0" * 64)
    with pytest.raises(KeySourceError, match=r"^env:USBD_KEY: the key is all zeros"):
        load_key("env:USBD_KEY", tmp_path)


# --- file: --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_file_spec_raw(size: int, tmp_path: Path) -> None:
    path = tmp_path / "raw.key"
    path.write_bytes(KEYS[size])
    assert load_key(f"file:{path}", tmp_path / "store") == KEYS[size]


@pytest.mark.parametrize("size", [16, 24, 32])
def test_file_spec_hex(size: int, tmp_path: Path) -> None:
    path = tmp_path / "hex.key"
    path.write_text(f"\n  {KEYS[size].hex().upper()}\r\n")
    assert load_key(f"file:{path}", tmp_path) == KEYS[size]


def test_file_spec_hex_without_newline(tmp_path: Path) -> None:
    # 48 and 64 characters are not key sizes, so unterminated hex of those lengths is hex.
    path = tmp_path / "hex.key"
    for size in (24, 32):
        path.write_text(KEYS[size].hex())
        assert load_key(f"file:{path}", tmp_path) == KEYS[size]


def test_file_of_32_hex_digits_is_raw_but_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="usbd")
    path = tmp_path / "ambiguous.key"
    digits = KEYS[16].hex()
    path.write_text(digits)  # 32 bytes: by the rule, a raw AES-256 key
    assert load_key(f"file:{path}", tmp_path) == digits.encode()
    assert "used as a raw 32-byte key" in caplog.text
    assert digits not in caplog.text


def test_file_spec_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "k").write_bytes(KEYS[24])
    monkeypatch.chdir(tmp_path)
    assert load_key("file:sub/k", tmp_path / "elsewhere") == KEYS[24]


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "got 0 hex digits"),
        (bytes(range(1, 21)), "got 20 bytes, not all hex"),
        (b"5ec2e7ab12\n", "got 10 hex digits"),
        ((SECRET_HEX + "ab\n").encode(), "got 66 hex digits"),
        (b"\xff\xfe" + SECRET[:30] + b"\x00", "got 33 bytes, not all hex"),
        (b"7" * 5000, "got more than 4096 bytes"),
    ],
)
def test_file_spec_bad_content(content: bytes, found: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeySourceError) as info:
        load_key(f"file:{path}", tmp_path)
    message = str(info.value)
    assert message.startswith(f"file:{path}: expected a file of exactly 16, 24 or 32 raw bytes")
    assert found in message
    assert "5ec2e7" not in message
    assert "\\x" not in message  # no byte of the file quoted
    assert "\n" not in message


@pytest.mark.parametrize("content", [bytes(16), bytes(32), b"00" * 24 + b"\n"])
def test_file_spec_all_zero_refused(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "zero.key"
    path.write_bytes(content)
    with pytest.raises(KeySourceError, match="all zeros"):
        load_key(f"file:{path}", tmp_path)


def test_file_spec_missing_names_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeySourceError) as info:
        load_key(f"file:{path}", tmp_path)
    assert str(info.value) == f"file:{path}: cannot open key file: No such file or directory"


def test_file_spec_unreadable_names_path_and_reason(tmp_path: Path) -> None:
    # A directory opens but cannot be read, whoever runs the test (root included).
    with pytest.raises(KeySourceError) as info:
        load_key(f"file:{tmp_path}", tmp_path)
    assert str(info.value) == f"file:{tmp_path}: cannot read key file: Is a directory"


# --- the generated default ----------------------------------------------------------------------


def test_default_is_generated_private_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usbd")
    key = load_key(None, tmp_path)
    path = tmp_path / "key.aes"
    assert len(key) == 32
    assert any(key)
    assert path.read_bytes() == key  # stored raw
    assert _mode(path) == 0o600
    assert [r.getMessage() for r in caplog.records] == [
        f'Generated AES-256 key and stored it in "{path}"'
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["key.aes"]  # no temporary left behind

    caplog.clear()
    assert load_key("", tmp_path) == key
    assert load_key("  ", str(tmp_path)) == key
    assert caplog.records == []  # neither generated again nor warned about


def test_default_mode_is_0600_whatever_the_umask(tmp_path: Path, umask: None) -> None:
    os.umask(0o377)  # would leave a plain O_CREAT file at 0400
    load_key(None, tmp_path)
    assert _mode(tmp_path / "key.aes") == 0o600


def test_default_existing_file_is_read_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "key.aes"
    path.write_bytes(KEYS[16])
    path.chmod(0o600)
    assert load_key(None, tmp_path) == KEYS[16]
    assert path.read_bytes() == KEYS[16]


def test_default_existing_hex_file(tmp_path: Path) -> None:
    path = tmp_path / "key.aes"
    path.write_text(SECRET_HEX + "\n")
    path.chmod(0o600)
    assert load_key(None, tmp_path) == SECRET


def test_default_lost_race_reads_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process creates key.aes between our look and our create: its key wins."""
    caplog.set_level(logging.INFO, logger="usbd")
    path = tmp_path / "key.aes"
    real_link = os.link

    def link_after_rival(src: str, dst: str) -> None:
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, KEYS[32])
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_rival)
    assert load_key(None, tmp_path) == KEYS[32]
    assert path.read_bytes() == KEYS[32]
    assert "Generated" not in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["key.aes"]


def test_default_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Filesystems without hard links get key.aes created in place, still O_EXCL and 0600."""
    caplog.set_level(logging.INFO, logger="usbd")

    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    key = load_key(None, tmp_path)
    path = tmp_path / "key.aes"
    assert path.read_bytes() == key
    assert _mode(path) == 0o600
    assert "Generated AES-256 key" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["key.aes"]


def test_default_missing_store_dir(tmp_path: Path) -> None:
    store = tmp_path / "absent"
    with pytest.raises(KeySourceError) as info:
        load_key(None, store)
    message = str(info.value)
    assert message.startswith(f"key file {store / 'key.aes'}: cannot create key file: ")
    assert "No such file or directory" in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_default_readable_by_others_warns(
    mode: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="usbd")
    path = tmp_path / "key.aes"
    path.write_bytes(KEYS[32])
    path.chmod(mode)
    assert load_key(None, tmp_path) == KEYS[32]  # warned about, not refused
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage()
    assert f"{mode:04o}" in record.getMessage()
    assert "group or others" in record.getMessage()


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_default_private_does_not_warn(
    mode: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="usbd")
    path = tmp_path / "key.aes"
    path.write_bytes(KEYS[32])
    path.chmod(mode)
    assert load_key(None, tmp_path) == KEYS[32]
    assert caplog.records == []


# --- check_key_spec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "normalised"),
    [
        (None, None),
        ("", None),
        (" \n", None),
        (f"KEY: {SECRET_HEX.upper()} ", f"key:{SECRET_HEX}"),
        ("file: /nonexistent/dir/k.aes ", "file:/nonexistent/dir/k.aes"),
        ("File:relative/k", "file:relative/k"),
        ("env:USBD_SURELY_UNSET_VARIABLE", "env:USBD_SURELY_UNSET_VARIABLE"),
    ],
)
def test_check_key_spec_normalises_without_io(spec: str | None, normalised: str | None) -> None:
    # Neither the file nor the variable exists: check_key_spec must not look.
    assert "USBD_SURELY_UNSET_VARIABLE" not in os.environ
    assert check_key_spec(spec) == normalised


def test_check_key_spec_does_not_touch_the_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_key_spec did I/O")

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "stat", refuse)
    assert check_key_spec("file:/etc/shadow-like") == "file:/etc/shadow-like"
    assert check_key_spec(None) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("foo:bar", "unknown key source 'foo:'"),
        ("aes:" + SECRET_HEX, "unknown key source 'aes:'"),
        (SECRET_HEX, "invalid AES key spec: expected key:<hex>"),  # a pasted bare key
        ("1234abcd:" + SECRET_HEX, "invalid AES key spec: expected key:<hex>"),
        ("file:", "file: needs a path"),
        ("file:   ", "file: needs a path"),
        ("env:", "env: needs an environment variable name"),
        ("env:A=B", "env: needs an environment variable name"),
    ],
)
def test_check_key_spec_rejects(spec: str, expected: str, tmp_path: Path) -> None:
    for call in (lambda: check_key_spec(spec), lambda: load_key(spec, tmp_path)):
        with pytest.raises(KeySourceError) as info:
            call()
        message = str(info.value)
        assert expected in message
        assert "key:<hex>, file:<path> or env:<VAR>" in message or "needs" in message
        assert SECRET_HEX[:8] not in message
        assert "1234abcd" not in message
        assert "\n" not in message
    assert not (tmp_path / "key.aes").exists()


def test_key_source_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_key_spec("nope")


# --- describe_key_spec --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "described"),
    [
        (f"key:{SECRET_HEX}", "key:<REDACTED>"),
        (f"KEY:{SECRET_HEX}", "key:<REDACTED>"),
        ("key:not even hex", "key:<REDACTED>"),
        ("file:/etc/usbd/k.aes", "file:/etc/usbd/k.aes"),
        ("env:USBD_KEY", "env:USBD_KEY"),
        (SECRET_HEX, "<invalid key spec>"),
        ("aes:" + SECRET_HEX, "<invalid key spec>"),
        (None, "/store/key.aes"),
        ("", "/store/key.aes"),
    ],
)
def test_describe_key_spec(spec: str | None, described: str) -> None:
    assert describe_key_spec(spec, "/store") == described
    assert describe_key_spec(spec, Path("/store")) == described
