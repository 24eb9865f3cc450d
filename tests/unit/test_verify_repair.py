"""The differences `mirrord verify` finds survive a crash before their repair ends (decision 42).

The primary writes its live dirty bitmap to the bitmap file (primary_open
still set, so recover() adds the activity log to it) and tells the secondary,
which marks its disk Inconsistent, before the repair resync starts. The lab
test (tests/lab/test_resync.py) crashes a real primary inside the repair;
these check the order of the steps and the edge cases without a lab.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mirrord.config import Endpoints
from mirrord.errors import MirrordError, PeerError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import extents, link, primary as primary_module
from mirrord.replication.generations import Generations
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.primary import SAVE_DIFFERENCES_SECONDS, KeptDifferences, PrimarySide
from mirrord.replication.secondary import SecondarySide
from sides import A1, A2, S1, S2, follow, settings

SIZE = 1 << 20
MIB_DIRTY = b"\xff" * 32  # the first 1 MiB chunk's 256 blocks of 4 KiB


class VerifyingServer:
    """Stands in for the C server: a verify pass that reports ``running`` (the differences found so
    far, one value a look) while it runs, then ends with ``differed``, at the end of the disk or
    not; it notes at each look whether the bitmap file exists."""

    def __init__(self, bitmap_path: Path, differed: int, reaches_end: bool = True,
                 running: tuple[int, ...] = ()) -> None:
        self.bitmap_path = bitmap_path
        self.differed = differed
        self.reaches_end = reaches_end
        self.running = list(running)
        self.verified = self.stopped = False
        self.file_seen: list[bool] = []
        #: the bitmap file as the repair resync found it when it started
        self.file_at_sync: bytes | None = None

    def stats(self) -> SimpleNamespace:
        if self.verified and self.running and not self.stopped:
            self.file_seen.append(self.bitmap_path.exists())
            return SimpleNamespace(sync_active=True, sync_done=False, sync_offset=0, bytes_verified=0,
                                   last_error="", verify_diff_bytes=self.running.pop(0))
        return SimpleNamespace(sync_active=False, sync_done=self.reaches_end and not self.stopped,
                               sync_offset=SIZE // 2, bytes_verified=SIZE if self.verified else 0, last_error="",
                               verify_diff_bytes=self.differed if self.verified else 0)

    def start_verify(self, offset: int) -> None:
        self.verified = True

    def stop_sync(self) -> None:
        self.stopped = True

    def start_sync(self, offset: int, dirty_only: bool = False) -> None:
        assert dirty_only
        self.file_at_sync = self.bitmap_path.read_bytes()

    def dirty_bitmap(self) -> bytes:
        return MIB_DIRTY


def _primary(home: Home, tmp_path: Path, server: VerifyingServer, control: socket.socket | None) -> PrimarySide:
    side = PrimarySide(home, settings(tmp_path), HALog(home), SIZE, Endpoints(A1, S1, A2, S2),
                       lambda: None, None, VolumeMeta(primary_open=True))
    side.server = server  # type: ignore[assignment]
    side.peer.connected = side.peer.sync_done = True
    side._control = control
    return side


def test_verify_persists_the_differences_and_tells_the_secondary_before_the_repair(
        home: Home, tmp_path: Path) -> None:
    path = extents.bitmap_file(home, "r0")
    server = VerifyingServer(path, differed=SIZE)
    near, far = socket.socketpair()
    try:
        side = _primary(home, tmp_path, server, near)
        assert side.verify() == (SIZE, SIZE)
        assert link.recv(far) == {"type": "out_of_sync", "bytes": SIZE}
    finally:
        near.close()
        far.close()
    assert server.file_at_sync == MIB_DIRTY
    assert side.meta.primary_open and not side.peer.sync_done  # a crash from here on is recovered


def test_kept_differences_are_saved_first_at_once_then_at_most_every_second_and_all_at_the_end() -> None:
    kept = KeptDifferences()
    assert not kept.due(0, 0.0) and kept.due(SIZE, 0.0)
    kept.bytes, kept.at = SIZE, 10.0
    assert not kept.due(SIZE, 99.0)  # nothing new
    assert not kept.due(2 * SIZE, 10.0 + SAVE_DIFFERENCES_SECONDS / 2)
    assert kept.due(2 * SIZE, 10.0 + SAVE_DIFFERENCES_SECONDS / 2, final=True)
    assert kept.due(2 * SIZE, 10.0 + SAVE_DIFFERENCES_SECONDS)


def test_the_first_difference_is_told_and_saved_while_the_pass_still_runs(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(primary_module.time, "sleep", lambda _s: None)
    path = extents.bitmap_file(home, "r0")
    server = VerifyingServer(path, differed=2 * SIZE, running=(0, SIZE, SIZE, 2 * SIZE))
    near, far = socket.socketpair()
    try:
        side = _primary(home, tmp_path, server, near)
        assert side.verify() == (SIZE, 2 * SIZE)
        near.close()
        assert link.recv(far) == {"type": "out_of_sync", "bytes": SIZE}
        with pytest.raises(PeerError):  # told once: nothing after it but the end of the connection
            link.recv(far)
    finally:
        near.close()
        far.close()
    assert server.file_seen == [False, False, True, True]
    assert server.file_at_sync == MIB_DIRTY


def test_a_verify_out_of_time_still_resends_what_it_found(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 1e9, 1e9, 1e9])  # the deadline passes at the second look
    monkeypatch.setattr(primary_module, "time", SimpleNamespace(monotonic=lambda: next(clock), sleep=lambda _s: None))
    path = extents.bitmap_file(home, "r0")
    server = VerifyingServer(path, differed=SIZE, running=(SIZE,) * 10)
    side = _primary(home, tmp_path, server, None)
    with pytest.raises(MirrordError, match=f"the {SIZE} bytes that differed until then are being resent"):
        side.verify()
    assert server.stopped and server.file_at_sync == MIB_DIRTY and not side.peer.sync_done


def test_an_interrupted_verify_persists_what_it_found_and_starts_no_repair(home: Home, tmp_path: Path) -> None:
    path = extents.bitmap_file(home, "r0")
    server = VerifyingServer(path, differed=SIZE, reaches_end=False)
    side = _primary(home, tmp_path, server, None)  # the link is gone: nobody to tell
    with pytest.raises(PeerError, match="marked and resent when it reconnects"):
        side.verify()
    assert path.read_bytes() == MIB_DIRTY and server.file_at_sync is None


def test_a_bitmap_file_that_cannot_be_written_still_lets_the_repair_run(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = extents.bitmap_file(home, "r0")
    path.write_bytes(b"old")
    server = VerifyingServer(path, differed=SIZE)
    side = _primary(home, tmp_path, server, None)

    def full(target: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(primary_module.atomicfile, "write_bytes", full)
    assert side.verify() == (SIZE, SIZE)
    assert server.file_at_sync == b"old" and not side.peer.sync_done  # the repair started
    assert "a crash of this appliance before that is done would forget them" in (
        home.log_dir / "ha.log").read_text()


def test_a_verify_after_a_clean_stop_leaves_the_final_bitmap(home: Home, tmp_path: Path) -> None:
    path = extents.bitmap_file(home, "r0")
    side = _primary(home, tmp_path, VerifyingServer(path, differed=SIZE), None)
    side.meta.primary_open = False  # what _save_bitmap leaves after writing the final bitmap
    side._persist_bitmap(side.server)  # type: ignore[arg-type]
    assert not path.exists()


def test_recover_after_a_crash_in_the_repair_adds_the_activity_log_to_the_differences(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    path = extents.bitmap_file(home, "r0")
    path.write_bytes(MIB_DIRTY)  # what the verify persisted
    monkeypatch.setattr(extents, "activity_log_extents", lambda h, v: [(SIZE - 4096, 4096)])
    meta = VolumeMeta(primary_open=True, gen=Generations(current="00000000000000a1"))
    assert "activity log" in meta.recover(home, "r0", SIZE)
    assert path.read_bytes() == MIB_DIRTY  # the last block's bit is in the same (whole) chunk
    assert meta.bitmap_trusted and not meta.primary_open


def _secondary(home: Home, tmp_path: Path, meta: VolumeMeta) -> SecondarySide:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    return SecondarySide(home, settings(tmp_path), HALog(home), SIZE, meta, Endpoints(A2, S2, A1, S1),
                         lambda: None, None)


def _follow(side: SecondarySide, messages: list[dict[str, Any]], hang_up: bool = True) -> None:
    """Run the secondary's control loop over these messages from the primary until it ends: when
    the primary hangs up, or (``hang_up`` False) on its own."""
    far, follower = follow(side)
    try:
        for message in messages:
            link.send(far, message)
        if hang_up:
            far.close()
        follower.join(10)
        assert not follower.is_alive()
    finally:
        far.close()
        follower.join(10)


def test_the_secondary_is_inconsistent_from_the_verify_to_the_end_of_its_repair(
        home: Home, tmp_path: Path) -> None:
    meta = VolumeMeta()
    meta.save(home, "r0")
    side = _secondary(home, tmp_path, meta)
    _follow(side, [{"type": "out_of_sync", "bytes": SIZE}])
    assert meta.disk_state is DiskState.INCONSISTENT
    saved = VolumeMeta.load(home, "r0")
    assert saved.disk_state is DiskState.INCONSISTENT  # a power loss keeps it
    assert saved.verify_found  # a whole copy but for what differs: --force may serve it (decision 48)
    assert "differ on this disk" in (home.log_dir / "ha.log").read_text()
    gen = Generations(current="00000000000000b1")
    _follow(side, [{"type": "out_of_sync", "bytes": SIZE}, {"type": "sync_done", "gen": gen.to_json()}])
    saved = VolumeMeta.load(home, "r0")
    assert saved.disk_state is DiskState.UP_TO_DATE and not saved.verify_found


def test_a_verify_of_a_copy_a_sync_left_half_written_leaves_it_half_written(home: Home, tmp_path: Path) -> None:
    meta = VolumeMeta(disk_state=DiskState.INCONSISTENT)
    meta.save(home, "r0")
    side = _secondary(home, tmp_path, meta)
    _follow(side, [{"type": "out_of_sync", "bytes": SIZE}])
    saved = VolumeMeta.load(home, "r0")
    assert saved.disk_state is DiskState.INCONSISTENT and not saved.verify_found


def test_a_malformed_out_of_sync_ends_the_link(home: Home, tmp_path: Path) -> None:
    meta = VolumeMeta()
    meta.save(home, "r0")
    side = _secondary(home, tmp_path, meta)
    _follow(side, [{"type": "out_of_sync", "bytes": "lots"}], hang_up=False)
    assert side._control is None and meta.disk_state is DiskState.UP_TO_DATE


class RacingServer:
    """A verify pass that ends; the progress reporter (_watch) looks at the stats just then and is
    held there (as a thread can be between two C calls) while the verify starts its repair."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.watch_looked = threading.Event()
        self.repair_started = threading.Event()

    def stats(self) -> SimpleNamespace:
        phase = self.phase
        if phase == "pass" and threading.current_thread().name == "verify":
            self.phase = "pass over"  # after this look
        look = SimpleNamespace(sync_active=phase in ("pass", "repair"), sync_done=phase in ("idle", "pass over"),
                               sync_offset=SIZE, bytes_verified=SIZE, last_error="", verify_diff_bytes=4096,
                               peer_connected=True, dirty_bytes=4096, bytes_synced=0, peer_failures=0)
        if phase == "pass over" and threading.current_thread().name == "watch":
            self.watch_looked.set()
            self.repair_started.wait(0.5)  # without the lock, the verify starts its repair meanwhile
        return look

    def start_verify(self, _offset: int) -> None:
        self.phase = "pass"

    def start_sync(self, _offset: int, dirty_only: bool = False) -> None:
        self.watch_looked.wait(0.5)  # the reporter's look comes first, if nothing keeps it out
        self.phase = "repair"
        self.repair_started.set()

    def dirty_bitmap(self) -> bytes:
        return MIB_DIRTY


