"""Export a device to the Linux kernel as /dev/nbdX (netlink or ioctl).

:class:`KernelExport` attaches an :class:`~usbd.core.Export` to a device and serves the
kernel's sockets with the same request loop as network clients; :class:`NbdSystem` finds the
driver and free devices; :class:`KernelAttachError` carries a sentence meant for the user.
"""

from ._attach import Attached, KernelExport, KernelOptions, Method
from ._errors import KernelAttachError
from ._netlink import Connect, NbdNetlink, netlink_available
from ._sysfs import DEFAULT_MAX_DEVICES, Holder, NbdSystem, parse_device

__all__ = [
    "DEFAULT_MAX_DEVICES",
    "Attached",
    "Connect",
    "Holder",
    "KernelAttachError",
    "KernelExport",
    "KernelOptions",
    "Method",
    "NbdNetlink",
    "NbdSystem",
    "netlink_available",
    "parse_device",
]
