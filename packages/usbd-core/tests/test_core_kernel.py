"""Kernel attachment: discovery and refusals against a fake /sys tree, and netlink encoding.

The attach itself needs a kernel with nbd; tests/kernel/ boots one under QEMU.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from usbd.core import Device, Export
from usbd.core.kernel import (
    Holder,
    KernelAttachError,
    KernelExport,
    KernelOptions,
    NbdSystem,
    _attach,
    _netlink,
)
from usbd.core.kernel._sysfs import parse_device


class Tree:
    """A fake root with /sys/block/nbdN, /sys/module/nbd and /proc/PID/stat."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sys" / "block").mkdir(parents=True)
        (root / "dev").mkdir()
        (root / "proc").mkdir()

    def module(self, nbds_max: int | None = None) -> None:
        params = self.root / "sys" / "module" / "nbd" / "parameters"
        params.mkdir(parents=True, exist_ok=True)
        if nbds_max is not None:
            (params / "nbds_max").write_text(f"{nbds_max}\n")

    def device(self, index: int, *, pid: int | None = None, sectors: int = 0) -> None:
        block = self.root / "sys" / "block" / f"nbd{index}"
        block.mkdir()
        (block / "size").write_text(f"{sectors}\n")
        (self.root / "dev" / f"nbd{index}").touch()
        if pid is not None:
            (block / "pid").write_text(f"{pid}\n")

    def process(self, pid: int, state: str = "S", tgid: int | None = None) -> None:
        (self.root / "proc" / str(pid)).mkdir()
        (self.root / "proc" / str(pid) / "stat").write_text(f"{pid} (usbd ram) {state} 1 1 1\n")
        (self.root / "proc" / str(pid) / "status").write_text(
            f"Name:\tusbd\nTgid:\t{tgid or pid}\nPid:\t{pid}\n"
        )


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


class Small(Device):
    size = 1 << 20
    multi_conn = True

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: object, fua: bool) -> None:
        pass


class Single(Small):
    multi_conn = False


# -- device names ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "index"), [("/dev/nbd0", 0), ("nbd12", 12), ("/dev/nbd7 ", 7)])
def test_parse_device_accepts_nbd_nodes(text: str, index: int) -> None:
    assert parse_device(text) == index


@pytest.mark.parametrize("text", ["/dev/sda", "nbd", "/dev/nbd-1", "/dev/nbd1p1", "0", ""])
def test_parse_device_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="expected /dev/nbdN"):
        parse_device(text)


# -- discovery ---------------------------------------------------------------------------


def test_module_ready_follows_sys_module(tree: Tree) -> None:
    system = NbdSystem(tree.root)
    assert not system.module_ready()
    tree.module()  # built in: /sys/module/nbd with no /proc/modules entry is enough
    assert system.module_ready()


def test_devices_are_listed_in_numeric_order(tree: Tree) -> None:
    for index in (10, 2, 0, 1):
        tree.device(index)
    (tree.root / "sys" / "block" / "loop0").mkdir()
    (tree.root / "sys" / "block" / "nbd3p1").mkdir()
    assert NbdSystem(tree.root).devices() == [0, 1, 2, 10]


def test_no_sys_block_means_no_devices(tmp_path: Path) -> None:
    assert NbdSystem(tmp_path).devices() == []


def test_first_free_skips_devices_with_a_pid_file(tree: Tree) -> None:
    tree.process(4242)
    tree.device(0, pid=4242)
    tree.device(1, pid=99999)  # a dead holder still makes the device not free
    tree.device(2)
    tree.device(3)
    system = NbdSystem(tree.root)
    assert system.first_free() == 2


def test_every_device_busy_points_at_nbd_max_devs(tree: Tree) -> None:
    tree.module(nbds_max=2)
    tree.process(7)
    tree.device(0, pid=7)
    tree.device(1, pid=7)
    with pytest.raises(KernelAttachError, match=r"every NBD device is busy \(2 devices\)") as info:
        NbdSystem(tree.root).first_free()
    assert "-nbd-max-devs" in str(info.value)
    assert info.value.errno == errno.EBUSY


@pytest.mark.parametrize(("state", "alive"), [("S", True), ("R", True), ("Z", False)])
def test_holder_is_alive_unless_gone_or_a_zombie(tree: Tree, state: str, alive: bool) -> None:
    tree.process(321, state)
    tree.device(0, pid=321)
    holder = NbdSystem(tree.root).holder(0)
    assert holder is not None
    assert (holder.pid, holder.alive) == (321, alive)


