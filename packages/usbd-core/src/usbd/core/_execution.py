"""How a device's methods are called: its execution model, declared once and checked once.

In the spirit of nbdkit's ``THREAD_MODEL``, a device says how it may be called with the kind
of its methods (plain or ``async def``) and two class attributes, :attr:`Device.blocking` and
:attr:`Device.parallel`. :func:`resolve` turns that into one :class:`Execution` mode when the
:class:`~usbd.core.Export` is built, and refuses combinations that cannot work, with a
message saying what to change, instead of letting every request fail later (an ``async
def read`` beside a plain ``write`` used to fail each write with a TypeError). The mode also
fixes the :class:`FastPath`: what the request loop may call on the event loop for a plain
READ or WRITE, so that the loop itself never asks what kind of device it serves.

=============  =========  ========  ===============================================================
methods        blocking   parallel  mode: where calls run; fast path for a plain READ / WRITE
=============  =========  ========  ===============================================================
plain          False      (either)  INLINE: on the event loop, a whole batch of requests answered
                                    with no task or thread each; ``read`` / ``write``
plain          True       False     SERIAL_THREADS: in a worker thread, one call at a time; none
plain          True       True      PARALLEL_THREADS: in up to ``max_workers`` worker threads;
                                    ``try_read`` / ``try_write`` if offered, the rest of a write
                                    then going to the connection's writer thread
``async def``  (ignored)  False     SERIAL_ASYNC: a task per request on the event loop, one call
                                    at a time; none
``async def``  (ignored)  True      PARALLEL_ASYNC: a task per request, all at once; none
=============  =========  ========  ===============================================================
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ._device import BytesLike, Device

__all__ = [
    "NO_FAST_PATH",
    "TRY_READ_MAX",
    "ContractError",
    "Execution",
    "FastPath",
    "check_written",
    "fast_path",
    "overrides",
    "resolve",
]

#: The longest read a ``try_read`` is asked for. It copies on the event loop, where every
#: other connection waits meanwhile; a longer read goes to a worker thread at once.
TRY_READ_MAX: Final = 1 << 20
#: The methods whose kind (plain or async def) must agree with ``read``'s.
_METHODS: Final = ("read", "write", "flush", "trim", "zero", "extents", "cache", "close")
_ATTEMPTS: Final = ("try_read", "try_write")


class ContractError(Exception):
    """A device broke its contract in a way the engine caught (a read of the wrong length
    or shape, a ``try_write`` count out of range). The request fails with EIO and the log
    names the mistake; the connection and the server carry on."""


class Execution(enum.Enum):
    """Where and how a device's calls run (see the module's table)."""

    INLINE = "inline"
    SERIAL_THREADS = "serial threads"
    PARALLEL_THREADS = "parallel threads"
    SERIAL_ASYNC = "serial async"
    PARALLEL_ASYNC = "parallel async"

    @property
    def is_async(self) -> bool:
        return self in (Execution.SERIAL_ASYNC, Execution.PARALLEL_ASYNC)

    @property
    def parallel(self) -> bool:
        return self in (Execution.PARALLEL_THREADS, Execution.PARALLEL_ASYNC)


#: A fast-path write: (offset, data, fua) -> bytes written, or None for "all of it".
FastWrite = Callable[[int, memoryview, bool], int | None]


@dataclass(frozen=True, slots=True)
class FastPath:
    """What the request loop calls on the event loop for a plain READ or WRITE (no flags,
    in range). Anything not taken here goes to the general path, checked and dispatched by
    the :class:`~usbd.core.Export`.

    ``read`` returns the data, or None when it declines (the general path reads instead);
    ``read_max`` is the longest read it is offered. ``write`` writes from the receive
    buffer; with ``write_behind`` it returns how many bytes it managed and the rest goes to
    the connection's writer thread, else whatever it returns means "all of it".
    """

    read: Callable[[int, int], BytesLike | None] | None = None
    read_max: int = 0
    write: FastWrite | None = None
    write_behind: bool = False


#: No fast path at all: every request takes the general path.
NO_FAST_PATH: Final = FastPath()


def overrides(cls: type, name: str) -> bool:
    """True if ``cls`` implements ``name`` itself rather than inheriting Device's stub."""
    return getattr(cls, name) is not getattr(Device, name)


def resolve(cls: type[Device]) -> Execution:
    """The execution mode ``cls`` declares; TypeError naming what to change if it is not
    one that works."""
    name = cls.__name__
    is_async = inspect.iscoroutinefunction(cls.read)
    kind = "async def" if is_async else "a plain function"
    for method in _METHODS:
        if not overrides(cls, method) or method == "read":
            continue
        if inspect.iscoroutinefunction(getattr(cls, method)) != is_async:
            other = "a plain function" if is_async else "async def"
            raise TypeError(
                f"{name}.{method} is {other} but {name}.read is {kind}: a device's methods "
                f"must be all async def or all plain functions (make {name}.{method} {kind})"
            )
    for attempt in _ATTEMPTS:
        if overrides(cls, attempt):
            _check_attempt(cls, attempt, is_async)
    if is_async:
        return Execution.PARALLEL_ASYNC if cls.parallel else Execution.SERIAL_ASYNC
    if not cls.blocking:
        return Execution.INLINE
    return Execution.PARALLEL_THREADS if cls.parallel else Execution.SERIAL_THREADS


def _check_attempt(cls: type[Device], attempt: str, is_async: bool) -> None:
    name = f"{cls.__name__}.{attempt}"
    if inspect.iscoroutinefunction(getattr(cls, attempt)):
        raise TypeError(
            f"{name} must be a plain function, not async def: it is an attempt made on the "
            "event loop that must never wait"
        )
    if is_async:
        raise TypeError(
            f"{name} is only for plain blocking devices: an async device's calls already run "
            f"on the event loop (remove {attempt})"
        )
    if not cls.blocking:
        raise TypeError(
            f"{name} is only called for a device with blocking = True and parallel = True: a "
            f"device with blocking = False is answered on the event loop already "
            f"(remove {attempt})"
        )
    if not cls.parallel:
        raise TypeError(
            f"{name} is only called for a device with parallel = True (the attempts run "
            f"beside its worker threads): set parallel = True or remove {attempt}"
        )
    if attempt == "try_write" and not overrides(cls, "write"):
        raise TypeError(f"{name} needs {cls.__name__}.write, which writes what it leaves")


def fast_path(
    device: Device, execution: Execution, *, can_write: bool, max_payload: int
) -> FastPath:
    """The fast path for ``device`` in mode ``execution`` (none for a device that needs
    alignment: the fast path skips the checks that would enforce it)."""
    cls = type(device)
    if cls.min_block_size > 1:
        return NO_FAST_PATH
    if execution is Execution.INLINE:
        return FastPath(
            read=device.read,
            read_max=max_payload,
            write=device.write if can_write else None,
        )
    if execution is not Execution.PARALLEL_THREADS:
        return NO_FAST_PATH
    read = device.try_read if overrides(cls, "try_read") else None
    write: FastWrite | None = None
    if can_write and overrides(cls, "try_write"):
        attempt = device.try_write

        def write(offset: int, data: memoryview, fua: bool) -> int:
            return attempt(offset, data)  # the fast path never has FUA

    return FastPath(
        read=read,
        read_max=min(max_payload, TRY_READ_MAX) if read is not None else 0,
        write=write,
        write_behind=write is not None,
    )


def check_written(done: object, length: int) -> int:
    """A ``try_write``'s count, refused unless it is a number of bytes of the write."""
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= length:
        raise ContractError(f"try_write returned {done!r} for a write of {length} bytes")
    return done
