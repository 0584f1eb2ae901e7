"""Where an encrypting driver gets its AES key (``-objstore-aeskey``), and how it is kept secret.

A key spec is one of:

* ``key:<hex>`` -- the key itself, as 32, 48 or 64 hex digits (AES-128, -192 or -256);
* ``env:<VAR>`` -- an environment variable holding such hex;
* ``file:<path>`` -- a file holding the key: exactly 16, 24 or 32 bytes is the raw key, anything
  else must be hex (surrounding whitespace, such as a trailing newline, is ignored);
* empty (or None) -- the default file ``<store_dir>/key.aes``, generated on first use.

Why these formats: ``key:`` and ``env:`` are text typed into a shell or a unit file, and an
environment variable cannot hold a NUL byte, so they carry hex. Files can hold anything, so a file
of exactly a key's size is taken as raw bytes. The generated default file is written raw (32 bytes
from :func:`secrets.token_bytes`): it is never meant to be typed, and raw bytes cannot be confused
with a shorter hex key.

Why the care when generating it: the key protects everything the driver stores, so the file is
born with mode 0600 (``O_CREAT | O_EXCL`` with that mode, never created first and chmod-ed later)
and published under its final name only once complete (written to a private temporary name, fsynced,
then hard-linked into place, which fails instead of overwriting if another process won the race; the
loser reads the winner's key). The directory is fsynced too, so a crash cannot lose a key that data
was already encrypted with. An existing default file that group or others can read is used but
warned about.

Secrets are never printed: errors name the source (``key:``, the variable, the file) and the
length found, never the key or any part of it, and :func:`describe_key_spec` redacts ``key:``.
All-zero keys are refused; they are what an unset or zero-filled buffer looks like.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets

__all__ = ["KeySourceError", "check_key_spec", "describe_key_spec", "load_key"]

log = logging.getLogger("usbd")

DEFAULT_KEY_FILE = "key.aes"
_KEY_SIZES = (16, 24, 32)
_GENERATED_SIZE = 32
_MAX_FILE_SIZE = 4096  # far above any key; stops a wrong path from reading a disk image
_HEX = re.compile(r"[0-9a-fA-F]*")
_SHORT_WORD = re.compile(r"[A-Za-z]{1,10}")
_ACCEPTED_SPECS = "expected key:<hex>, file:<path> or env:<VAR> (or nothing, for the default file)"
_ACCEPTED_HEX = "expected 32, 48 or 64 hex digits (16, 24 or 32 bytes)"
_ACCEPTED_FILE = "expected a file of exactly 16, 24 or 32 raw bytes, or of 32, 48 or 64 hex digits"


class KeySourceError(ValueError):
    """A key spec that is malformed, or a key source that cannot be read or holds no usable key.

    The message is one line and never contains key material.
    """


def check_key_spec(spec: str | None) -> str | None:
    """The normalised form of ``spec`` (None for the default file), checked without any I/O.

    Meant for settings validation: an unknown prefix, an empty ``file:``/``env:`` name and a
    ``key:`` of bad hex, wrong length or all zeros fail here; whether a file or variable exists is
    only known to :func:`load_key`.
    """
    parsed = _parse(spec)
    if parsed is None:
        return None
    kind, value = parsed
    if kind == "key":
        key = _decode_hex(value, "key:")
        return "key:" + key.hex()
    return f"{kind}:{value}"


def load_key(spec: str | None, store_dir: str | os.PathLike[str]) -> bytes:
    """The key ``spec`` names; for an empty spec, ``<store_dir>/key.aes``, generated if absent."""
    parsed = _parse(spec)
    if parsed is None:
        return _load_default(os.path.join(os.fspath(store_dir), DEFAULT_KEY_FILE))
    kind, value = parsed
    if kind == "key":
        return _decode_hex(value, "key:")
    if kind == "env":
        text = os.environ.get(value)
        if text is None:
            raise KeySourceError(f"env:{value}: environment variable {value} is not set")
        return _decode_hex(text, f"env:{value}:")
    label = f"file:{value}:"
    try:
        fd = os.open(value, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeySourceError(f"{label} cannot open key file: {_reason(exc)}") from None
    return _read_key_fd(fd, label)


def describe_key_spec(spec: str | None, store_dir: str | os.PathLike[str]) -> str:
    """``spec`` fit for logs and status output: ``key:<REDACTED>``, ``file:/p``, ``env:NAME``,
    or the default file's path. Never raises, and never shows key material, even when malformed.
    """
    text = (spec or "").strip()
    if not text:
        return os.path.join(os.fspath(store_dir), DEFAULT_KEY_FILE)
    prefix, colon, value = text.partition(":")
    kind = prefix.lower()
    if colon and kind == "key":
        return "key:<REDACTED>"
    if colon and kind in ("file", "env"):
        return f"{kind}:{value.strip()}"
    return "<invalid key spec>"


def _parse(spec: str | None) -> tuple[str, str] | None:
    """(kind, value) for a spec, None for the default; raises for what no source could accept."""
    text = (spec or "").strip()
    if not text:
        return None
    prefix, colon, value = text.partition(":")
    kind = prefix.lower()
    if not colon or kind not in ("key", "file", "env"):
        # The spec may be a pasted key: echo at most a short alphabetic prefix.
        shown = ""
        if colon and _SHORT_WORD.fullmatch(prefix):
            shown = f"unknown key source {prefix + ':'!r}: "
        raise KeySourceError(f"invalid AES key spec: {shown}{_ACCEPTED_SPECS}")
    if kind == "key":
        return kind, value
    value = value.strip()
    if not value:
        what = "a path" if kind == "file" else "an environment variable name"
        raise KeySourceError(f"invalid AES key spec: {kind}: needs {what}; {_ACCEPTED_SPECS}")
    if kind == "env" and ("=" in value or "\0" in value):
        raise KeySourceError(
            "invalid AES key spec: env: needs an environment variable name (no '=' or NUL in it)"
        )
    return kind, value


def _decode_hex(text: str, label: str) -> bytes:
    """Key bytes from hex (whitespace anywhere ignored, any case); messages never quote ``text``."""
    digits = "".join(text.split())
    if not _HEX.fullmatch(digits):
        raise KeySourceError(f"{label} {_ACCEPTED_HEX}, got characters that are not hex digits")
    if len(digits) not in (2 * size for size in _KEY_SIZES):
        raise KeySourceError(f"{label} {_ACCEPTED_HEX}, got {len(digits)} characters")
    return _refuse_zero(bytes.fromhex(digits), label)


def _refuse_zero(key: bytes, label: str) -> bytes:
    if not any(key):
        raise KeySourceError(
            f"{label} the key is all zeros, which is refused; use random bytes "
            "(for example from `openssl rand -hex 32`)"
        )
    return key


def _read_key_fd(fd: int, label: str) -> bytes:
    """The key in the open file ``fd`` (closed here): raw if key-sized, otherwise hex."""
    try:
        with open(fd, "rb", closefd=True) as file:
            data = file.read(_MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise KeySourceError(f"{label} cannot read key file: {_reason(exc)}") from None
    if len(data) in _KEY_SIZES:
        if len(data) == 32 and _HEX.fullmatch(data.decode("latin-1")):
            # 32 random bytes are all hex digits with odds of about 1e-34: this is surely a
            # 16-byte key written as hex without a newline. The rule says raw, so it is used
            # raw, but say so rather than surprise later.
            log.warning(
                "%s holds exactly 32 hex digits, so it is used as a raw 32-byte key, not as "
                "the 16-byte key those digits spell; end the file with a newline to mean hex",
                label,
            )
        return _refuse_zero(data, label)
    if len(data) > _MAX_FILE_SIZE:
        raise KeySourceError(f"{label} {_ACCEPTED_FILE}, got more than {_MAX_FILE_SIZE} bytes")
    # Decoding as latin-1 cannot fail (an ascii decode error would quote a byte of the file).
    digits = "".join(data.decode("latin-1").split())
    if not _HEX.fullmatch(digits):
        raise KeySourceError(f"{label} {_ACCEPTED_FILE}, got {len(data)} bytes, not all hex")
    if len(digits) not in (2 * size for size in _KEY_SIZES):
        raise KeySourceError(f"{label} {_ACCEPTED_FILE}, got {len(digits)} hex digits")
    return _refuse_zero(bytes.fromhex(digits), label)


def _open_default(path: str) -> int:
    """Open the existing default key file, warning if group or others may read it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if mode & 0o044:
        log.warning(
            'AES key file "%s" is readable by group or others (mode %04o); '
            "it should be mode 0600 (chmod 600)",
            path,
            mode & 0o7777,
        )
    return fd


