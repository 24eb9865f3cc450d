"""One session at a time on the secondary (secondary.py, "Sessions").

A secondary that was frozen, or only slow, still has its old session when the
primary, which gave up on it, connects again. Nothing of the old session may
act once the new one has begun: its receiver must be stopped (and apply no
more frames) before the new one starts, and its follower must not record a
sync_done, nor obey a promote, it read before the primary reconnected. The
receiver here is a stand-in whose stop() blocks until the test lets it go,
as the real one does while it finishes a frame or an fdatasync.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from mirrord.config import Endpoints
from mirrord.errors import PeerError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import generations, link, secondary
from mirrord.replication import meta as meta_module
from mirrord.replication.group import SecondaryGroup
from mirrord.replication.generations import Generations, Kind, Plan
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.secondary import SecondarySide
from sides import A1, A2, S1, S2, follow, settings

SIZE = 1 << 20
OLD_SYNC = Generations(current="00000000000000a1", bitmap="00000000000000b1")
NEW_SYNC_ID = "00000000000000d1"
TOKEN = "t" * 32


class HeldReceiver:
    """Stands in for the C receiver; stop() returns only once ``release`` is set."""

    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name
        self.release = threading.Event()
        events.append(f"{name} started")

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(last_error="", as_dict=lambda: {})

    def stop(self) -> None:
        self.events.append(f"{self.name} stopping")
        self.release.wait(10)
        self.events.append(f"{self.name} stopped")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname(), timeout=10)
        near, _ = listener.accept()
    return near, far


@pytest.fixture
def side(home: Home, tmp_path: Path) -> SecondarySide:
    VolumeMeta(gen=Generations(current="00000000000000b1"), disk_state=DiskState.INCONSISTENT).save(home, "r0")
    (tmp_path / "disk.img").write_bytes(bytes(SIZE))
    return SecondarySide(home, settings(tmp_path), HALog(home), SIZE, VolumeMeta.load(home, "r0"),
                         Endpoints(A2, S2, A1, S1), lambda: None, None)


def _agree(side: SecondarySide, control: socket.socket) -> None:
    """What _on_hello leaves for the data connection once the primary's new hello is agreed."""
    with side._lock:
        side._pending, side._control = TOKEN, control
        side._pending_sync = (Plan(Kind.BITMAP, source="peer"), NEW_SYNC_ID)


