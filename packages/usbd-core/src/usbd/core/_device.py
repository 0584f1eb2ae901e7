"""The interface a driver implements: a block device of fixed size, addressed by byte offset.

Modelled on nbdkit's plugin API: a device must say how big it is and how to read; every other
capability is optional, and the engine advertises to clients exactly what the device
implements (a device without ``write`` is read-only, one without ``trim`` gets no TRIM
requests, and so on). A request for a capability that was not advertised never reaches it.

Execution model. The methods are plain functions or ``async def`` coroutines, the same choice
for all of them; with :attr:`Device.blocking` and :attr:`Device.parallel` that makes one of the
modes in :class:`~usbd.core.Execution` (the table is in ``usbd.core._execution`` and
docs/writing-a-device.md), resolved and checked when the :class:`~usbd.core.Export` is built:
a device that mixes the two kinds, or offers ``try_read``/``try_write`` where they would never
be called, is refused there with a TypeError saying what to change.

* Async methods run on the event loop; the engine runs many of them at once, each request in
  its own task (serialised by a lock when :attr:`Device.parallel` is false).
* Plain methods with :attr:`Device.blocking` true (the default) run in worker threads, at most
  ``max_workers`` at a time per device (one at a time unless :attr:`Device.parallel`).
* Plain methods with :attr:`Device.blocking` false are called directly on the event loop.
  This is the fast path for devices that answer at once (a RAM disk): the engine answers a
  whole batch of requests without a task or thread per request. Such methods must never
  block.
* A blocking, parallel device may also offer :meth:`Device.try_read` and
  :meth:`Device.try_write`: non-blocking attempts the engine makes on the event loop first (a
  file whose pages are cached: ``preadv`` with ``RWF_NOWAIT``), going to a thread only when
  they fail.

Contract, as the shared suite in :mod:`usbd.core.testing` checks it:

* Offsets and lengths are bytes; any offset and length inside the device is allowed, aligned
  or not (the engine rejects out-of-range requests before they reach the device).
* ``write`` receives a buffer that is only valid during the call: copy what you keep.
* ``flush`` makes every write that completed before it durable; with FUA, a write or trim is
  durable before it returns. The engine calls ``flush`` only after every write it received
  earlier on the same connection has completed.
* Writes that overlap and are in flight at once complete in no defined order, as in NBD.
* ``close`` is called exactly once, after every other call has returned; afterwards every
  method must fail (raise :class:`~usbd.core.DeviceError`).
* Failures are exceptions: :class:`~usbd.core.DeviceError` or any ``OSError`` carries the errno
  the client sees; any other exception is logged and the client sees EIO.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from ._constants import DEFAULT_PREFERRED_BLOCK, ExtentFlag

#: What a read may return.
BytesLike = bytes | bytearray | memoryview

__all__ = ["BytesLike", "Device", "Extent", "ExtentFlag", "Fua"]


class Fua(enum.Enum):
    """How a device honours Force Unit Access on writes, trims and zeroes."""

    #: The engine calls ``flush`` after the write (the default when ``flush`` is implemented).
    EMULATE = "emulate"
    #: The device handles the ``fua`` argument itself.
    NATIVE = "native"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with the same allocation state (the base:allocation metadata context).

    ``flags`` is a combination of ``ExtentFlag.HOLE`` (not allocated) and ``ExtentFlag.ZERO``
    (reads as zeros); 0 means allocated data.
    """

    offset: int
    length: int
    flags: ExtentFlag = ExtentFlag.DATA


