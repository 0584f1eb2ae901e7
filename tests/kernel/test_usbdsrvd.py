"""usbdsrvd as the original ran it: no arguments is a 1 GiB RAM disk on the next free
/dev/nbdX, and under systemd it reports READY=1 once attached and STOPPING=1 on SIGTERM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from test_attach import run

if TYPE_CHECKING:
    from vm import VM

LISTENER = """
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/tmp/notify.sock")
for _ in range(2):
    print(s.recv(4096).decode().replace(chr(10), " "), flush=True)
"""


def test_no_arguments_is_a_1_gib_ramdisk_on_the_next_free_device(vm: VM) -> None:
    result = run(
        vm,
        f"""
        ramdisk ram --store-size 64MiB /dev/nbd0
        "$USBD_PY" -c '{LISTENER}' >/tmp/notify.log &
        listener=$!
        for i in $(seq 100); do [ -S /tmp/notify.sock ] && break; sleep 0.1; done
        NOTIFY_SOCKET=/tmp/notify.sock start srvd "$USBD_BIN/usbdsrvd"
        echo "nbd1 size $(blockdev --getsize64 /dev/nbd1)"
        grep -h "READY=1" /tmp/notify.log
        stop srvd
        wait $listener
        grep -h "STOPPING=1" /tmp/notify.log
        stop ram
        """,
    )
    out = result.output
    assert 'usbdsrvd is processing requests for "/dev/nbd1"' in out
    assert (
        'Exporting 1.0 GiB volume "test-lun" as next available NBD device using driver mem'
    ) in out
    assert "nbd1 size 1073741824" in out
    ready = next(line for line in out.splitlines() if line.startswith("READY=1"))
    assert "STATUS=serving /dev/nbd1" in ready
    assert "MAINPID=" in ready
    assert any(line.startswith("STOPPING=1") for line in out.splitlines()), out
    assert "daemon srvd exit 0" in out
    assert "[srvd] usbdsrvd terminated normally." in out
    assert "daemon ram exit 0" in out