def test_holder_thread_is_reported_as_its_process(tree: Tree) -> None:
    tree.process(1001, tgid=1000)  # the ioctl daemon's thread in NBD_DO_IT
    tree.device(0, pid=1001)
    assert NbdSystem(tree.root).holder(0) == Holder(pid=1000, alive=True)


def test_holder_of_a_vanished_process_is_dead(tree: Tree) -> None:
    tree.device(0, pid=31337)
    holder = NbdSystem(tree.root).holder(0)
    assert holder is not None
    assert not holder.alive


def test_free_device_has_no_holder_and_reports_its_size(tree: Tree) -> None:
    tree.device(5, sectors=2048)
    system = NbdSystem(tree.root)
    assert system.holder(5) is None
    assert system.size(5) == 1 << 20
    assert system.device_path(5) == tree.root / "dev" / "nbd5"


# -- loading the module ------------------------------------------------------------------


def _fake_modprobe(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "modprobe"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_load_module_runs_modprobe_with_nbds_max(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "args"
    _fake_modprobe(
        tmp_path / "bin",
        f'echo "$@" > {record}\nmkdir -p {tree.root}/sys/module/nbd\ntouch {tree.root}/dev/nbd0\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    NbdSystem(tree.root).load_module(7)
    assert record.read_text().split() == ["nbd", "nbds_max=7"]


def test_load_module_does_nothing_when_nbd_is_there(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.module()
    _fake_modprobe(tmp_path / "bin", "exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    NbdSystem(tree.root).load_module(7)  # would fail if modprobe ran


def test_no_nbd_support_says_how_to_load_it_or_use_listen(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_modprobe(tmp_path / "bin", "echo 'modprobe: FATAL: Module nbd not found' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(KernelAttachError) as info:
        NbdSystem(tree.root).load_module()
    message = str(info.value)
    assert "no nbd support (modprobe: FATAL: Module nbd not found)" in message
    assert "modprobe nbd" in message
    assert "--listen" in message
    assert "\n" not in message


def test_missing_modprobe_is_a_clear_error(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tree.root / "nowhere"))
    with pytest.raises(KernelAttachError, match="modprobe is not installed"):
        NbdSystem(tree.root).load_module()


# -- refusals before anything is attached ------------------------------------------------


def _prepare(
    tree: Tree,
    monkeypatch: pytest.MonkeyPatch,
    options: KernelOptions,
    *,
    device: Device | None = None,
    netlink: bool = True,
    euid: int = 0,
) -> tuple[str, int | None, bool]:
    monkeypatch.setattr(_attach.os, "geteuid", lambda: euid)
    monkeypatch.setattr(_attach, "netlink_available", lambda: netlink)
    kernel = KernelExport(Export(device or Small()), options, system=NbdSystem(tree.root))
    return kernel._prepare(kernel._settings())


def test_not_root_is_refused_with_a_way_out(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    with pytest.raises(KernelAttachError) as info:
        _prepare(tree, monkeypatch, KernelOptions(), euid=1000)
    assert info.value.errno == errno.EPERM
    assert "needs root" in str(info.value)
    assert "--listen" in str(info.value)


def test_auto_prefers_netlink_and_lets_the_kernel_pick(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.module()
    tree.device(0)
    assert _prepare(tree, monkeypatch, KernelOptions()) == ("netlink", None, False)


def test_auto_falls_back_to_ioctl_on_the_first_free_device(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.module()
    tree.process(50)
    tree.device(0, pid=50)
    tree.device(1)
    assert _prepare(tree, monkeypatch, KernelOptions(), netlink=False) == ("ioctl", 1, False)


def test_netlink_asked_for_but_missing(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    with pytest.raises(KernelAttachError, match="--attach=ioctl"):
        _prepare(tree, monkeypatch, KernelOptions(method="netlink"), netlink=False)


def test_given_device_in_use_names_the_process(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    tree.process(777)
    tree.device(3, pid=777)
    with pytest.raises(KernelAttachError) as info:
        _prepare(tree, monkeypatch, KernelOptions(device=3))
    assert info.value.errno == errno.EBUSY
    assert str(info.value) == f"{tree.root}/dev/nbd3 is busy (in use by process 777)"


def test_device_left_by_a_dead_daemon_is_reattached_by_netlink(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.module()
    tree.device(2, pid=99999, sectors=(1 << 20) // 512)
    assert _prepare(tree, monkeypatch, KernelOptions(device=2)) == ("netlink", 2, True)


def test_reattach_refuses_a_different_size(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    tree.device(2, pid=99999, sectors=4096)
    with pytest.raises(KernelAttachError, match="size of 2097152 bytes"):
        _prepare(tree, monkeypatch, KernelOptions(device=2))


def test_reattach_needs_netlink(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    tree.device(2, pid=99999, sectors=2048)
    with pytest.raises(KernelAttachError, match="re-attaching needs netlink"):
        _prepare(tree, monkeypatch, KernelOptions(device=2, method="ioctl"))


def test_ioctl_on_a_device_that_does_not_exist(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.module()
    tree.device(0)
    with pytest.raises(KernelAttachError, match=r"nbd9 does not exist .*-nbd-max-devs"):
        _prepare(tree, monkeypatch, KernelOptions(device=9, method="ioctl"))


def test_several_connections_need_a_multi_conn_device() -> None:
    kernel = KernelExport(Export(Single()), KernelOptions(connections=2))
    with pytest.raises(KernelAttachError, match="not safe for several connections"):
        kernel._connection_count()
    assert KernelExport(Export(Single()), KernelOptions())._connection_count() == 1
    assert KernelExport(Export(Small()), KernelOptions(connections=3))._connection_count() == 3
    assert KernelExport(Export(Small()), KernelOptions())._connection_count() == 1


@pytest.mark.parametrize("size", [256, 1000, 8192])
def test_block_sizes_the_kernel_cannot_take(size: int) -> None:
    kernel = KernelExport(Export(Small()), KernelOptions(block_size=size))
    with pytest.raises(KernelAttachError, match="power of two from 512 to 4096"):
        kernel._settings()


def test_settings_carry_the_export_flags() -> None:
    export = Export(Small())
    settings = KernelExport(export, KernelOptions(timeout=5, dead_timeout=9))._settings()
    assert settings.size == 1 << 20
    assert settings.block_size == 512
    assert settings.server_flags == int(export.flags)
    assert (settings.timeout, settings.dead_timeout) == (5, 9)


# -- netlink messages --------------------------------------------------------------------


def _attributes(data: bytes) -> list[tuple[int, bytes]]:
    found = []
    while data:
        length, kind = struct.unpack_from("=HH", data)
        found.append((kind, data[4:length]))
        data = data[(length + 3) & ~3 :]
    return found


def test_connect_message_layout_matches_the_uapi_header() -> None:
    settings = _netlink.Connect(size=1 << 30, block_size=4096, server_flags=0x12D, timeout=7)
    msg = _netlink.build_message(
        _netlink.CMD_CONNECT, _netlink.connect_attrs(settings, [11, 12], index=3)
    )
    msg["header"]["type"] = 0x1234
    msg.encode()
    data = bytes(msg.data)
    length, kind = struct.unpack_from("=IH", data)
    assert (length, kind) == (len(data), 0x1234)
    command, version = struct.unpack_from("=BB", data, 16)
    assert (command, version) == (1, 1)
    attrs = dict(_attributes(data[20:]))
    assert struct.unpack("=I", attrs[1]) == (3,)  # INDEX
    assert struct.unpack("=Q", attrs[2]) == (1 << 30,)  # SIZE_BYTES
    assert struct.unpack("=Q", attrs[3]) == (4096,)  # BLOCK_SIZE_BYTES
    assert struct.unpack("=Q", attrs[4]) == (7,)  # TIMEOUT
    assert struct.unpack("=Q", attrs[5]) == (0x12D,)  # SERVER_FLAGS
    assert struct.unpack("=Q", attrs[6]) == (0,)  # CLIENT_FLAGS: outlive the daemon
    assert struct.unpack("=Q", attrs[8]) == (60,)  # DEAD_CONN_TIMEOUT
    items = _attributes(attrs[7])  # SOCKETS > SOCK_ITEM > SOCK_FD
    assert [kind for kind, _ in items] == [1, 1]
    fds = [struct.unpack("=I", _attributes(body)[0][1])[0] for _, body in items]
    assert fds == [11, 12]


def test_reconfigure_leaves_size_and_flags_alone() -> None:
    settings = _netlink.Connect(size=1 << 30, block_size=4096, server_flags=1)
    names = [name for name, _ in _netlink.reconfigure_attrs(settings, [5], index=0)]
    assert "NBD_ATTR_SIZE_BYTES" not in names
    assert "NBD_ATTR_SERVER_FLAGS" not in names
    assert names[0] == "NBD_ATTR_INDEX"


def test_netlink_family_found_exactly_when_the_kernel_has_nbd() -> None:
    # Every kernel since 4.12 registers the family with the driver.
    assert _netlink.netlink_available() is Path("/sys/module/nbd").is_dir()
