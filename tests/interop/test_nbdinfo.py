"""nbdinfo (libnbd-bin) against usbd-ramdisk: what the server advertises, lists and maps."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import UsbdServer


KiB = 1024
MiB = 1024 * KiB
#: nbdinfo --map's "type" field: base:allocation flags (HOLE = 1, ZERO = 2).
DATA, HOLE_ZERO = 0, 3

Run = Callable[..., Any]


def _info(tools: Run, uri: str) -> dict[str, Any]:
    doc = json.loads(tools("nbdinfo", "--json", uri).stdout)
    assert len(doc["exports"]) == 1
    export: dict[str, Any] = doc["exports"][0]
    return {"protocol": doc["protocol"], "structured": doc["structured"], **export}


def test_json_reports_size_flags_and_contexts(server: UsbdServer, tools: Run) -> None:
    info = _info(tools, server.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert info["export-name"] == server.export_name
    assert info["description"] == server.description
    assert info["export-size"] == server.size
    assert info["contexts"] == ["base:allocation"]
    for flag in (
        "can_trim",
        "can_flush",
        "can_fua",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_multi_conn",
        "can_cache",
    ):
        assert info[flag] is True, flag
    for flag in ("is_read_only", "is_rotational"):
        assert info[flag] is False, flag
    assert info["block_size_minimum"] == 1
    assert info["block_size_preferred"] == 4096
    assert info["block_size_maximum"] == 32 * MiB


def test_size(server: UsbdServer, tools: Run) -> None:
    assert tools("nbdinfo", "--size", server.uri).stdout.strip() == str(server.size)


def test_can_and_is_exit_codes(server: UsbdServer, tools: Run) -> None:
    # nbdinfo --can/--is: exit 0 means true, 2 means false, anything else is an error.
    for flag in (
        "connect",
        "read",
        "write",
        "trim",
        "flush",
        "fua",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "structured-reply",
        "cache",
    ):
        assert tools("nbdinfo", "--can", flag, server.uri, check=False).returncode == 0, flag
    for flag in ("read-only", "rotational"):
        assert tools("nbdinfo", "--is", flag, server.uri, check=False).returncode == 2, flag


def test_list(server: UsbdServer, tools: Run) -> None:
    doc = json.loads(tools("nbdinfo", "--list", "--json", server.list_uri).stdout)
    assert [(e["export-name"], e["description"]) for e in doc["exports"]] == [
        (server.export_name, server.description)
    ]
    assert doc["exports"][0]["export-size"] == server.size


def _map(tools: Run, uri: str) -> list[tuple[int, int, int]]:
    extents = json.loads(tools("nbdinfo", "--map", "--json", uri).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in extents]


def test_map_shows_data_and_holes(server: UsbdServer, tools: Run, connect: Run) -> None:
    h = connect(server.uri)
    h.trim(server.size, 0)  # the server is shared by the module: start from an empty disk
    assert _map(tools, server.uri) == [(0, server.size, HOLE_ZERO)]

    h.pwrite(b"\xa5" * (128 * KiB), 1 * MiB)
    h.pwrite(b"\x5a" * (64 * KiB), 4 * MiB)
    h.pwrite(b"\x01" * 100, 8 * MiB + 10)  # unaligned: some block around it becomes data
    h.flush()
    extents = _map(tools, server.uri)
    assert extents[:4] == [
        (0, 1 * MiB, HOLE_ZERO),
        (1 * MiB, 128 * KiB, DATA),
        (1 * MiB + 128 * KiB, 3 * MiB - 128 * KiB, HOLE_ZERO),
        (4 * MiB, 64 * KiB, DATA),
    ]
    # The map tiles the whole disk, alternating kinds, and the small write lies in data.
    assert sum(length for _, length, _ in extents) == server.size
    assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(extents))
    covering = [e for e in extents if e[0] <= 8 * MiB + 10 and 8 * MiB + 110 <= e[0] + e[1]]
    assert len(covering) == 1 and covering[0][2] == DATA
    assert extents[-1][2] == HOLE_ZERO

    # Trimming gives the first region back: it reads as a hole again.
    h.trim(128 * KiB, 1 * MiB)
    assert _map(tools, server.uri)[:2] == [(0, 4 * MiB, HOLE_ZERO), (4 * MiB, 64 * KiB, DATA)]


def test_read_only_export(readonly_server: UsbdServer, tools: Run) -> None:
    info = _info(tools, readonly_server.uri)
    assert info["is_read_only"] is True
    assert info["export-size"] == readonly_server.size
    for flag in ("can_trim", "can_zero", "can_fast_zero", "can_fua"):
        assert info[flag] is False, flag
    assert tools("nbdinfo", "--is", "read-only", readonly_server.uri, check=False).returncode == 0
    assert tools("nbdinfo", "--can", "write", readonly_server.uri, check=False).returncode == 2


def test_unknown_export_is_refused(server: UsbdServer, tools: Run) -> None:
    uri = server.uri.replace(f"/{server.export_name}", "/no-such-export", 1)
    proc = tools("nbdinfo", "--size", uri, check=False)
    assert proc.returncode == 1
    assert "no-such-export" in proc.stderr
    # ... and the server carries on serving the export that does exist.
    assert tools("nbdinfo", "--size", server.uri).stdout.strip() == str(server.size)
