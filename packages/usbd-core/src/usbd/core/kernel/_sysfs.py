"""Finding the kernel's nbd driver and its devices through /sys, /proc and /dev.

Everything reads below a ``root`` directory so that tests can build a fake tree; nothing here
talks to the driver itself (that is :mod:`._netlink` and :mod:`._ioctl`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ._errors import KernelAttachError

__all__ = ["DEFAULT_MAX_DEVICES", "NbdSystem", "parse_device"]

log = logging.getLogger("usbd.core.kernel")

#: How many /dev/nbdX the module is asked for when we load it (the original's default).
DEFAULT_MAX_DEVICES = 32
#: How long to wait for /dev/nbd0 after modprobe (udev or devtmpfs creates the nodes).
_NODE_WAIT = 5.0

_DEVICE = re.compile(r"(?:/dev/)?nbd(\d+)")


def parse_device(text: str) -> int:
    """The index of ``/dev/nbdN`` (or ``nbdN``); anything else is a ``ValueError``."""
    match = _DEVICE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid NBD device {text!r}: expected /dev/nbdN, e.g. /dev/nbd0")
    return int(match.group(1))


@dataclass(frozen=True)
class Holder:
    """Who has a device: the pid the kernel recorded at connect time and whether it still runs."""

    pid: int | None
    alive: bool


class NbdSystem:
    """The nbd driver as /sys shows it: module state, devices, which are in use."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)

    # -- paths -----------------------------------------------------------------------------

    def _sys(self, *parts: str) -> Path:
        return self.root.joinpath("sys", *parts)

    def device_path(self, index: int) -> Path:
        """The /dev node; in a fake tree it lies under ``root`` too."""
        return self.root / "dev" / f"nbd{index}"

    # -- the module ------------------------------------------------------------------------

    def module_ready(self) -> bool:
        """Loaded as a module or built into the kernel: both show /sys/module/nbd."""
        return self._sys("module", "nbd").is_dir()

    def max_devices(self) -> int | None:
        """``nbds_max`` as the module was loaded with, when the kernel says."""
        try:
            return int(self._sys("module", "nbd", "parameters", "nbds_max").read_text())
        except (OSError, ValueError):
            return None

    def load_module(self, max_devices: int = DEFAULT_MAX_DEVICES) -> None:
        """``modprobe nbd nbds_max=N`` unless the driver is there already."""
        if self.module_ready():
            return
        command = ["modprobe", "nbd", f"nbds_max={max_devices}"]
        log.info("loading the nbd kernel module: %s", " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise KernelAttachError(
                errno.ENOENT,
                "this kernel has no nbd driver loaded and modprobe is not installed; "
                "load it with 'modprobe nbd', or serve over the network with --listen",
            ) from None
        if result.returncode != 0 or not self.module_ready():
            reason = result.stderr.strip().splitlines()[-1:] or ["modprobe failed"]
            raise KernelAttachError(
                errno.ENODEV,
                f"this kernel has no nbd support ({reason[0]}); load it with 'modprobe nbd' "
                "(package linux-modules-extra on some distributions), or serve over the "
                "network with --listen",
            )
        deadline = time.monotonic() + _NODE_WAIT
        while not self.device_path(0).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- devices ---------------------------------------------------------------------------

    def devices(self) -> list[int]:
        """Indices of every nbd device the kernel has, in numeric order."""
        try:
            names = os.listdir(self._sys("block"))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _DEVICE.fullmatch(name)
            if match is not None:
                found.append(int(match.group(1)))
        return sorted(found)

    def exists(self, index: int) -> bool:
        return self._sys("block", f"nbd{index}").is_dir()

    def holder(self, index: int) -> Holder | None:
        """``None`` when the device is free: the kernel keeps a ``pid`` file while connected."""
        try:
            text = self._sys("block", f"nbd{index}", "pid").read_text().strip()
        except FileNotFoundError:
            return None
        except OSError:
            # The file vanished between listing and reading, or cannot be read: in use.
            return Holder(pid=None, alive=True)
        if not text.isdigit():
            return Holder(pid=None, alive=True)
        pid = int(text)
        if not self._alive(pid):
            return Holder(pid=pid, alive=False)
        return Holder(pid=self._process_of(pid), alive=True)

    def _process_of(self, tid: int) -> int:
        """The kernel records the thread that connected (ioctl: the one in NBD_DO_IT); name
        its process."""
        try:
            status = (self.root / "proc" / str(tid) / "status").read_text()
        except OSError:
            return tid
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "Tgid" and value.strip().isdigit():
                return int(value)
        return tid

    def _alive(self, pid: int) -> bool:
        """A zombie still has /proc/PID but will never serve again."""
        try:
            status = (self.root / "proc" / str(pid) / "stat").read_text()
        except OSError:
            return False
        state = status.rpartition(")")[2].split()[:1]
        return state not in (["Z"], ["X"])

    def size(self, index: int) -> int | None:
        """The device's size in bytes (/sys counts 512-byte sectors), or None if unknown."""
        try:
            return int(self._sys("block", f"nbd{index}", "size").read_text()) * 512
        except (OSError, ValueError):
            return None

    def first_free(self) -> int:
        """The lowest free index; when all are taken, say how to have more."""
        indices = self.devices()
        for index in indices:
            if self.holder(index) is None:
                return index
        configured = self.max_devices()
        count = configured if configured is not None else len(indices)
        raise KernelAttachError(
            errno.EBUSY,
            f"every NBD device is busy ({count} devices); free one, name a device, or reload "
            "the nbd module with more (rmmod nbd, then start with a larger -nbd-max-devs)",
        )

    def describe_holder(self, index: int, holder: Holder) -> str:
        who = f"process {holder.pid}" if holder.pid is not None else "another process"
        return f"{self.device_path(index)} is busy (in use by {who})"
