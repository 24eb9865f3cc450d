"""Ranges a sync target asks to be resent, the persisted bitmap, and the meta file's migration and crash recovery."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord._native import ffi, lib
from mirrord.errors import HandshakeRefused
from mirrord.paths import Home
from mirrord.replication import extents, link
from mirrord.replication.generations import Generations, Side
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.native import Bitmap

G = 4096
SIZE = 1 << 20


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {b for off, length in ranges for b in range(off // G, -(-(off + length) // G))}


@pytest.mark.parametrize("seed", range(20))
def test_bitmap_ranges_match_the_c_bitmap(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([SIZE, SIZE + 512, 3 * G])
    bm = Bitmap(size)
    for _ in range(rng.randrange(0, 40)):
        offset = rng.randrange(size)
        bm.set_range(offset, rng.randrange(1, min(5 * G, size - offset) + 1))
    ranges = extents.ranges_from_bitmap(bm.snapshot(), size)
    assert covered(ranges) == {b for b in range(bm.nblocks) if bm.test(b)}
    assert all(off + length <= size for off, length in ranges)
    assert extents.add_to_bitmap(b"", size, ranges) == bm.snapshot()


def test_add_to_bitmap_keeps_what_was_set() -> None:
    first = extents.add_to_bitmap(b"", SIZE, [(0, 1)])
    both = extents.add_to_bitmap(first, SIZE, [(10 * G, 2 * G)])
    assert covered(extents.ranges_from_bitmap(both, SIZE)) == {0, 10, 11}


@pytest.mark.parametrize(("given", "merged"), [
    ([], []),
    ([(0, G)], [(0, G)]),
    ([(G, G), (0, G)], [(0, 2 * G)]),
    ([(0, 2 * G), (G, G)], [(0, 2 * G)]),
    ([(0, G), (3 * G, G)], [(0, G), (3 * G, G)]),
    ([(0, 0), (5, 0)], []),
])
def test_merge(given: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    assert extents.merge(given) == merged


@pytest.mark.parametrize("limit", [1, 2, 7, 100])
def test_coarsen_bounds_the_count_and_only_grows(limit: int) -> None:
    rng = random.Random(limit)
    ranges = [(rng.randrange(0, 1 << 30) // G * G, G) for _ in range(500)]
    out = extents.coarsen(ranges, limit)
    assert len(out) <= limit
    assert covered(ranges) <= covered(out)


@pytest.mark.parametrize("value", [
    None, "x", [[0]], [[0, 0]], [[-1, 10]], [[0, SIZE + 1]], [[SIZE, 1]], [[0, True]], [[0.0, 10]], [[0, 1]] * 1025,
])
def test_validate_refuses_what_is_not_within_the_disk(value: object) -> None:
    with pytest.raises(ValueError):
        extents.validate(value, SIZE)


def test_validate_accepts_ranges_within_the_disk() -> None:
    assert extents.validate([[0, 1], [SIZE - G, G]], SIZE) == [(0, 1), (SIZE - G, G)]


def test_link_state_round_trip_and_refusals() -> None:
    me = Side(Generations("a" * 16, "b" * 16, ("c" * 16,)), primary=False, bitmap_trusted=True, discard_my_data=True)
    peer, extra = link.parse_state(json.loads(json.dumps(link.state(me, [(0, G)]))), primary=False, disk_size=SIZE)
    assert peer == me and extra == [(0, G)]
    for bad in (None, {}, {**link.state(me), "bitmap_trusted": 1}, {**link.state(me), "extra_dirty": [[0, SIZE * 2]]},
                {**link.state(me), "gen": {"current": "x", "bitmap": "", "history": []}}):
        with pytest.raises(HandshakeRefused):
            link.parse_state(bad, primary=True, disk_size=SIZE)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)
states = st.fixed_dictionaries({}, optional={
    "gen": st.one_of(json_values, st.fixed_dictionaries({
        "current": st.sampled_from(["", "a" * 16, "A" * 16, 7]), "bitmap": st.sampled_from(["", "b" * 16, None]),
        "history": st.lists(st.sampled_from(["c" * 16, "", 1]), max_size=3)})),
    "bitmap_trusted": json_values, "discard_my_data": json_values,
    "extra_dirty": st.one_of(json_values, st.lists(st.lists(st.integers(-5, SIZE + 5), max_size=3), max_size=5)),
})


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(json_values, states))
def test_a_peers_state_is_parsed_or_refused_never_anything_else(value: object) -> None:
    try:
        peer, extra = link.parse_state(value, primary=True, disk_size=SIZE)
    except HandshakeRefused:
        return
    assert all(0 <= off and 0 < length and off + length <= SIZE for off, length in extra)
    assert len(peer.gen.history) <= 2


# -- the meta file -------------------------------------------------------------------------


def test_meta_round_trip(tmp_path: Path) -> None:
    home = Home(tmp_path)
    meta = VolumeMeta.load(home, "r0")
    assert meta.gen == Generations() and meta.bitmap_trusted and not meta.primary_open
    meta.gen, meta.epoch, meta.split_brain = Generations("a" * 16, "b" * 16), 3, "Split brain."
    meta.disk_state = DiskState.OUTDATED
    meta.save(home, "r0")
    again = VolumeMeta.load(home, "r0")
    assert (again.gen, again.epoch, again.split_brain, again.disk_state) == (meta.gen, 3, "Split brain.",
                                                                              DiskState.OUTDATED)


def test_meta_from_before_generations_reads_as_just_created(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.meta_file("r0").write_text(json.dumps({"disk_state": "Outdated", "epoch": 4, "source": "x:3",
                                                "node_id": "abc"}))
    meta = VolumeMeta.load(home, "r0")
    assert meta.gen == Generations() and meta.disk_state is DiskState.OUTDATED and meta.epoch == 4


def test_recover_without_a_crash_changes_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path)
    meta = VolumeMeta.load(home, "r0")
    assert meta.recover(home, "r0", SIZE) == "" and meta.bitmap_trusted


@pytest.mark.parametrize("bitmap", ["", "b" * 16])
def test_a_crashed_primary_without_activity_log_is_untrusted(tmp_path: Path, bitmap: str) -> None:
    home = Home(tmp_path)
    meta = VolumeMeta.load(home, "r0")
    meta.gen, meta.primary_open = Generations("a" * 16, bitmap), True
    meta.save(home, "r0")
    assert "full one" in meta.recover(home, "r0", SIZE)
    again = VolumeMeta.load(home, "r0")
    assert not again.bitmap_trusted and not again.primary_open


def _crash_with_hot_extent(home: Home, extent: int) -> int:
    """A real activity log left as a crash leaves it: one extent hot. Returns the extent size."""
    size = lib.MRD_AL_MIN_EXTENT
    out = ffi.new("struct mrd_al **")
    assert lib.mrd_al_open(str(home.activity_log("r0")).encode(), size, 4, out) == 0
    assert lib.mrd_al_begin(out[0], extent * size, size) == 0  # persisted before it returns
    lib.mrd_al_close(out[0])  # the write never ended: the log still names the extent
    return int(size)


def test_a_crashed_primary_with_activity_log_adds_its_extents(tmp_path: Path) -> None:
    home = Home(tmp_path)
    ext = _crash_with_hot_extent(home, 2)
    extents.bitmap_file(home, "r0").write_bytes(extents.add_to_bitmap(b"", SIZE, [(0, G)]))
    meta = VolumeMeta.load(home, "r0")
    meta.gen, meta.primary_open = Generations("a" * 16), True
    assert "the 1 extent(s)" in meta.recover(home, "r0", SIZE)
    assert meta.bitmap_trusted
    saved = extents.bitmap_file(home, "r0").read_bytes()
    assert covered(extents.ranges_from_bitmap(saved, SIZE)) == {0} | set(range(2 * ext // G, 3 * ext // G))
    # Folded into the saved bitmap, the log is dropped: a later start does not replay it again.
    assert not home.activity_log("r0").exists()


def test_a_crashed_primary_with_an_unreadable_activity_log_is_untrusted(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.activity_log("r0").write_bytes(b"\xff" * 8192)  # neither record valid
    meta = VolumeMeta.load(home, "r0")
    meta.gen, meta.primary_open = Generations("a" * 16), True
    assert "full one" in meta.recover(home, "r0", SIZE)
    assert not VolumeMeta.load(home, "r0").bitmap_trusted
