"""The command line shared by every driver's console script and by usbdsrvd.

``usbd-ramdisk --listen /tmp/disk.sock`` is :func:`main` with the ramdisk's
:class:`~usbd.core.driver.Driver`; usbdsrvd is :func:`run` with a :class:`Command` holding every
installed driver. Settings come from flags (Go style ``-store-size=20GiB`` or GNU style
``--store-size 20GiB``), then ``USBD_*`` environment variables, then a TOML file (``--config``),
then defaults. A bad value gets one line naming the flag and what is accepted, and exit
status 2.
"""

from .._listen import Listen, parse_listen, uri_for
from ._config import load_settings, read_config_file, settings_class
from ._errors import OptionError, UsageError
from ._flags import STYLE_NOTE
from ._main import Command, describe_options, kernel_options, main, run
from ._options import Option, flag_info, option_table
from ._reference import config_reference, metrics_reference
from ._serve import serve
from ._status import status_main

__all__ = [
    "STYLE_NOTE",
    "Command",
    "Listen",
    "Option",
    "OptionError",
    "UsageError",
    "config_reference",
    "describe_options",
    "flag_info",
    "kernel_options",
    "load_settings",
    "main",
    "metrics_reference",
    "option_table",
    "parse_listen",
    "read_config_file",
    "run",
    "serve",
    "settings_class",
    "status_main",
    "uri_for",
]