def test_the_end_of_a_verify_pass_is_never_reported_as_the_end_of_its_repair(home: Home, tmp_path: Path) -> None:
    near, far = socket.socketpair()
    side = PrimarySide(home, settings(tmp_path), HALog(home), SIZE, Endpoints(A1, S1, A2, S2), lambda: None, None,
                       VolumeMeta(primary_open=True))
    server = RacingServer()
    side.server, side._control = server, near  # type: ignore[assignment]
    side.peer.connected = side.peer.sync_done = True
    verify = threading.Thread(target=side.verify, name="verify")
    verify.start()
    for _ in range(5000):  # bounded: the pass ends after the verify's first look
        if server.phase != "idle" and server.phase != "pass":
            break
        threading.Event().wait(0.001)
    watch = threading.Thread(target=side._watch, args=(near,), name="watch", daemon=True)
    watch.start()
    verify.join(5)
    assert server.phase == "repair" and not verify.is_alive()
    threading.Event().wait(2 * primary_module.PROGRESS_SECONDS)  # the reporter's next looks
    side._stop.set()
    watch.join(5)
    far.setblocking(False)
    sent = b""
    try:
        while chunk := far.recv(65536):
            sent += chunk
    except BlockingIOError:
        pass
    near.close(), far.close()
    assert b"sync_done" not in sent and not side.peer.sync_done
