"""Dirty bitmap maths against a plain Python model (edges, unaligned, short last block)."""

from __future__ import annotations

import random

import pytest

from mirrord.errors import NativeError
from mirrord.replication import native as n
from mirrord.replication.native import Bitmap

G = 4096


class Model:
    """The rounding rules of ext/bitmap.h, spelled out in Python."""

    def __init__(self, size: int, gran: int = G) -> None:
        self.size, self.gran = size, gran
        self.nblocks = (size + gran - 1) // gran
        self.bits = [False] * self.nblocks

    def set_range(self, off: int, length: int) -> int:
        if length == 0:
            return 0
        blocks = range(off // self.gran, (off + length - 1) // self.gran + 1)
        changed = sum(not self.bits[b] for b in blocks)
        for b in blocks:
            self.bits[b] = True
        return changed

    def clear_range(self, off: int, length: int) -> int:
        if length == 0:
            return 0
        first = -(-off // self.gran)
        end = self.nblocks if off + length == self.size else (off + length) // self.gran
        blocks = range(first, max(first, end))
        changed = sum(self.bits[b] for b in blocks)
        for b in blocks:
            self.bits[b] = False
        return changed

    def snapshot(self) -> bytes:
        out = bytearray((self.nblocks + 7) // 8)
        for i, bit in enumerate(self.bits):
            if bit:
                out[i // 8] |= 1 << (i % 8)
        return bytes(out)


@pytest.mark.parametrize(("size", "nblocks", "nbytes"), [
    (0, 0, 0), (1, 1, 1), (G - 1, 1, 1), (G, 1, 1), (G + 1, 2, 1),
    (8 * G, 8, 1), (9 * G, 9, 2), (64 * G, 64, 8), (65 * G + 7, 66, 9), (1 << 30, 262144, 32768),
])
def test_geometry(size: int, nblocks: int, nbytes: int) -> None:
    bm = Bitmap(size)
    assert (bm.size, bm.nblocks, bm.nbytes, bm.granularity, bm.count()) == (size, nblocks, nbytes, G, 0)


@pytest.mark.parametrize("gran", [0, 1, 256, 511, 3000, 4097])
def test_bad_granularity(gran: int) -> None:
    with pytest.raises(NativeError):
        Bitmap(1 << 20, gran)


@pytest.mark.parametrize(("off", "length", "blocks"), [
    (0, 1, [0]), (0, G, [0]), (0, G + 1, [0, 1]), (G - 1, 2, [0, 1]), (G, G, [1]),
    (1, G - 2, [0]), (3 * G + 5, 3 * G, [3, 4, 5, 6]), (0, 0, []), (10 * G, 0, []),
])
def test_set_range_touches_every_block(off: int, length: int, blocks: list[int]) -> None:
    bm = Bitmap(64 * G)
    assert bm.set_range(off, length) == len(blocks)
    assert [b for b in range(bm.nblocks) if bm.test(b)] == blocks
    assert bm.set_range(off, length) == 0  # idempotent


@pytest.mark.parametrize(("off", "length", "left"), [
    (0, G, [1, 2, 3]), (0, G - 1, [0, 1, 2, 3]), (1, G, [0, 1, 2, 3]), (1, 2 * G, [0, 2, 3]),
    (G - 1, 2 * G + 2, [0, 3]), (0, 4 * G, []),
])
def test_clear_range_needs_whole_blocks(off: int, length: int, left: list[int]) -> None:
    bm = Bitmap(4 * G)
    bm.set_all()
    bm.clear_range(off, length)
    assert [b for b in range(bm.nblocks) if bm.test(b)] == left


def test_last_partial_block() -> None:
    size = 3 * G + 100
    bm = Bitmap(size)
    assert bm.nblocks == 4
    assert bm.set_range(size - 1, 1) == 1 and bm.test(3)
    # Reaching the end of the disk covers the short last block.
    assert bm.clear_range(3 * G, 100) == 1
    bm.set_range(3 * G + 50, 50)
    assert bm.clear_range(3 * G + 1, 99) == 0  # not from its start
    assert bm.clear_range(3 * G, 99) == 0      # not to the disk's end
    bm.set_all()
    assert bm.count() == 4
    assert bm.snapshot() == b"\x0f"


@pytest.mark.parametrize(("off", "length"), [(4 * G, 1), (4 * G - 1, 2), (0, 4 * G + 1), (2**63, 1), (1, 2**64 - 1)])
def test_out_of_range_changes_nothing(off: int, length: int) -> None:
    bm = Bitmap(4 * G)
    for op in (bm.set_range, bm.clear_range):
        with pytest.raises(NativeError) as ei:
            op(off, length)
        assert ei.value.code == n.E_RANGE  # type: ignore[attr-defined]
    assert bm.count() == 0
    assert bm.set_range(4 * G, 0) == 0  # empty range at the very end is fine


def test_find_next() -> None:
    bm = Bitmap(200 * G)
    assert bm.find_next_set(0) is None and bm.find_next_clear(0) == 0
    for b in (0, 63, 64, 127, 128, 199):
        bm.set_range(b * G, 1)
    assert bm.find_next_set(0) == 0
    assert bm.find_next_set(1) == 63
    assert bm.find_next_set(64) == 64
    assert bm.find_next_set(65) == 127
    assert bm.find_next_set(129) == 199
    assert bm.find_next_set(200) is None and bm.find_next_set(10**9) is None
    bm.set_all()
    assert bm.find_next_clear(0) is None  # bits past the last block never count
    bm.clear_range(150 * G, G)
    assert bm.find_next_clear(0) == 150


@pytest.mark.parametrize(("start", "limit", "want_set", "want_clear"), [
    (0, 0, None, None),        # empty window
    (0, 1, 0, None),
    (1, 63, None, 1),
    (1, 64, 63, 1),
    (64, 65, 64, None),
    (65, 127, None, 65),
    (65, 128, 127, 65),
    (128, 199, 128, 129),
    (190, 10**9, 199, 190),   # a limit past the end means "to the end"
    (199, 199, None, None),
])
def test_find_next_within_a_limit(start: int, limit: int, want_set: int | None, want_clear: int | None) -> None:
    bm = Bitmap(200 * G)
    for b in (0, 63, 64, 127, 128, 199):
        bm.set_range(b * G, 1)
    assert bm.find_next_set(start, limit) == want_set
    assert bm.find_next_clear(start, limit) == want_clear


def test_find_next_clear_with_a_limit_stops_early_on_a_full_bitmap() -> None:
    # The sync's question on a 1 TiB disk that is all dirty: where does this run end within one chunk?
    bm = Bitmap(1 << 40, 4096)
    bm.set_all()
    assert bm.find_next_clear(1000, 1256) is None
    bm.clear_range(1100 * 4096, 4096)
    assert bm.find_next_clear(1000, 1256) == 1100


def test_snapshot_load_round_trip_and_validation() -> None:
    bm = Bitmap(70 * G + 1)
    for b in (0, 7, 8, 69, 70):
        bm.set_range(b * G, 1)
    snap = bm.snapshot()
    assert len(snap) == 9 and snap[0] == 0x81 and snap[1] == 0x01 and snap[8] == 0x60  # blocks 69, 70
    other = Bitmap(70 * G + 1)
    other.load(snap)
    assert other.snapshot() == snap and other.count() == 5
    with pytest.raises(NativeError):
        other.load(snap[:-1])  # wrong length
    with pytest.raises(NativeError):
        other.load(snap[:-1] + b"\x80")  # bit past block 70
    assert other.snapshot() == snap  # a refused load changes nothing


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_match_model(seed: int) -> None:
    rnd = random.Random(seed)
    gran = rnd.choice([512, 4096, 65536])
    size = rnd.randrange(0, 300) * gran + rnd.choice([0, 1, gran // 2, gran - 1])
    bm, model = Bitmap(size, gran), Model(size, gran)
    for _ in range(300):
        off = rnd.randrange(0, size + 1)
        length = rnd.randrange(0, size - off + 1) if rnd.random() < 0.3 else min(size - off, rnd.randrange(0, 3 * gran))
        if rnd.random() < 0.55:
            assert bm.set_range(off, length) == model.set_range(off, length)
        else:
            assert bm.clear_range(off, length) == model.clear_range(off, length)
        assert bm.count() == sum(model.bits)
    assert bm.snapshot() == model.snapshot()
    start = rnd.randrange(0, model.nblocks + 1)
    expect = next((b for b in range(start, model.nblocks) if model.bits[b]), None)
    assert bm.find_next_set(start) == expect
