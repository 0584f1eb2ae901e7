"""usbd.core.testing: the conformance suite every device driver's tests subclass.

Modelled on fsspec's abstract test classes: a driver's test module subclasses
:class:`DeviceTests` and supplies a ``make_device`` fixture::

    import pytest
    from usbd.core.testing import DeviceTests
    from mydriver import MyDevice

    class TestMyDevice(DeviceTests):
        @pytest.fixture
        def make_device(self, tmp_path):
            return lambda size: MyDevice(tmp_path / "disk.img", size)

Persistent drivers subclass :class:`PersistentDeviceTests` instead and add a
``reopen_device`` fixture; the full
fixture contract and the class attributes that tune the suite are in :class:`DeviceTests`.

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
from ._suite import DeviceTests, PersistentDeviceTests

__all__ = [
    "DeviceHarness",
    "DeviceTests",
    "DeviceUnderTest",
    "DirectTarget",
    "EngineTarget",
    "InProcessServer",
    "MakeDevice",
    "Model",
    "NbdClient",
    "NbdError",
    "NbdProtocolError",
    "PersistentDeviceTests",
    "ReadChunk",
    "ReopenDevice",
    "Reply",
    "Target",
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
