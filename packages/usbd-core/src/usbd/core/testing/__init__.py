"""usbd.core.testing: the conformance suite every device driver's tests subclass.

Modelled on fsspec's abstract test classes: the suite is a set of mixins, one per concern,
and a driver's test class subclasses the ones its device is made for and supplies a
``make_device`` fixture (a factory ``size -> Device``):

* :class:`ReadWriteTests` -- devices that take writes: a fresh device reads as zeros,
  1-byte I/O, single-byte and alternating-block patterns, unaligned writes.
* :class:`CloseTests` -- all devices: every call fails after close.
* :class:`ModelTests` -- all devices: the model-based test, directly and through the engine.
* :class:`EngineTests` -- devices that take writes: pipelined round trips, requests in
  flight, boundaries, out-of-range requests, a read-only export, closing and stopping.
* :class:`TrimTests`, :class:`ZeroTests`, :class:`ExtentsTests`, :class:`CacheTests` --
  devices that implement ``trim``, ``zero`` (not just the engine's writing of zeros),
  ``extents`` or ``cache``.
* :class:`MultiConnTests` -- devices that set ``multi_conn``.
* :class:`PersistentTests` -- devices whose data outlives them (with ``reopen_device``).

A mixin's tests fail, rather than skip, on a device without its capability: a driver leaves
out the mixins for what its device lacks, and a device that loses a feature fails its tests.
For a device without ``cache`` or ``multi_conn``, say::

    import pytest
    from usbd.core.testing import (
        CloseTests, EngineTests, ExtentsTests, ModelTests, ReadWriteTests, TrimTests, ZeroTests,
    )
    from mydriver import MyDevice

    class TestMyDevice(
        ReadWriteTests, CloseTests, TrimTests, ZeroTests, ExtentsTests, ModelTests, EngineTests
    ):
        trim_zeroes = True  # tunables: see DeviceTestBase and ModelTests

        @pytest.fixture
        def make_device(self, tmp_path):
            return lambda size: MyDevice(tmp_path / "disk.img", size)

:class:`DeviceTests` is all the mixins but :class:`PersistentTests` in one class (and
:class:`PersistentDeviceTests` all of them, with ``reopen_device``), for a device that has
everything, as both shipped drivers do; they keep the behaviour of the suite before the
split: a capability test on a device without it checks that the device does not claim it,
and tests that write skip a read-only device. The full fixture contract and the class
attributes that tune the suite are in :class:`DeviceTestBase`.

What it checks: what the original project's suite did (1-byte I/O at offset 0, single-byte
patterns over the first MiBs, alternating data/zero 4 KiB blocks over the whole device
verified byte by byte and by SHA-256, reopen-and-verify, every call failing after close),
plus a Hypothesis model-based test of random reads, writes, trims, zeroes and flushes at
unaligned offsets (directly and through the engine), many overlapping requests in flight,
boundary and out-of-range requests, extents consistent with data, and close semantics.

The pieces are usable on their own: :func:`call` and :class:`DeviceUnderTest` call a device
whatever its execution model; :func:`serve_in_process` and :class:`NbdClient` serve a device
with the real engine and talk NBD to it; :class:`Model` and :func:`run_model` are the
model-based test. The suite needs the ``testing`` extra (pytest, pytest-trio, hypothesis).
"""

from ._calls import DeviceUnderTest, call, resolve
from ._client import (
    InProcessServer,
    NbdClient,
    NbdError,
    NbdProtocolError,
    ReadChunk,
    Reply,
    serve_in_process,
)
from ._data import alternating_image, assert_same_bytes, random_bytes, sha256
from ._harness import DeviceHarness, MakeDevice, ReopenDevice
from ._model import DirectTarget, EngineTarget, Model, Target, model_settings, run_model
from ._suite import (
    CacheTests,
    CloseTests,
    DeviceTestBase,
    DeviceTests,
    EngineTests,
    ExtentsTests,
    ModelTests,
    MultiConnTests,
    PersistentDeviceTests,
    PersistentTests,
    ReadWriteTests,
    TrimTests,
    ZeroTests,
)

__all__ = [
    "CacheTests",
    "CloseTests",
    "DeviceHarness",
    "DeviceTestBase",
    "DeviceTests",
    "DeviceUnderTest",
    "DirectTarget",
    "EngineTarget",
    "EngineTests",
    "ExtentsTests",
    "InProcessServer",
    "MakeDevice",
    "Model",
    "ModelTests",
    "MultiConnTests",
    "NbdClient",
    "NbdError",
    "NbdProtocolError",
    "PersistentDeviceTests",
    "PersistentTests",
    "ReadChunk",
    "ReadWriteTests",
    "ReopenDevice",
    "Reply",
    "Target",
    "TrimTests",
    "ZeroTests",
    "alternating_image",
    "assert_same_bytes",
    "call",
    "model_settings",
    "random_bytes",
    "resolve",
    "run_model",
    "serve_in_process",
    "sha256",
]
