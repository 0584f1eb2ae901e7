"""``usbdsrvd status`` with real kernel devices: a usbd-ramdisk attached to /dev/nbd0 is listed
with its device (its status file in /run/usbd, the guest's own tmpfs, as root's daemons write
it), and /dev/nbd1 connected by nbd-client, which writes no status file, shows as held by
nbd-client's pid with its command line from /proc (read from /sys/block/nbd1/pid). The JSON
form is read as ``nobody``: a user sees root's daemons and devices too (the VM's python
starts slowly, so the two forms are not both run as both users)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from test_attach import run

if TYPE_CHECKING:
    from vm import VM


def test_status_lists_the_daemons_device_and_a_foreign_holder(vm: VM) -> None:
    result = run(
        vm,
        """
        ramdisk ram --store-size 64MiB --listen /tmp/ram.sock /dev/nbd0
        for i in $(seq 300); do [ -e "/run/usbd/${DAEMON_PID[ram]}.json" ] && break; sleep 0.1; done
        echo "ram pid ${DAEMON_PID[ram]}"
        nbd-client -N '' -L -unix /tmp/ram.sock /dev/nbd1
        echo "nbd1 pid $(cat /sys/block/nbd1/pid)"
        file="/run/usbd/${DAEMON_PID[ram]}.json"  # rewritten every 2 s: until it has nbd-client
        for i in $(seq 300); do grep -q '"network_connections": 1' "$file" && break; sleep 0.1; done
        echo "=== json"
        setpriv --reuid=nobody --regid=nogroup --clear-groups "$USBD_BIN/usbdsrvd" status --json
        echo "=== text"
        "$USBD_BIN/usbdsrvd" status
        echo "=== end"
        nbd-client -d /dev/nbd1
        stop ram
        echo "left: $(ls /run/usbd)."
        """,
    )
    out = result.output
    ram_pid = int(out.split("ram pid ", 1)[1].split()[0])
    client_pid = int(out.split("nbd1 pid ", 1)[1].split()[0])
    entries = {
        entry["device"]: entry
        for entry in json.loads(out.split("=== json\n", 1)[1].split("=== text", 1)[0])
    }
    ram = entries["/dev/nbd0"]
    assert (ram["pid"], ram["source"], ram["driver"]) == (ram_pid, "status-file", "mem")
    assert ram["size"] == 64 << 20
    assert ram["status_file"] == f"/run/usbd/{ram_pid}.json"
    assert ram["listen"] == ["nbd+unix:///?socket=/tmp/ram.sock"]
    foreign = entries["/dev/nbd1"]
    assert (foreign["source"], foreign["prog"], foreign["running"]) == (
        "kernel",
        "nbd-client",
        True,
    )
    assert foreign["size"] == 64 << 20
    text = out.split("=== text\n", 1)[1].split("=== end", 1)[0]
    assert f"usbd-ramdisk pid {ram_pid}: driver mem" in text
    assert "  device       /dev/nbd0 (attached)" in text
    assert "  connections  2 (1 network, 1 kernel)" in text  # nbd-client's and the kernel's
    held = f"/dev/nbd1 held by pid {foreign['pid']} (nbd-client -N '' -L -unix /tmp/ram.sock"
    assert held in text, text
    assert foreign["pid"] == client_pid  # as /sys/block/nbd1/pid names it
    assert "daemon ram exit 0" in out
    assert "left: ." in out  # the daemon removed its file