def _load_default(path: str) -> bytes:
    """Read ``path``, generating it first if absent; only an existing file's mode is checked."""
    label = f"key file {path}:"
    try:
        fd = _open_default(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KeySourceError(f"{label} cannot open key file: {_reason(exc)}") from None
    else:
        return _read_key_fd(fd, label)
    key = secrets.token_bytes(_GENERATED_SIZE)
    try:
        created = _create_key_file(path, key)
    except OSError as exc:
        raise KeySourceError(f"{label} cannot create key file: {_reason(exc)}") from None
    if created:
        log.info('Generated AES-%d key and stored it in "%s"', 8 * len(key), path)
        return key
    # Another process created it first: its key is the one (perhaps already) in use.
    try:
        fd = _open_default(path)
    except OSError as exc:
        raise KeySourceError(f"{label} cannot open key file: {_reason(exc)}") from None
    return _read_key_fd(fd, label)


def _create_key_file(path: str, key: bytes) -> bool:
    """Store ``key`` at ``path`` (mode 0600, durable); False if ``path`` already exists.

    The key is written under a private temporary name and hard-linked to ``path``, so the name
    only ever shows a complete key and an existing file is never overwritten. Where hard links
    are not supported, ``path`` itself is created with O_EXCL and written in place.
    """
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f".{DEFAULT_KEY_FILE}.{secrets.token_hex(8)}.tmp")
    _write_new(temp, key)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        try:
            _write_new(path, key)
        except FileExistsError:
            return False
    finally:
        os.unlink(temp)
    _fsync_dir(directory)
    return True


def _write_new(path: str, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600, write ``data`` and fsync it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a umask can only remove bits; make it exactly 0600 regardless
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _fsync_dir(directory: str) -> None:
    """Make the new directory entry durable (where the filesystem can fsync a directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    """The OS's reason, without the path (the caller names it once)."""
    return exc.strerror or type(exc).__name__
