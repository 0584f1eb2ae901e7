"""How a chunk of the device becomes an object in the bucket, and how it is checked coming back.

An object is a fixed header, then the payload: the chunk's bytes, compressed (zstd, gzip or
not at all), then sealed. The header names what the object is (a data chunk or a base map),
the volume, the chunk index and the generation, the compression and the payload's length, and
carries the nonce. Sealing is AES-256-GCM with the whole header as associated data, or, with
encryption off, a SHA-256 of header and payload appended. Opening checks the header against
what the manifest says the object must be, then the seal, so that

* a flipped bit anywhere fails the seal (a corrupted object is an error, never wrong data);
* an object moved to another key, another chunk's object, or an older generation of the same
  chunk (a replay) fails the header check, and, encrypted, could not be forged to pass it,
  since the header is bound into the tag.

Keys. The AES key given by the user is never used directly: HKDF-SHA256 derives a 256-bit key
per volume (salted with the volume's random id), so volumes sharing ``key.aes`` never share a
GCM key. Nonces are 96 random bits per object: the standard bound for random GCM nonces is
2^32 messages per key, and a volume reaches it only after uploading 4 PiB of 1 MiB objects.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass
from secrets import token_bytes

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Codec", "Compression", "IntegrityError", "Kind", "derive_key"]

MAGIC = b"USBDOBJ1"
# magic, kind, compression, encrypted, pad, index, generation, volume id, plain length, nonce
_HEADER = struct.Struct(">8sBBBxQQ16sQ12s")
HEADER_SIZE = _HEADER.size
_DIGEST = 32
_TAG = 16
_ZSTD_LEVEL = 1  # fast: random 4 KiB writes upload whole objects; level 3 costs 2x the CPU


class Kind(enum.IntEnum):
    DATA = 1
    BASE = 2
    MANIFEST = 3


class Compression(enum.IntEnum):
    IDENTITY = 0
    ZSTD = 1
    GZIP = 2


class IntegrityError(Exception):
    """An object is not what the manifest says it must be: corrupted, tampered with, moved,
    replayed, or sealed with another key. The message names the object and what failed."""


def derive_key(master: bytes, volume: bytes) -> bytes:
    """The volume's own AES-256 key from the user's (16, 24 or 32 bytes)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=volume, info=b"usbd-objstore v1 data"
    ).derive(master)


@dataclass(frozen=True)
class _Header:
    kind: int
    compression: int
    encrypted: int
    index: int
    generation: int
    volume: bytes
    length: int
    nonce: bytes


class Codec:
    """Seals and opens one volume's objects. Thread-safe (holds no mutable state)."""

    def __init__(self, volume: bytes, compression: Compression, key: bytes | None) -> None:
        self.volume = volume
        self.compression = compression
        self._aead = AESGCM(derive_key(key, volume)) if key is not None else None
        self._zstd_level = _ZSTD_LEVEL

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def _compress(self, data: bytes | memoryview) -> tuple[Compression, bytes]:
        if self.compression is Compression.ZSTD:
            packed = zstandard.ZstdCompressor(level=self._zstd_level).compress(data)
        elif self.compression is Compression.GZIP:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: the gzip container
            packed = compressor.compress(data) + compressor.flush()
        else:
            return Compression.IDENTITY, bytes(data)
        if len(packed) >= len(data):  # incompressible: storing it as is costs less to read
            return Compression.IDENTITY, bytes(data)
        return self.compression, packed

    def seal(self, kind: Kind, index: int, generation: int, data: bytes | memoryview) -> bytes:
        """The object for ``data``: chunk (or map) ``index`` at ``generation``."""
        compression, payload = self._compress(data)
        nonce = token_bytes(12) if self._aead is not None else bytes(12)
        header = _HEADER.pack(
            MAGIC,
            kind,
            compression,
            self._aead is not None,
            index,
            generation,
            self.volume,
            len(data),
            nonce,
        )
        if self._aead is not None:
            return header + self._aead.encrypt(nonce, payload, header)
        return header + payload + hashlib.sha256(header + payload).digest()

    def open(self, blob: bytes, kind: Kind, index: int, generation: int, name: str) -> bytes:
        """The bytes sealed in ``blob``, which must be ``kind`` ``index`` at ``generation`` of
        this volume; anything else raises :class:`IntegrityError` naming ``name``."""
        if len(blob) < HEADER_SIZE or blob[:8] != MAGIC:
            raise IntegrityError(f"{name}: not a usbd-objstore object (bad magic or truncated)")
        head = _Header(*_HEADER.unpack_from(blob)[1:])
        expected = (kind, index, generation, self.volume)
        found = (head.kind, head.index, head.generation, head.volume)
        if found != expected:
            raise IntegrityError(
                f"{name}: holds {Kind(head.kind).name.lower() if head.kind in (1, 2, 3) else '?'}"
                f" {head.index} generation {head.generation:x}"
                f"{'' if head.volume == self.volume else ' of another volume'}, expected "
                f"{kind.name.lower()} {index} generation {generation:x} (moved or replayed)"
            )
        header = blob[:HEADER_SIZE]
        if bool(head.encrypted) != (self._aead is not None):
            raise IntegrityError(
                f"{name}: {'encrypted' if head.encrypted else 'not encrypted'}, unlike the volume"
            )
        if self._aead is not None:
            try:
                payload = self._aead.decrypt(head.nonce, blob[HEADER_SIZE:], header)
            except InvalidTag:
                raise IntegrityError(
                    f"{name}: does not authenticate (altered, or sealed with another key)"
                ) from None
        else:
            if len(blob) < HEADER_SIZE + _DIGEST:
                raise IntegrityError(f"{name}: truncated")
            payload = blob[HEADER_SIZE:-_DIGEST]
            if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
                raise IntegrityError(f"{name}: checksum mismatch (corrupted)")
        try:
            if head.compression == Compression.ZSTD:
                data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=head.length)
            elif head.compression == Compression.GZIP:
                data = zlib.decompress(payload, 31)
            elif head.compression == Compression.IDENTITY:
                data = payload
            else:
                raise IntegrityError(f"{name}: unknown compression {head.compression}")
        except (zstandard.ZstdError, zlib.error) as exc:
            raise IntegrityError(f"{name}: does not decompress: {exc}") from None
        if len(data) != head.length:
            raise IntegrityError(f"{name}: {len(data)} bytes, the header says {head.length}")
        return data
