"""usbdsrvd: serve any installed usbd driver, chosen with ``-dev-type``."""

from ._main import KNOWN_TYPES, choose_driver, main

__all__ = ["KNOWN_TYPES", "choose_driver", "main"]
__version__ = "0.1.0"
