"""The activity log (ext/activity_log.h) on real files, through its C entry points.

Record format (encode/decode, CRC, torn and corrupt records, sequence wrap),
the live log's LRU eviction and its rule that an extent with writes in
flight is never evicted, and PrimaryServer's use of the file (geometry
checks, replay into the dirty bitmap) without FUSE. The data path with FUSE
is in tests/lab/test_activity_log_fuse.py.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirrord._native import ffi, lib
from mirrord.errors import ActivityLogError, BadInput, NativeError
from mirrord.replication import native as n
from mirrord.replication.native import PrimaryServer, read_activity_log

KiB = 1 << 10
MiB = 1 << 20
REC = lib.MRD_AL_RECORD_SIZE
U64 = (1 << 64) - 1
EXT = lib.MRD_AL_MIN_EXTENT  # small extents keep the ranges readable


def record(seq: int, extents: list[int], extent_size: int = EXT, slots: int = 8) -> bytes:
    r = ffi.new("struct mrd_al_record *")
    r.seq, r.extent_size, r.slots, r.count = seq, extent_size, slots, len(extents)
    for i, e in enumerate(extents):
        r.extents[i] = e
    out = ffi.new("uint8_t[]", REC)
    rc = lib.mrd_al_encode(r, out)
    if rc:
        raise NativeError(f"encode: {n.strerror(rc)}")
    return bytes(ffi.buffer(out, REC))


def decode(raw: bytes) -> tuple[int, int, int, list[int]]:
    r = ffi.new("struct mrd_al_record *")
    rc = lib.mrd_al_decode(ffi.from_buffer(raw), len(raw), r)
    if rc:
        raise NativeError(n.strerror(rc))
    return int(r.seq), int(r.extent_size), int(r.slots), [int(r.extents[i]) for i in range(r.count)]


def extents(path: Path) -> list[int]:
    return [off // EXT for off, _ in read_activity_log(str(path))]


def newest_seq(path: Path) -> int:
    r = ffi.new("struct mrd_al_record *")
    assert lib.mrd_al_read(str(path).encode(), r, ffi.NULL) == 1
    return int(r.seq)


class Log:
    """A live activity log on a real file (the C object the server drives)."""

    def __init__(self, path: Path, slots: int, extent_size: int = EXT) -> None:
        out = ffi.new("struct mrd_al **")
        rc = lib.mrd_al_open(str(path).encode(), extent_size, slots, out)
        if rc:
            raise n._error(rc, "open activity log")
        self.al = out[0]
        self.size = extent_size

    def begin(self, ext: int, count: int = 1) -> int:
        return int(lib.mrd_al_begin(self.al, ext * self.size, count * self.size))

    def end(self, ext: int, count: int = 1) -> None:
        lib.mrd_al_end(self.al, ext * self.size, count * self.size)

    def touch(self, *exts: int) -> None:
        for e in exts:
            assert self.begin(e) == 0
            self.end(e)

    def hot(self) -> list[int]:
        buf = ffi.new("uint64_t[]", lib.MRD_AL_MAX_SLOTS)
        count = lib.mrd_al_hot(self.al, buf, lib.MRD_AL_MAX_SLOTS)
        return [int(buf[i]) for i in range(count)]

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct mrd_al_stats *")
        assert lib.mrd_al_stats(self.al, s) == 0
        return {k: int(getattr(s, k)) for k in ("updates", "waits", "hot", "busy", "waiting", "slots")}

    def close(self) -> None:
        lib.mrd_al_close(self.al)


@pytest.fixture
def open_log(tmp_path: Path) -> Iterator[Callable[..., Log]]:
    logs: list[Log] = []

    def make(slots: int = 4, extent_size: int = EXT, name: str = "v.al") -> Log:
        log = Log(tmp_path / name, slots, extent_size)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


# ---- record format ---------------------------------------------------------

@pytest.mark.parametrize("seq, exts, size, slots", [
    (0, [], EXT, 1),
    (1, [0], EXT, 1),
    (7, [3, 1, 2], 4 * MiB, 61),
    (1 << 63, [U64 >> 22], 4 * MiB, 61),       # the last extent a 64-bit offset can reach
    (U64, list(range(507)), EXT, 507),          # a full record of the largest log
    (12345, [5, 0, 9], lib.MRD_AL_MAX_EXTENT, 3),
])
def test_record_round_trip(seq: int, exts: list[int], size: int, slots: int) -> None:
    raw = record(seq, exts, size, slots)
    assert len(raw) == REC
    assert raw[:4] == b"MRAL"
    assert decode(raw) == (seq, size, slots, exts)


@pytest.mark.parametrize("size, slots, exts", [
    (EXT + 1, 4, []),                       # not a power of two
    (EXT // 2, 4, []),                      # below the smallest extent
    (lib.MRD_AL_MAX_EXTENT * 2, 4, []),     # above the largest
    (EXT, 0, []),                           # no slot
    (EXT, lib.MRD_AL_MAX_SLOTS + 1, []),    # more than a record holds
    (EXT, 2, [1, 2, 3]),                    # more extents than slots
    (4 * MiB, 4, [(U64 >> 22) + 1]),        # extent offset past 2^64
])
def test_encode_refuses_what_decode_would_reject(size: int, slots: int, exts: list[int]) -> None:
    with pytest.raises(NativeError, match="Invalid argument"):
        record(1, exts, size, slots)


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


@pytest.mark.parametrize("at", [0, 3, 4, 6, 8, 15, 16, 24, 28, 32, 39, 2000, REC - 5, REC - 4, REC - 1])
def test_any_flipped_bit_fails_the_record(at: int) -> None:
    raw = record(9, [4, 2], slots=8)
    with pytest.raises(NativeError, match="no valid record"):
        decode(_flip(raw, at))


def test_short_buffer_and_zeros_are_not_records() -> None:
    raw = record(9, [4, 2])
    for bad in (raw[:REC - 1], bytes(REC), b"\xff" * REC):
        with pytest.raises(NativeError, match="no valid record"):
            decode(bad)


@pytest.mark.parametrize("a, b, newer", [
    (1, 0, True), (0, 1, False), (5, 5, False),
    (0, U64, True), (U64, 0, False),            # the wrap from 2^64-1 to 0
    (3, U64 - 1, True), (U64 - 1, 3, False),
    (1 << 62, 0, True), (0, 1 << 62, False),
])
def test_sequence_comparison_is_serial(a: int, b: int, newer: bool) -> None:
    assert bool(lib.mrd_al_seq_newer(a, b)) is newer


# ---- the file: two records ---------------------------------------------------

def _write(path: Path, rec0: bytes, rec1: bytes = b"") -> None:
    path.write_bytes(rec0 + rec1)


@pytest.mark.parametrize("seq0, seq1, newer", [
    (5, 6, 6),
    (6, 5, 6),
    (U64, 0, 0),     # after the wrap the record with seq 0 is the newer one
    (0, U64, 0),
])
def test_reader_takes_the_newer_valid_record(tmp_path: Path, seq0: int, seq1: int, newer: int) -> None:
    p = tmp_path / "v.al"
    _write(p, record(seq0, [seq0 % 100]), record(seq1, [seq1 % 100]))
    assert extents(p) == [newer % 100] and newest_seq(p) == newer


def test_corrupt_newer_record_falls_back_to_the_other(tmp_path: Path) -> None:
    p = tmp_path / "v.al"
    old, new = record(5, [1, 2]), record(6, [2, 3])
    _write(p, old, _flip(new, 100))
    assert extents(p) == [1, 2]
    _write(p, _flip(new, REC - 1), old)  # the CRC itself damaged, newer one in record 0
    assert extents(p) == [1, 2]


def test_torn_record_falls_back_to_the_other(tmp_path: Path) -> None:
    p = tmp_path / "v.al"
    old = record(5, [1, 2])
    new = record(6, [2, 3, 4])
    stale = record(4, [7])
    # Record 1 half written: its first 512 bytes new, the rest the record it replaced.
    _write(p, old, new[:512] + stale[512:])
    assert extents(p) == [1, 2]
    # The file cut short in the middle of record 1.
    _write(p, old, new[:1000])
    assert extents(p) == [1, 2]


def test_missing_or_empty_file_is_an_empty_log(tmp_path: Path) -> None:
    assert read_activity_log(str(tmp_path / "absent.al")) == []
    (tmp_path / "empty.al").write_bytes(b"")
    assert read_activity_log(str(tmp_path / "empty.al")) == []


def test_no_valid_record_is_an_activity_log_error(tmp_path: Path) -> None:
    p = tmp_path / "v.al"
    _write(p, _flip(record(5, [1]), 50), _flip(record(6, [1]), 50))
    with pytest.raises(ActivityLogError, match="no valid record") as ei:
        read_activity_log(str(p))
    assert ei.value.code == n.E_ALBAD and ei.value.errno is None  # type: ignore[attr-defined]
    p.write_bytes(b"\0" * 100)
    with pytest.raises(ActivityLogError):
        read_activity_log(str(p))


def test_reader_reports_offsets_and_lengths(tmp_path: Path) -> None:
    p = tmp_path / "v.al"
    _write(p, record(1, [0, 3, 1], 4 * MiB, 61))
    assert read_activity_log(str(p)) == [(0, 4 * MiB), (12 * MiB, 4 * MiB), (4 * MiB, 4 * MiB)]


# ---- the live log --------------------------------------------------------------

def test_new_log_is_an_empty_record_on_disk(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=4)
    assert read_activity_log(str(tmp_path / "v.al")) == [] and log.hot() == []
    assert (tmp_path / "v.al").stat().st_size == REC
    assert log.stats()["updates"] == 0


def test_cold_extent_is_persisted_before_begin_returns(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=4)
    p = tmp_path / "v.al"
    assert log.begin(3) == 0
    assert extents(p) == [3]  # on disk while the write is still in flight
    log.end(3)
    assert extents(p) == [3]  # completing a write does not cool its extent
    assert log.stats()["updates"] == 1


def test_hot_extent_costs_no_record_write(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=4)
    log.touch(1, 2)
    before = newest_seq(tmp_path / "v.al")
    log.touch(1, 2, 1, 2, 2, 1)
    assert log.stats()["updates"] == 2 and newest_seq(tmp_path / "v.al") == before


def test_records_alternate_and_sequence_grows(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    seqs = []
    for e in range(6):
        log.touch(e)
        raw = p.read_bytes()
        seqs.append((decode(raw[:REC])[0], decode(raw[REC:])[0] if len(raw) > REC else None))
    newest = [max(s for s in pair if s is not None) for pair in seqs]
    assert newest == [2, 3, 4, 5, 6, 7]  # the empty record of a new file was 1
    # Each write went to the record that did not hold the newest one.
    for (a0, a1), (b0, b1) in zip(seqs, seqs[1:]):
        assert (a0 == b0) != (a1 == b1)


def test_lru_eviction_order(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=3)
    p = tmp_path / "v.al"
    log.touch(0, 1, 2)
    assert extents(p) == [0, 1, 2]
    log.touch(0)           # 1 is now the least recently used
    log.touch(3)
    assert extents(p) == [2, 0, 3]
    log.touch(4)           # then 2
    assert extents(p) == [0, 3, 4]
    log.touch(3, 0, 5)     # then 4
    assert extents(p) == [3, 0, 5] == log.hot()


def test_busy_extent_is_never_evicted(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=3)
    p = tmp_path / "v.al"
    assert log.begin(0) == 0          # in flight, and the oldest
    log.touch(1, 2)
    log.touch(3)                      # evicts 1, the oldest idle one, not 0
    assert sorted(extents(p)) == [0, 2, 3]
    log.touch(4)
    assert sorted(extents(p)) == [0, 3, 4]
    log.end(0)
    log.touch(5)                      # 0 is idle and the least recently used now
    assert sorted(extents(p)) == [3, 4, 5]


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + 10
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.005)


def test_all_slots_busy_makes_a_cold_write_wait(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    assert log.begin(0) == 0 and log.begin(1) == 0
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(log.begin(2)))
    waiter.start()
    try:
        _wait_for(lambda: log.stats()["waiting"] == 1, "the cold write waiting")
        # Still waiting: nothing was evicted, nothing was written.
        assert waiter.is_alive() and result == [] and extents(p) == [0, 1]
        assert log.begin(1) == 0  # a hot extent still goes through at once
        log.end(1)
        log.end(1)
        waiter.join(10)
        assert not waiter.is_alive() and result == [0]
        assert sorted(extents(p)) == [0, 2]  # 1 went, 0 (busy) stayed
        assert log.stats()["waits"] == 1
    finally:
        log.end(0)
        log.end(1)
        waiter.join(10)
    log.end(2)


def test_range_over_two_extents_takes_both_at_once(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    assert log.begin(0) == 0
    # Extents 5 and 6 need both slots: it must not take one and wait for the other.
    done: list[int] = []
    waiter = threading.Thread(target=lambda: done.append(log.begin(5, 2)))
    waiter.start()
    try:
        _wait_for(lambda: log.stats()["waiting"] == 1, "the two-extent write waiting")
        assert extents(p) == [0] and log.hot() == [0]
        log.end(0)
        waiter.join(10)
        assert done == [0] and extents(p) == [5, 6] and log.stats()["updates"] == 2
    finally:
        waiter.join(10)
    log.end(5, 2)


def test_range_needing_more_extents_than_slots_is_refused(open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    assert log.begin(0, 3) == -errno.E2BIG
    assert lib.mrd_al_begin(log.al, 0, 0) == -errno.EINVAL
    assert log.hot() == []


def test_clear_needs_nothing_in_flight(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=4)
    p = tmp_path / "v.al"
    assert log.begin(1) == 0
    assert lib.mrd_al_clear(log.al) == n.E_STATE
    assert extents(p) == [1]
    log.end(1)
    assert lib.mrd_al_clear(log.al) == 0
    assert extents(p) == [] and log.hot() == []
    seq = newest_seq(p)
    assert lib.mrd_al_clear(log.al) == 0 and newest_seq(p) == seq  # already empty: no write


def test_reopen_keeps_what_the_file_lists(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=3)
    log.touch(7, 2, 9)
    seq = newest_seq(tmp_path / "v.al")
    log2 = open_log(slots=4)  # a crash: the first log never cleared anything
    assert log2.hot() == [7, 2, 9] and newest_seq(tmp_path / "v.al") == seq
    log2.touch(1, 3)          # one free slot: 7 goes, the rest stay
    assert extents(tmp_path / "v.al") == [2, 9, 1, 3]


def test_writer_continues_across_the_sequence_wrap(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    p = tmp_path / "v.al"
    _write(p, record(U64 - 1, [1]), record(U64, [1, 2]))
    log = open_log(slots=8)
    log.touch(3)
    raw = p.read_bytes()
    assert decode(raw[:REC])[0] == 0 and decode(raw[REC:])[0] == U64  # wrote over the older record
    assert extents(p) == [1, 2, 3]
    log.touch(4)
    assert newest_seq(p) == 1 and extents(p) == [1, 2, 3, 4]


# ---- cold only when clean (the flush callback) ----------------------------------

class Flusher:
    """A flush callback for a Log: records what the log file listed at each
    call (the eviction must not be on disk yet) and answers from a script."""

    def __init__(self, log: Log, path: Path, answers: list[int] | None = None) -> None:
        self.listed: list[list[int]] = []
        self.answers = list(answers or [])
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.cb = ffi.callback("int(void *)", self._call)
        self.path = path
        lib.mrd_al_set_callbacks(log.al, self.cb, ffi.NULL, ffi.NULL)

    def _call(self, _ctx: object) -> int:
        self.listed.append(extents(self.path))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return self.answers.pop(0) if self.answers else 0


def test_idle_extent_goes_cold_only_after_a_flush_covers_its_writes(tmp_path: Path,
                                                                    open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    f = Flusher(log, p)
    log.touch(0, 1)
    assert f.listed == []                  # free slots: nothing to flush
    log.touch(2)                           # 0 and 1 hold completed, unflushed writes
    assert f.listed == [[0, 1]]            # flushed before the record that drops 0
    assert extents(p) == [1, 2]
    log.touch(3)                           # 1's writes ended before that flush: no new one
    assert len(f.listed) == 1 and extents(p) == [2, 3]
    log.touch(4)                           # 2 was written after it
    assert f.listed == [[0, 1], [2, 3]] and extents(p) == [3, 4]


def test_flushes_are_counted_and_hot_extents_never_flush(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=3)
    f = Flusher(log, tmp_path / "v.al")
    log.touch(0, 1, 2, 0, 1, 2, 2, 1)
    assert f.listed == []
    log.touch(5, 6, 7)                     # the flush for 5 covered 0, 1 and 2
    assert len(f.listed) == 1
    log.touch(8)                           # 5 was written after it
    s = ffi.new("struct mrd_al_stats *")
    assert lib.mrd_al_stats(log.al, s) == 0
    assert int(s.flushes) == len(f.listed) == 2 and int(s.waits) == 0


def test_failed_flush_fails_the_write_and_evicts_nothing(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    f = Flusher(log, p, answers=[-errno.EIO])
    log.touch(0, 1)
    assert log.begin(2) == -errno.EIO
    assert extents(p) == [0, 1] and log.hot() == [0, 1] and log.stats()["waiting"] == 0
    log.touch(2)                           # the next flush succeeds
    assert len(f.listed) == 2 and extents(p) == [1, 2]


def test_flush_answering_later_is_retried(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    """MRD_ENOPEER (the server is suspended): the writer waits and asks again."""
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    f = Flusher(log, p, answers=[n.E_NOPEER, n.E_NOPEER])
    log.touch(0, 1)
    log.touch(2)
    assert f.listed == [[0, 1]] * 3 and extents(p) == [1, 2]


def test_writes_completed_during_a_flush_are_not_covered_by_it(tmp_path: Path,
                                                              open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    f = Flusher(log, p)
    f.gate = threading.Event()
    log.touch(0, 1)
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(log.begin(2)))
    second = threading.Thread(target=lambda: results.append(log.begin(3)))
    first.start()
    try:
        assert f.entered.wait(10)
        second.start()
        _wait_for(lambda: log.stats()["waiting"] == 2, "the second cold write waiting")
        assert len(f.listed) == 1          # it waits for the running flush, it does not start one
        log.touch(1)                       # a hot extent goes through during the flush
        f.gate.set()
        first.join(10)
        second.join(10)
        assert results == [0, 0]
        # 2 took 0's slot; 3 needed 1's, whose write ended during the first flush: a second one.
        assert len(f.listed) == 2 and sorted(extents(p)) == [2, 3]
    finally:
        f.gate.set()
        first.join(10)
        if second.ident is not None:
            second.join(10)
    log.end(2)
    log.end(3)


def test_kept_extent_is_never_evicted(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=3)
    p = tmp_path / "v.al"
    kept = {0}
    asked: list[int] = []

    def keep(_ctx: object, ext: int) -> int:
        asked.append(ext)
        return int(ext in kept)

    cb = ffi.callback("int(void *, uint64_t)", keep)
    lib.mrd_al_set_callbacks(log.al, ffi.NULL, cb, ffi.NULL)
    log.touch(0, 1, 2)
    assert asked == []                     # free slots: nobody asked
    log.touch(3)                           # 0 is the least recently used, but kept: 1 goes
    assert sorted(extents(p)) == [0, 2, 3]
    log.touch(4)
    assert sorted(extents(p)) == [0, 3, 4]
    kept.clear()                           # its blocks were resynced: 0 may go now
    log.touch(5)
    assert sorted(extents(p)) == [3, 4, 5]


def test_write_waits_while_every_idle_extent_is_kept(tmp_path: Path, open_log: Callable[..., Log]) -> None:
    log = open_log(slots=2)
    p = tmp_path / "v.al"
    kept = {0, 1}
    cb = ffi.callback("int(void *, uint64_t)", lambda _ctx, ext: int(ext in kept))
    lib.mrd_al_set_callbacks(log.al, ffi.NULL, cb, ffi.NULL)
    log.touch(0, 1)
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(log.begin(2)))
    waiter.start()
    try:
        _wait_for(lambda: log.stats()["waiting"] == 1, "the cold write waiting")
        assert result == [] and extents(p) == [0, 1]
        kept.discard(1)
        log.touch(0)                       # any completed write wakes the waiters to look again
        waiter.join(10)
        assert result == [0] and sorted(extents(p)) == [0, 2]
    finally:
        kept.clear()
        log.touch(0)
        waiter.join(10)
    log.end(2)


@pytest.mark.parametrize("size, slots, listed", [
    (2 * EXT, 8, [1]),        # another extent size
    (EXT, 2, [1, 2, 3]),      # more extents than the new log has slots
])
def test_reopen_with_another_geometry_is_refused(tmp_path: Path, size: int, slots: int, listed: list[int]) -> None:
    p = tmp_path / "v.al"
    _write(p, record(3, listed, EXT, 8))
    with pytest.raises(ActivityLogError, match="another extent size"):
        Log(p, slots, size)
    assert extents(p) == listed  # left as it was


def test_open_refuses_a_file_with_no_valid_record(tmp_path: Path) -> None:
    p = tmp_path / "v.al"
    p.write_bytes(b"\x07" * 2 * REC)
    with pytest.raises(ActivityLogError, match="no valid record"):
        Log(p, 4)
    assert p.read_bytes() == b"\x07" * 2 * REC


# ---- PrimaryServer's use of the file (no FUSE) -------------------------------------

@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "disk.img"
    with open(d, "wb") as f:
        f.truncate(18 * MiB)
    return d


@pytest.mark.parametrize("size, slots, message", [
    (3 * MiB, 61, "power of two"),
    (32 * KiB, 61, "power of two"),
    (4 * MiB, 1, "needs 2 to 507 slots"),
    (4 * MiB, 508, "needs 2 to 507 slots"),
    (64 * KiB, 16, "needs 17 to 507 slots"),  # a 1 MiB write can touch 17 such extents
])
def test_server_refuses_bad_geometry(tmp_path: Path, disk: Path, size: int, slots: int, message: str) -> None:
    al = tmp_path / "v.al"
    with pytest.raises(BadInput, match=message):
        PrimaryServer(str(disk), str(tmp_path / "dev"), activity_log=str(al), al_extent_size=size, al_slots=slots)
    assert not al.exists()


def test_server_replays_a_crash_log_into_the_dirty_bitmap(tmp_path: Path, disk: Path) -> None:
    al = tmp_path / "v.al"
    # Extent 4 covers 16..20 MiB of an 18 MiB disk: only its first 2 MiB exist.
    _write(al, record(8, [1, 4], 4 * MiB, 61))
    with PrimaryServer(str(disk), str(tmp_path / "dev"), activity_log=str(al)) as s:
        assert s.stats().dirty_blocks == (4 * MiB + 2 * MiB) // 4096
        st = s.activity_log_stats()
        assert (st.al_hot, st.al_slots, st.al_extent_size, st.al_updates) == (2, n.AL_DEFAULT_SLOTS, 4 * MiB, 0)
    # Stopped with dirty blocks (the peer never got them): the log still lists them.
    assert read_activity_log(str(al)) == [(4 * MiB, 4 * MiB), (16 * MiB, 4 * MiB)]


def test_server_without_dirty_blocks_empties_the_log_on_stop(tmp_path: Path, disk: Path) -> None:
    al = tmp_path / "v.al"
    with PrimaryServer(str(disk), str(tmp_path / "dev"), activity_log=str(al)) as s:
        assert s.activity_log_stats().al_hot == 0
    assert al.stat().st_size == REC and read_activity_log(str(al)) == []


def test_server_refuses_a_log_of_another_geometry(tmp_path: Path, disk: Path) -> None:
    al = tmp_path / "v.al"
    _write(al, record(8, [1], 4 * MiB, 61))
    with pytest.raises(ActivityLogError, match="another extent size"):
        PrimaryServer(str(disk), str(tmp_path / "dev"), activity_log=str(al), al_extent_size=8 * MiB)
    assert read_activity_log(str(al)) == [(4 * MiB, 4 * MiB)]


def test_server_without_a_log_reports_zeros(tmp_path: Path, disk: Path) -> None:
    with PrimaryServer(str(disk), str(tmp_path / "dev")) as s:
        assert s.activity_log_stats().as_dict() == {
            "al_updates": 0, "al_waits": 0, "al_flushes": 0, "al_hot": 0, "al_slots": 0, "al_extent_size": 0}
