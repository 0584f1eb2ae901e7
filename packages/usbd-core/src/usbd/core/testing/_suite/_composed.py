"""The whole suite in one class: :class:`DeviceTests`, and :class:`PersistentDeviceTests`.

These are what the suite was before it was split into mixins, and they behave as it did: a
test of a capability the device lacks checks that the device does not claim it (no trim,
so no SEND_TRIM; no extents, so everything is data; ...) and tests that write skip a
read-only device. That suits a device with everything (both shipped drivers); a driver
whose device lacks something picks the mixins it has instead, so that no test passes or
skips in place of a feature, and losing a feature later fails its tests.
"""

from __future__ import annotations

from typing import ClassVar

from ._cache import CacheTests
from ._close import CloseTests
from ._extents import ExtentsTests
from ._model_based import ModelTests
from ._multi_conn import MultiConnTests
from ._persistent import PersistentTests
from ._read_write import ReadWriteTests
from ._through_engine import EngineTests
from ._trim import TrimTests
from ._zero import ZeroTests

__all__ = ["DeviceTests", "PersistentDeviceTests"]


class DeviceTests(
    ReadWriteTests,
    CloseTests,
    TrimTests,
    ZeroTests,
    ExtentsTests,
    CacheTests,
    ModelTests,
    EngineTests,
    MultiConnTests,
):
    """Every mixin but :class:`PersistentTests`, adapting to what the device offers.

    The fixture contract and the attributes that tune the suite are on
    :class:`DeviceTestBase` and :class:`ModelTests`.
    """

    adapt_to_device: ClassVar[bool] = True


class PersistentDeviceTests(PersistentTests, DeviceTests):
    """Everything in :class:`DeviceTests` plus reopen-and-verify, directly and through the
    engine, and reopening in the model and after a daemon stops.

    Subclasses supply ``reopen_device`` as well as ``make_device``.
    """