def _in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the test's thread
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def _new_receivers(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> list[HeldReceiver]:
    """Every receiver the side starts from now on is a HeldReceiver, listed in the result."""
    started: list[HeldReceiver] = []

    def receiver(path: str, size: int, fd: int) -> HeldReceiver:
        started.append(HeldReceiver(events, "new receiver"))
        return started[-1]

    monkeypatch.setattr(secondary, "Receiver", receiver)
    return started


def test_a_new_session_starts_only_after_the_old_receiver_stopped(
        side: SecondarySide, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    started = _new_receivers(monkeypatch, events)
    old = HeldReceiver(events, "old receiver")
    side._receiver = old
    far_old, follower = follow(side)
    far_old.close()  # the primary gave up on the old session: its follower ends it, the stop blocks
    control, control_far = _tcp_pair()
    data, data_far = _tcp_pair()
    try:
        for _ in range(400):
            if "old receiver stopping" in events:
                break
            threading.Event().wait(0.005)
        assert "old receiver stopping" in events
        _agree(side, control)
        joining, raised = _in_thread(lambda: side._on_data(
            data, {"type": "data", "session": TOKEN, "proof": link.proof(None, "data", TOKEN)}))
        joining.join(0.3)
        assert not started, "the new receiver started while the old one was still applying frames"
        old.release.set()
        joining.join(10)
        follower.join(10)
        assert not raised and not joining.is_alive() and not follower.is_alive()
        assert events == ["old receiver started", "old receiver stopping", "old receiver stopped",
                          "new receiver started"]
        # The old session's end left the new one alone.
        assert side.primary.connected and side._receiver is started[0] and side._control is control
    finally:
        old.release.set()
        for s in started:
            s.release.set()
        side.stop()
        for s in (control_far, data, data_far):
            s.close()


def test_a_sync_done_read_before_the_primary_reconnected_is_not_recorded_over_the_new_sync(
        side: SecondarySide, home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old follower read sync_done, then stalled (a freeze) while the primary reconnected and
    the new sync began. Recorded after that, it would say UpToDate of a disk the new sync has only
    begun to write."""
    events: list[str] = []
    started = _new_receivers(monkeypatch, events)
    side._receiver = HeldReceiver(events, "old receiver")
    side._receiver.release.set()
    far_old, follower = follow(side)
    stalled, go_on = threading.Event(), threading.Event()
    real = Generations.from_json

    def stall(value: object) -> Generations:
        if threading.current_thread() is follower:
            stalled.set()
            go_on.wait(10)
        return real(value)

    monkeypatch.setattr(Generations, "from_json", staticmethod(stall))
    control, control_far = _tcp_pair()
    data, data_far = _tcp_pair()
    try:
        link.send(far_old, {"type": "sync_done", "gen": generations.finish_sync_source(OLD_SYNC).to_json()})
        assert stalled.wait(10)
        _agree(side, control)
        joining, raised = _in_thread(lambda: side._on_data(
            data, {"type": "data", "session": TOKEN, "proof": link.proof(None, "data", TOKEN)}))
        joining.join(0.3)
        go_on.set()
        joining.join(10)
        far_old.close()  # ends the old follower (as the new hello's end of the old session does)
        follower.join(10)
        assert not raised and not joining.is_alive() and not follower.is_alive()
        saved = VolumeMeta.load(home, "r0")
        assert saved.disk_state is DiskState.INCONSISTENT and saved.gen.current == NEW_SYNC_ID
        assert not side.primary.synced and side.primary.connected
    finally:
        go_on.set()
        for s in started:
            s.release.set()
        side.stop()
        for s in (far_old, control_far, data, data_far):
            s.close()


def test_a_promote_read_after_the_primary_reconnected_is_not_obeyed(home: Home, tmp_path: Path) -> None:
    VolumeMeta(gen=Generations(current="00000000000000b1"), disk_state=DiskState.UP_TO_DATE).save(home, "r0")
    (tmp_path / "disk.img").write_bytes(bytes(SIZE))
    promoted = threading.Event()
    side = SecondarySide(home, settings(tmp_path), HALog(home), SIZE, VolumeMeta.load(home, "r0"),
                         Endpoints(A2, S2, A1, S1), promoted.set, None)
    far_old, follower = follow(side)
    control, control_far = _tcp_pair()
    try:
        with side._turn:  # the primary's new hello is being agreed (what _on_hello holds)
            link.send(far_old, {"type": "promote"})
            follower.join(0.3)
            side._end_turn("the primary reconnected")
            _agree(side, control)
        follower.join(10)
        assert not follower.is_alive()
        assert not promoted.is_set(), "a handover of the old session promoted this side under the new one"
        assert side._control is control
    finally:
        side.stop()
        for s in (far_old, control_far):
            s.close()


def _following(side: SecondarySide) -> tuple[socket.socket, threading.Thread]:
    """follow(), once the follower is waiting for the primary's next message."""
    far, follower = follow(side)
    link.send(far, {"type": "progress", "percent": 42.0})
    for _ in range(1000):
        if side.primary.sync_percent == 42.0:
            break
        threading.Event().wait(0.005)
    assert side.primary.sync_percent == 42.0
    threading.Event().wait(0.1)  # back in recv
    return far, follower


def test_a_sync_done_read_after_stop_following_is_not_recorded(side: SecondarySide, home: Home) -> None:
    """A takeover or stopHA stops following before it relies on the disk state: a sync_done read
    after that must not change it."""
    far, follower = _following(side)
    try:
        side.stop_following()
        link.send(far, {"type": "sync_done", "gen": generations.finish_sync_source(OLD_SYNC).to_json()})
        follower.join(10)
        assert not follower.is_alive()
        assert VolumeMeta.load(home, "r0").disk_state is DiskState.INCONSISTENT and not side.primary.synced
    finally:
        far.close()
        side.stop()


@pytest.fixture
def following_group(home: Home, tmp_path: Path) -> Iterator[SecondaryGroup]:
    """An UpToDate secondary in a group of one, its follower waiting for the primary."""
    VolumeMeta(gen=OLD_SYNC).save(home, "r0")
    (tmp_path / "disk.img").write_bytes(bytes(SIZE))
    side = SecondarySide(home, settings(tmp_path), HALog(home), SIZE, VolumeMeta.load(home, "r0"),
                         Endpoints(A2, S2, A1, S1), lambda: None, None)
    yield SecondaryGroup([side])
    side.stop()


def test_leaving_marks_outdated_and_stops_following_in_one_step(
        following_group: SecondaryGroup, home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    side = following_group.sides[0]
    far, follower = _following(side)
    real = following_group.outdate

    def outdate_as_a_sync_done_comes() -> None:
        real()
        link.send(far, {"type": "sync_done", "gen": generations.finish_sync_source(OLD_SYNC).to_json()})
        threading.Event().wait(0.2)  # read, and waiting for the turn leave() holds

    monkeypatch.setattr(following_group, "outdate", outdate_as_a_sync_done_comes)
    try:
        following_group.leave()
        follower.join(10)
        assert not follower.is_alive()
        assert VolumeMeta.load(home, "r0").disk_state is DiskState.OUTDATED and not side.primary.synced
    finally:
        far.close()


def test_leaving_changes_nothing_when_the_mark_cannot_be_saved(
        following_group: SecondaryGroup, home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    side = following_group.sides[0]

    def fail(path: Path, data: dict[str, Any]) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(meta_module.atomicfile, "write_json", fail)
    with pytest.raises(OSError):
        following_group.leave()
    assert side.meta.disk_state is DiskState.UP_TO_DATE and not side._stop.is_set()  # still following


def test_a_handshake_gives_up_while_the_session_before_is_still_ending(side: SecondarySide) -> None:
    """A receiver stuck on a hung disk keeps its session ending; the primary's next connections
    are dropped once the primary has given up on them, instead of waiting behind it."""
    control, control_far = _tcp_pair()
    data, data_far = _tcp_pair()
    _agree(side, control)
    try:
        with side._turn, pytest.raises(PeerError, match="not ended yet"):
            side._on_data(data, {"type": "data", "session": TOKEN, "proof": link.proof(None, "data", TOKEN)})
        assert side._receiver is None and side._pending == TOKEN
    finally:
        side.stop()
        for s in (control_far, data, data_far):
            s.close()