class Device:
    """Base class for devices. Subclasses set :attr:`size` and override what they support.

    Only :attr:`size` and :meth:`read` are required. Every method shown here may be written as
    ``async def`` instead (all of them, or none).
    """

    #: Size in bytes; set it in ``__init__``. Read once when a client connects.
    size: int
    #: The block size clients should prefer for good performance.
    block_size: ClassVar[int] = DEFAULT_PREFERRED_BLOCK
    #: The smallest unit of I/O the device accepts; 1 means any byte offset and length.
    min_block_size: ClassVar[int] = 1
    #: Plain methods block (run them in threads); set False only if they answer at once.
    blocking: ClassVar[bool] = True
    #: The device copes with several calls at once (from threads or tasks).
    parallel: ClassVar[bool] = False
    #: Several connections may use the device at once and see each other's flushed writes
    #: (NBD's CAN_MULTI_CONN): flush on one connection covers writes done on all of them.
    multi_conn: ClassVar[bool] = False
    #: Seeks are expensive (the kernel then schedules I/O differently).
    rotational: ClassVar[bool] = False
    #: Split long structured reads into data and hole chunks using :meth:`extents` (cheap
    #: for a RAM disk's map; a file would pay extra lseeks on every read).
    sparse_reads: ClassVar[bool] = True
    #: Refuse writes even though :meth:`write` exists.
    read_only: bool = False
    #: How FUA is honoured; ignored unless the device implements ``flush`` or FUA is native.
    fua: ClassVar[Fua] = Fua.EMULATE

    def read(self, offset: int, length: int) -> BytesLike:
        """Return exactly ``length`` bytes from ``offset``: bytes, bytearray or a contiguous
        buffer (a memoryview of another format is sent as its bytes). Anything else, or
        another length, fails that request with EIO (and a log line naming the mistake)."""
        raise NotImplementedError

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Store ``data`` at ``offset``. ``data`` is only valid during the call."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable."""
        raise NotImplementedError

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """The range is no longer needed: it may be discarded (and read back as anything)."""
        raise NotImplementedError

    def zero(self, offset: int, length: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        """Make the range read as zeros.

        ``may_trim`` allows deallocating it (punching a hole); ``fast`` asks to fail with
        ``DeviceError(errno.ENOTSUP)`` rather than be slower than a write of zeros. Without
        this method the engine writes zeros through :meth:`write`.
        """
        raise NotImplementedError

    def extents(self, offset: int, length: int) -> Iterable[Extent]:
        """Describe allocation from ``offset`` on; at least the first byte must be covered.

        Gaps and anything past the requested range are tolerated (gaps count as data). Without
        this method every byte is reported as allocated data.
        """
        raise NotImplementedError

    def cache(self, offset: int, length: int) -> None:
        """Advice: the client will read this range soon."""
        raise NotImplementedError

    def try_read(self, offset: int, length: int) -> BytesLike | None:
        """For a blocking, parallel device: the read, if it can be done at once without
        blocking (the data is in the page cache), else None, and the engine calls :meth:`read`
        in a worker thread. Called on the event loop: it must never block. Asked for at most
        1 MiB (a copy on the event loop holds up every other connection); longer reads go to
        a thread at once. Optional."""
        raise NotImplementedError

    def try_write(self, offset: int, data: memoryview) -> int:
        """For a blocking, parallel device: write what can be written at once without
        blocking and return how many bytes that was (0 for none). The engine writes the rest
        with :meth:`write` in the connection's writer thread, which writes such rests in the
        order received while the connection goes on receiving: offering this method says that
        writes are usually quick (a file's page cache). Called on the event loop: it must
        never block. A count outside 0..len(data) fails the write with EIO. Needs
        :meth:`write`. Optional."""
        raise NotImplementedError

    def failed(self) -> str | None:
        """Why the device can no longer serve at all, or None (the default: it can).

        For a failure no single request can report: an object store's device whose volume
        another writer took over fails every write from then on, and the daemon should stop
        with that error rather than go on answering EIO. The daemon asks about twice a second,
        on the event loop, whatever the execution model: it must answer at once (a plain
        method, even on an async device) and must not block."""
        return None

    def metrics(self) -> Mapping[str, float]:
        """The current value of each metric the driver declares
        (:attr:`usbd.core.driver.Driver.metrics`), by its name; the default has none.

        Asked only when someone looks (a Prometheus scrape, the status file's refresh every
        few seconds, SIGUSR1), from the metrics server's thread as well as the event loop,
        whatever the execution model: return figures the device keeps anyway (plain numbers
        read without a lock the I/O path holds), never do I/O or block. A name the driver
        did not declare, or a value that is not a number, is left out."""
        return {}

    def close(self) -> None:
        """Release everything; called exactly once, after every other call has returned."""
