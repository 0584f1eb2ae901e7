"""The conformance suite, one mixin per concern, and the all-in-one classes built from them.

Each module holds one mixin; all of them subclass :class:`DeviceTestBase` (in ``_base``),
which carries the fixtures and tuning attributes, so a driver's test class combines any of
them with one set of fixtures. :mod:`usbd.core.testing` re-exports everything listed here.
"""

from ._base import DeviceTestBase
from ._cache import CacheTests
from ._close import CloseTests
from ._composed import DeviceTests, PersistentDeviceTests
from ._extents import ExtentsTests
from ._model_based import ModelTests
from ._multi_conn import MultiConnTests
from ._persistent import PersistentTests
from ._read_write import ReadWriteTests
from ._through_engine import EngineTests
from ._trim import TrimTests
from ._zero import ZeroTests

__all__ = [
    "CacheTests",
    "CloseTests",
    "DeviceTestBase",
    "DeviceTests",
    "EngineTests",
    "ExtentsTests",
    "ModelTests",
    "MultiConnTests",
    "PersistentDeviceTests",
    "PersistentTests",
    "ReadWriteTests",
    "TrimTests",
    "ZeroTests",
]
