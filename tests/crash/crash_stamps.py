"""Stamped 4 KiB blocks and the judge of a device image after kill -9.

Every block the crash loops write is a stamp: a header naming the block, the cycle and the
write's sequence number (unique over a whole run), a body derived from the header, and a
checksum of both at the end. A block read back therefore says which write put it there, and a
torn block (the checksum or the body does not match), a misplaced one (another block's stamp)
or an invented one is told apart from a write that is merely older or newer. All zeros is a
block never written.

:class:`Ledger` records, per block, the sequence numbers sent to it during one cycle (in
order: a block is reserved while a request touching it is in flight, so its writes never
overlap), which of them were answered, and which an acknowledged FLUSH (or FUA) covered. A
FLUSH covers the writes answered before it was sent, on every connection (NBD's rule with
multi-conn), and, as the engine promises (docs/architecture.md, "Ordering and durability"),
every write sent before it on its own connection. :meth:`Ledger.check` then accepts for each
block only its covered write or one sent after it: never torn, never older, never another
block's.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

BLOCK = 4096
_MAGIC = b"USBDCRSH"
#: magic, block number, cycle, sequence number.
_HEADER = struct.Struct("<8sQIQ")
_CHECKSUM = 8
_BODY = BLOCK - _HEADER.size - _CHECKSUM
ZERO = bytes(BLOCK)


def stamp(block: int, cycle: int, seq: int) -> bytes:
    """The content write ``seq`` (of cycle ``cycle``) gives block ``block``."""
    header = _HEADER.pack(_MAGIC, block, cycle, seq)
    digest = hashlib.blake2b(header).digest()
    body = (digest * (_BODY // len(digest) + 1))[:_BODY]
    checked = header + body
    return checked + hashlib.blake2b(checked, digest_size=_CHECKSUM).digest()


@dataclass(frozen=True)
class Reading:
    """What a block read back holds: ``kind`` is ``zero``, ``stamp`` (whole and in its
    place), ``misplaced`` (another block's whole stamp), ``torn`` (a stamp's header whose
    checksum or body does not match) or ``garbage``."""

    kind: str
    block: int = -1
    cycle: int = 0
    seq: int = 0

    def describe(self) -> str:
        if self.kind == "zero":
            return "zeros (never written)"
        if self.kind == "garbage":
            return "garbage (no stamp)"
        what = f"write #{self.seq} of cycle {self.cycle}"
        if self.kind == "stamp":
            return what
        if self.kind == "misplaced":
            return f"{what} to block {self.block}: another block's"
        return f"torn ({what} to block {self.block} by its header, but it does not check)"


def read_stamp(block: int, data: bytes | memoryview) -> Reading:
    """Identify what ``data``, read at ``block``, holds."""
    data = bytes(data)
    if data == ZERO:
        return Reading("zero", block)
    magic, where, cycle, seq = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        return Reading("garbage", block)
    if data != stamp(where, cycle, seq):
        return Reading("torn", where, cycle, seq)
    return Reading("stamp" if where == block else "misplaced", where, cycle, seq)


@dataclass
class Op:
    """One request a writer sends: a WRITE of ``count`` blocks from ``first`` (their
    sequence numbers in ``seqs``, their ledger entries in ``entries``), or a FLUSH (its
    coverage in ``covers``)."""

    kind: str  # "write" or "flush"
    connection: int
    first: int = 0
    seqs: list[int] = field(default_factory=list)
    entries: list[tuple[int, int]] = field(default_factory=list)
    fua: bool = False
    covers: list[int] | None = None
    payload: bytes = b""


@dataclass
class Verdict:
    """What :meth:`Ledger.check` found: problems (empty if none), the sequence number each
    block holds now (0: zeros) and how many blocks an acknowledged FLUSH or FUA bound."""

    problems: list[str]
    values: list[int]
    bound: int

    def assert_ok(self, what: str, report: Callable[[], str] = str) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        pytest.fail(f"{what}:\n  {shown}{more}\n{report()}", pytrace=False)


class Serials:
    """Sequence numbers unique over a whole run (never 0, which stands for zeros)."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> list[int]:
        with self._lock:
            first = self._next + 1
            self._next += count
        return list(range(first, first + count))


