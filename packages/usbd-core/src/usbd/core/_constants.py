"""Numbers of the NBD wire protocol.

Values come from the NBD protocol specification (doc/proto.md in the reference
implementation) and the Linux uapi header. Everything on the wire is big-endian.
"""

from __future__ import annotations

import enum
from typing import Final

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

REQUEST_SIZE: Final = 28
SIMPLE_REPLY_SIZE: Final = 16
STRUCTURED_HEADER_SIZE: Final = 20

#: A payload of up to 32 MiB must never be treated as an attack (spec), so that is our default.
DEFAULT_MAX_PAYLOAD: Final = 32 * 1024 * 1024
DEFAULT_PREFERRED_BLOCK: Final = 4096


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(enum.IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ChunkType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE: Final = 1


class ExtentFlag(enum.IntFlag):
    """Flags of the base:allocation metadata context."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(enum.IntEnum):
    """The only error values NBD puts on the wire."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


BASE_ALLOCATION: Final = "base:allocation"


# -- the same numbers as plain ints, for the request path -------------------------------------
# Attribute access on an enum class and IntFlag operators each cost far more than the int
# operation they stand for, and the request loop does several per request. The engine and the
# transmission layer use these; everything else should use the enums above.

CMD_READ: Final = int(Command.READ)
CMD_WRITE: Final = int(Command.WRITE)
CMD_DISC: Final = int(Command.DISC)
CMD_FLUSH: Final = int(Command.FLUSH)
CMD_TRIM: Final = int(Command.TRIM)
CMD_CACHE: Final = int(Command.CACHE)
CMD_WRITE_ZEROES: Final = int(Command.WRITE_ZEROES)
CMD_BLOCK_STATUS: Final = int(Command.BLOCK_STATUS)
#: One more than the highest command number defined: per-command tables have this many slots.
CMD_COUNT: Final = 16
#: Commands that change the device (a FLUSH waits for them; a read-only export refuses them).
CMD_WRITES: Final = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

FLAG_FUA: Final = int(CommandFlag.FUA)
FLAG_NO_HOLE: Final = int(CommandFlag.NO_HOLE)
FLAG_DF: Final = int(CommandFlag.DF)
FLAG_REQ_ONE: Final = int(CommandFlag.REQ_ONE)
FLAG_FAST_ZERO: Final = int(CommandFlag.FAST_ZERO)
FLAGS_ALL: Final = FLAG_FUA | FLAG_NO_HOLE | FLAG_DF | FLAG_REQ_ONE | FLAG_FAST_ZERO

CHUNK_OFFSET_DATA: Final = int(ChunkType.OFFSET_DATA)
EXTENT_ZERO: Final = int(ExtentFlag.ZERO)
EXTENT_FLAGS: Final = int(ExtentFlag.HOLE | ExtentFlag.ZERO)

TF_READ_ONLY: Final = int(TransmissionFlag.READ_ONLY)
TF_SEND_FUA: Final = int(TransmissionFlag.SEND_FUA)
TF_SEND_FAST_ZERO: Final = int(TransmissionFlag.SEND_FAST_ZERO)
