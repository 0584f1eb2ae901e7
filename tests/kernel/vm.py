"""Run shell scripts inside a real Linux kernel that has ``nbd.ko``, in a throw-away QEMU VM.

The machines this project is developed and tested on run kernels without NBD, so the kernel
tests boot Debian's own kernel (the one ``linux-image-amd64`` points at) under QEMU instead.
The guest needs no disk image: its root is the host's ``/`` shared read-only over virtio-9p
with a tmpfs overlay on top, so a script in the guest runs the host's own python, venvs,
nbd-client and mkfs, and may write anywhere (writes stay in guest RAM and vanish with it).
A second, read-write 9p share (a fresh host directory per run) carries the script in and its
exit status out; the serial console carries everything the guest prints.

Preparing a kernel (download, unpack, ``depmod``, a busybox initramfs) happens once per
kernel version, in ``$XDG_CACHE_HOME/usbd-kernel/<version>`` (default ``~/.cache``), under a
lock and by an atomic rename, so concurrent test runs neither repeat nor see half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["QEMU", "REPO_ROOT", "VM", "GuestResult", "Kernel", "prepare_kernel"]

QEMU = "qemu-system-x86_64"
#: Debian's meta-package; the versioned kernel it depends on is the one we boot.
META_PACKAGE = "linux-image-amd64"
#: Modules the initramfs loads (with their modules.dep dependencies) to reach the 9p root.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: busybox-static's binary: the initramfs has no libc, so it must be statically linked.
BUSYBOX = Path("/bin/busybox")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The guest's command line. ``panic=-1`` with QEMU's ``-no-reboot`` turns a panic (and,
#: with ``oops=panic``, an oops) into QEMU exiting instead of a hung run; ``quiet`` keeps
#: the boot log off the slow emulated serial port (warnings and errors still show).
KERNEL_ARGS = "console=ttyS0 panic=-1 oops=panic quiet"
#: The 9p mount options for both shares; ``cache=loose`` only for the read-only root.
NINEP = "trans=virtio,version=9p2000.L,msize=262144"
#: Where the per-run share appears in the guest.
RUN_MOUNT = "/usbd-vm"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class KernelError(RuntimeError):
    """Preparing the guest kernel failed (a missing tool, no package lists, a bad package)."""


@dataclass(frozen=True)
class Kernel:
    """A prepared kernel: the unpacked package, its modules (depmod'ed) and an initramfs."""

    version: str
    path: Path

    @property
    def vmlinuz(self) -> Path:
        return self.path / "root" / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        """``lib/modules/<version>``, bind-mounted at the same place in the guest."""
        return self.path / "root" / "lib" / "modules" / self.version

    @property
    def initramfs(self) -> Path:
        """Named after what goes into it, so a changed /init gets a new one, not a stale one."""
        recipe = "\0".join((INIT, *INITRAMFS_MODULES)).encode()
        return self.path / f"initramfs-{hashlib.sha256(recipe).hexdigest()[:12]}.cpio"


@dataclass
class GuestResult:
    """What one VM run gave back."""

    #: Exit status of the guest script, or -1 if the VM timed out or wrote no status.
    status: int
    #: Everything the guest printed on its serial console (kernel and script), with the
    #: terminal's ``\r\n`` turned back into ``\n``.
    output: str


# --- preparation ------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usbd-kernel"


def _run(*argv: str, cwd: Path | None = None) -> str:
    """Run a preparation step; a failure raises :class:`KernelError` with all it said."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise KernelError(
            f"{' '.join(argv)} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def kernel_package() -> str | None:
    """The versioned package ``linux-image-amd64`` depends on now, if apt knows it."""
    try:
        out = _run("apt-cache", "depends", META_PACKAGE)
    except KernelError:
        return None
    found = re.findall(r"Depends:\s*(linux-image-\S+-amd64)\s*$", out, re.MULTILINE)
    return found[0] if found else None


def _prepared(cache: Path) -> list[Path]:
    if not cache.is_dir():
        return []
    return sorted(p for p in cache.iterdir() if p.is_dir() and (p / "root" / "boot").is_dir())


def prepare_kernel(cache: Path | None = None) -> Kernel:
    """The current Debian kernel, prepared in ``cache`` (once; later calls reuse it).

    The version comes from apt's package lists, so the kernel follows Debian's updates (an
    older ``linux-image-6.1.0-NN`` soon leaves the mirror). Without usable lists, the newest
    kernel already prepared is used; with neither, this fails with the fix in the message.
    """
    cache = cache or cache_root()
    package = kernel_package()
    if package is None:
        ready = _prepared(cache)
        if not ready:
            raise KernelError(
                f"apt-cache does not know {META_PACKAGE!r}'s kernel and none is prepared in "
                f"{cache}: run 'apt-get update' first"
            )
        kernel = Kernel(ready[-1].name, ready[-1])
    else:
        version = package.removeprefix("linux-image-")
        kernel = Kernel(version, cache / version)
        # The directory is complete whenever it exists: it only ever appears by rename.
        if not kernel.path.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            with _locked(cache / f"{version}.lock"):
                if not kernel.path.is_dir():  # else prepared by another process meanwhile
                    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=cache))
                    try:
                        staging.chmod(0o755)
                        _unpack(package, version, staging)
                        os.rename(staging, kernel.path)
                    except BaseException:
                        shutil.rmtree(staging, ignore_errors=True)
                        raise
    if not kernel.initramfs.exists():
        write_initramfs(kernel.initramfs, kernel.modules)
    return kernel


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unpack(package: str, version: str, into: Path) -> None:
    # apt warns (harmlessly) when its sandbox user cannot write here; running as that user
    # is pointless for a download into our own directory.
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    _run("apt-get", *sandbox, "download", package, cwd=into)
    debs = list(into.glob("*.deb"))
    if len(debs) != 1:
        raise KernelError(f"apt-get download {package} left {debs} in {into}")
    root = into / "root"
    _run("dpkg-deb", "-x", str(debs[0]), str(root))
    debs[0].unlink()
    _run("depmod", "-b", str(root), version)
    kernel = Kernel(version, into)
    if not kernel.vmlinuz.is_file():
        raise KernelError(f"{package} has no {kernel.vmlinuz.name}")


def _module_order(modules: Path, names: tuple[str, ...]) -> list[Path]:
    """The files of ``names`` and everything they need, each after its dependencies."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        stem = Path(path).name.split(".ko")[0]
        by_name[stem.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists a module's full closure, the most basic ones last.
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            builtin = (modules / "modules.builtin").read_text()
            if re.search(rf"/{re.escape(name)}\.ko$", builtin, re.MULTILINE):
                continue  # built into this kernel: nothing to load
            raise KernelError(f"module {name!r} is neither in modules.dep nor built in")
        visit(by_name[name])
    return [modules / p for p in order]


def _module_bytes(path: Path) -> bytes:
    """A module, decompressed: busybox's insmod loads plain ``.ko`` files only."""
    if path.suffix == ".ko":
        return path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    raise KernelError(f"cannot decompress {path} (only .ko and .ko.xz are handled)")


def _is_static(elf: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) program header."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    pt_interp = 3
    return all(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] != pt_interp for i in range(phnum)
    )


#: The initramfs's /init: reach the real root, let the run's ``setup`` (busybox sh, from the
#: run share) finish the guest's mounts, then hand over to the run's ``stage2`` in bash.
#: Setting up from the initramfs's busybox saves a dozen program starts over 9p, each slow
#: under emulation. Any failure powers off at once, so the run ends with its reason on the
#: console instead of waiting for the timeout.
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "usbd-vm init: $* failed"; poweroff -f; sleep 60; }}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
for m in /modules/*.ko; do insmod "$m" || fail "insmod $m"; done
mount -t 9p -o ro,{NINEP},cache=loose hostroot /lower || fail "mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount the overlay's tmpfs"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || fail "mount the overlay"
mkdir -p /newroot{RUN_MOUNT}
mount -t 9p -o {NINEP} usbdrun /newroot{RUN_MOUNT} || fail "mount the run share"
for d in proc sys dev; do mount --move /$d /newroot/$d || fail "move /$d"; done
. /newroot{RUN_MOUNT}/setup
exec switch_root /newroot /bin/bash {RUN_MOUNT}/stage2
"""


def write_initramfs(path: Path, modules: Path) -> None:
    """A newc cpio archive: busybox, /init, /dev/console and the decompressed modules.

    Written here rather than with ``cpio`` so that device nodes need no root privileges.
    """
    busybox = BUSYBOX.read_bytes() if BUSYBOX.exists() else b""
    if not _is_static(busybox):
        raise KernelError(f"{BUSYBOX} is missing or not static: install busybox-static")
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
        archive.add(d, 0o040755)
    archive.add("dev/console", 0o020600, rdev=(5, 1))
    archive.add("bin/busybox", 0o100755, busybox)
    archive.add("init", 0o100755, INIT.encode())
    for i, module in enumerate(_module_order(modules, INITRAMFS_MODULES)):
        name = module.name.split(".ko")[0]
        archive.add(f"modules/{i:02d}-{name}.ko", 0o100644, _module_bytes(module))
    # Concurrent writers write the same bytes; the rename makes each one's file whole.
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(archive.finish())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass
class _Cpio:
    """Just enough of the "newc" format (what the kernel unpacks) to build an initramfs."""

    data: bytearray = field(default_factory=bytearray)
    inode: int = 0

    def add(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, *rdev, len(encoded), 0)
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self.data += body
        self._pad()

    def _pad(self) -> None:
        self.data += bytes(-len(self.data) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.data)


# --- running ----------------------------------------------------------------------------


def kvm_usable() -> bool:
    """KVM only with real hardware virtualisation: a PVM-backed /dev/kvm hangs this kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.MULTILINE) is not None


def _setup(kernel: Kernel) -> str:
    """The rest of the guest's mounts, run by the initramfs's busybox before switch_root.

    Fresh tmpfs on /run and /dev/shm hide the host's; /tmp is left to the overlay (writable,
    in guest RAM), since a tmpfs there would hide a checkout or venv under the host's /tmp, as
    CI's may be. The prepared kernel's modules
    appear at ``/lib/modules/<version>`` (where the host's path resolves, as ``/lib`` is
    often a symlink) so that ``modprobe`` works in the guest.
    """
    guest_modules = Path("/lib/modules").resolve() / kernel.version
    mounts = [
        ("-t tmpfs -o mode=0755 tmpfs", "/run"),
        ("-t tmpfs -o mode=1777 tmpfs", "/dev/shm"),
        ("-t devpts -o gid=5,mode=620,ptmxmode=666 devpts", "/dev/pts"),
        (f"-o bind {shlex.quote('/newroot' + str(kernel.modules))}", str(guest_modules)),
    ]
    lines = []
    for how, where in mounts:
        target = shlex.quote(f"/newroot{where}")
        lines.append(f"mkdir -p {target} && mount {how} {target} || fail 'mount {where}'")
    lines.append("ip link set lo up || fail 'lo up'")
    lines.append("hostname usbd-vm")
    return "\n".join(lines) + "\n"


def _stage2(cwd: Path, env: Mapping[str, str]) -> str:
    """The guest's PID 1 after switch_root (bash, in the real root): run the script with a
    clean environment, record its status, power off.

    PID 1 must never exit (that panics the kernel), hence the wait after sysrq's power-off,
    which happens asynchronously; ``sleep`` starts before it because a program started
    during the power-off may no longer be readable over 9p.
    """
    base = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**base, **env}.items())
    return f"""cd {shlex.quote(str(cwd))} && env -i {assignments} \\
    bash -c "$(< {RUN_MOUNT}/script)" usbd-vm </dev/null
echo $? > {RUN_MOUNT}/status
sleep 1000000 &
echo o > /proc/sysrq-trigger
wait
"""


@dataclass
class VM:
    """Boots a fresh VM per :meth:`run` on a prepared kernel."""

    kernel: Kernel
    cwd: Path = REPO_ROOT
    qemu: str = QEMU
    smp: int = 2
    kvm: bool = field(default_factory=kvm_usable)

    @property
    def python(self) -> str:
        """This process's python (a venv's, unresolved): the guest can run it as is."""
        return sys.executable

    def bin(self, name: str) -> str:
        """A console script of this python's environment, e.g. ``usbd-ramdisk``."""
        return str(Path(sys.executable).parent / name)

    def run(
        self,
        script: str,
        *,
        timeout: float = 300,
        env: Mapping[str, str] | None = None,
        memory: str = "2G",
    ) -> GuestResult:
        """Boot a fresh VM, run ``bash -c script`` in it as root with ``cwd`` as the working
        directory, power off and return the status and console output.

        The script starts from a clean environment (PATH, HOME=/root, LANG) plus ``env``;
        bash runs without ``-e``, so a script that should stop at the first failure says
        ``set -euo pipefail`` itself. stdin is /dev/null; stdout and stderr are the console.
        """
        extra = dict(env or {})
        for name in extra:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        rundir = Path(tempfile.mkdtemp(prefix="usbd-vm-"))
        try:
            (rundir / "script").write_text(script)
            (rundir / "setup").write_text(_setup(self.kernel))
            (rundir / "stage2").write_text(_stage2(self.cwd, extra))
            console = rundir / "console"
            status = self._boot(rundir, console, timeout, memory)
            output = console.read_bytes().decode("utf-8", errors="replace")
            status_file = rundir / "status"
            if status == 0 and status_file.exists():
                code = int(status_file.read_text().strip())
            else:
                code = -1
                why = "timed out" if status is None else f"exited with {status}"
                output += f"\n[usbd-vm: no exit status from the guest; qemu {why}]\n"
            return GuestResult(code, output.replace("\r\n", "\n"))
        finally:
            shutil.rmtree(rundir, ignore_errors=True)

    def _boot(self, rundir: Path, console: Path, timeout: float, memory: str) -> int | None:
        """Run QEMU to its end; its exit status, or None if it was killed at ``timeout``."""
        accel = ["-accel", "kvm", "-cpu", "host"] if self.kvm else [
            "-accel", "tcg,thread=multi", "-cpu", "max"
        ]  # fmt: skip
        argv = [
            self.qemu,
            "-nodefaults", "-no-user-config", "-no-reboot",
            "-nic", "none", "-display", "none", "-serial", "stdio",
            *accel, "-smp", str(self.smp), "-m", memory,
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.kernel.initramfs),
            "-append", KERNEL_ARGS,
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=usbdrun,path={rundir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=usbdrun,mount_tag=usbdrun",
        ]  # fmt: skip
        with console.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None


def main() -> int:
    """``python tests/kernel/vm.py 'script'``: run one script in a VM by hand (debugging)."""
    started = time.monotonic()
    kernel = prepare_kernel()
    prepared = time.monotonic()
    result = VM(kernel).run(" ".join(sys.argv[1:]) or "uname -a")
    done = time.monotonic()
    sys.stdout.write(result.output)
    print(
        f"[status {result.status}; prepare {prepared - started:.1f} s, run {done - prepared:.1f} s]"
    )
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
