"""The handshake a client over the connection limit gets: every option refused, without I/O.

Closing such a connection at once (what nbdkit's limit filter does) leaves the client to
report "server disconnected unexpectedly", which reads like a crash; qemu-nbd's ``--shared``
stops accepting, so the client hangs in the listen backlog. Instead the server greets the
client and answers each option with ``NBD_REP_ERR_POLICY`` and a message saying why, so that
libnbd reports "server policy prevents NBD_OPT_GO" and qemu shows the message. ABORT is
acknowledged; EXPORT_NAME, which has no error reply, ends it (the spec says to close).

It keeps nothing of what the client sends: option data is skipped as it arrives, and a
client gets a few options at most (:data:`MAX_OPTIONS`), so a refused connection costs a
socket and a few bytes for the short time the server gives it.
"""

from __future__ import annotations

import struct

from ._constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, HandshakeFlag, Option, Reply

__all__ = ["MAX_OPTIONS", "Refusal"]

#: Options answered before the refusal closes the connection anyway.
MAX_OPTIONS = 16
#: A longer option is no NBD client's: stop there.
_MAX_OPTION_LENGTH = 64 * 1024

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


class Refusal:
    """Refuses every option with ``ERR_POLICY`` and ``message``; :attr:`finished` when the
    connection should be closed."""

    def __init__(self, message: str) -> None:
        self._message = message.encode()
        self._buffer = bytearray()
        self._flags_read = False
        self._skip = 0  # option data still to arrive and be dropped
        self.options = 0
        self.finished = False

    def start(self) -> bytes:
        """The usual greeting: the client must get as far as its first option."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes) -> bytes:
        """Consume client bytes; return the replies to send (possibly none)."""
        out = bytearray()
        if self.finished:
            return b""
        self._buffer += data
        while not self.finished:
            if self._skip:  # the rest of this chunk was option data
                dropped = min(self._skip, len(self._buffer))
                self._skip -= dropped
                del self._buffer[:dropped]
                if self._skip:
                    break
            if not self._flags_read:
                if len(self._buffer) < 4:
                    break
                del self._buffer[:4]
                self._flags_read = True
                continue
            if len(self._buffer) < _OPTION_HEADER.size:
                break
            magic, option, length = _OPTION_HEADER.unpack_from(self._buffer)
            del self._buffer[: _OPTION_HEADER.size]
            self.options += 1
            if magic != IHAVEOPT or length > _MAX_OPTION_LENGTH or option == Option.EXPORT_NAME:
                self.finished = True
                break
            if option == Option.ABORT:
                out += _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, Reply.ACK, 0)
                self.finished = True
                break
            out += _REPLY_HEADER.pack(
                OPTION_REPLY_MAGIC, option, Reply.ERR_POLICY, len(self._message)
            )
            out += self._message
            self._skip = length
            if self.options >= MAX_OPTIONS:
                self.finished = True
        if self.finished:
            self._buffer.clear()
        return bytes(out)