class Ledger:
    """The writes of one cycle, per block, from a known image (``baseline``: the sequence
    number each block holds, 0 for zeros). Thread-safe: every writer and the killer share
    one ledger."""

    def __init__(self, baseline: Sequence[int], cycle: int, seqs: Serials) -> None:
        self.cycle = cycle
        self.seqs = seqs
        self.blocks = len(baseline)
        #: Per block: the sequence numbers it was given, index 0 being the baseline.
        self.values = [[v] for v in baseline]
        #: Per block: the index of its last answered write; and of its last covered one.
        self.completed = [0] * self.blocks
        self.floor = [0] * self.blocks
        self.reserved: set[int] = set()
        #: The writes in flight on each connection (for what its FLUSH covers).
        self.in_flight: dict[int, list[Op]] = {}
        self.flushes: dict[int, Op] = {}  # in flight, by id(op)
        self.lock = threading.Lock()
        self.writes_sent = self.writes_acked = 0
        self.flushes_sent = self.flushes_acked = 0

    def plan_write(self, rng: random.Random, connection: int, count: int, fua: bool) -> Op | None:
        """Reserve a free run of ``count`` blocks (None if none found quickly) and record a
        WRITE of fresh stamps to it, before it is sent (in flight at the kill: maybe done)."""
        with self.lock:
            for _ in range(8):
                first = rng.randrange(self.blocks - count + 1)
                if not any(b in self.reserved for b in range(first, first + count)):
                    break
            else:
                return None
            seqs = self.seqs.take(count)
            entries = []
            for offset, seq in enumerate(seqs):
                block = first + offset
                self.values[block].append(seq)
                self.reserved.add(block)
                entries.append((block, len(self.values[block]) - 1))
            op = Op("write", connection, first, seqs, entries, fua)
            self.in_flight.setdefault(connection, []).append(op)
            self.writes_sent += 1
        op.payload = b"".join(stamp(first + i, self.cycle, s) for i, s in enumerate(seqs))
        return op

    def plan_flush(self, connection: int) -> Op:
        """Record a FLUSH about to be sent on ``connection``: what it will cover."""
        with self.lock:
            covers = list(self.completed)
            for op in self.in_flight.get(connection, []):
                for block, index in op.entries:
                    covers[block] = max(covers[block], index)
            op = Op("flush", connection, covers=covers)
            self.flushes[id(op)] = op
            self.flushes_sent += 1
        return op

    def done(self, op: Op) -> None:
        """``op`` was answered successfully."""
        with self.lock:
            if op.kind == "flush":
                assert op.covers is not None
                self.floor = [max(f, c) for f, c in zip(self.floor, op.covers, strict=True)]
                del self.flushes[id(op)]
                self.flushes_acked += 1
                return
            for block, index in op.entries:
                self.completed[block] = max(self.completed[block], index)
                if op.fua:
                    self.floor[block] = max(self.floor[block], index)
                self.reserved.discard(block)
            self.in_flight[op.connection].remove(op)
            self.writes_acked += 1

    def check(self, image: bytes) -> Verdict:
        """Every block holds its covered write's stamp or a later write's, whole."""
        problems: list[str] = []
        values: list[int] = []
        for block in range(self.blocks):
            reading = read_stamp(block, image[block * BLOCK : (block + 1) * BLOCK])
            steps = self.values[block]
            floor = self.floor[block]
            allowed = steps[floor:]
            seq = reading.seq if reading.kind == "stamp" else 0
            values.append(seq)
            if reading.kind in ("stamp", "zero") and seq in allowed:
                continue
            durable = steps[floor]
            if reading.kind in ("torn", "misplaced", "garbage"):
                why = reading.describe()
            elif reading.kind == "zero":
                why = f"zeros: the covered write #{durable} is lost"
            elif seq in steps[:floor]:
                why = f"{reading.describe()}, older than the covered write #{durable}"
            else:
                why = (
                    f"{reading.describe()}, not written to it since the restart, nor what "
                    f"it held then (#{steps[0]}): an older write come back"
                )
            covered = "an acknowledged FLUSH or FUA" if floor else "the restart"
            problems.append(
                f"block {block}: {why}; allowed: {allowed} ({covered} bound #{durable}; "
                f"sent to it this cycle: {steps[1:]})"
            )
        bound = sum(1 for f in self.floor if f)
        return Verdict(problems, values, bound)
