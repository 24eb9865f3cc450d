"""A finished sync is reported only once the secondary saved it (decision 44).

The primary moves its own identifiers and says ``sync_done``; the secondary
saves the identifiers it carries, marks itself UpToDate and answers
``synced``; only that answer makes the primary report 100 %, allow a failOver
and release held writes. The lab test that found the gap
(tests/lab/test_mirror.py::test_returning_secondary_gets_only_what_changed)
crashed the secondary right after the primary first showed 100 %.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mirrord.config import Endpoints
from mirrord.errors import PeerError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import generations, link
from mirrord.replication.generations import Generations
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.primary import PrimarySide
from mirrord.replication.secondary import SecondarySide
from sides import A1, A2, S1, S2, follow, settings

SIZE = 1 << 20
SYNCING = Generations(current="00000000000000a1", bitmap="00000000000000b1", history=("00000000000000c1",))


class FinishedServer:
    """Stands in for the C server: connected, and its sync has sent every block."""

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(peer_connected=True, sync_done=True, sync_active=False, dirty_bytes=0,
                               bytes_synced=SIZE, peer_failures=3, last_error="")


def _primary(home: Home, tmp_path: Path) -> PrimarySide:
    side = PrimarySide(home, settings(tmp_path), HALog(home), SIZE, Endpoints(A1, S1, A2, S2), lambda: None, None,
                       VolumeMeta(gen=SYNCING))
    side.server = FinishedServer()  # type: ignore[assignment]
    side.peer.connected = True
    return side


def _next(far: socket.socket, kind: str) -> dict[str, Any]:
    for _ in range(100):  # bounded: progress comes every 0.2 s, sync_done with the first
        msg = link.recv(far)
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind} from the primary")


def _until(condition: Any) -> bool:
    for _ in range(500):  # bounded: 5 s
        if condition():
            return True
        threading.Event().wait(0.01)
    return False


def test_the_primary_reports_the_sync_finished_only_when_the_secondary_saved_it(home: Home, tmp_path: Path) -> None:
    side = _primary(home, tmp_path)
    near, far = socket.socketpair()
    far.settimeout(10)
    watch = threading.Thread(target=side._watch, args=(near,), daemon=True)
    watch.start()
    try:
        done = _next(far, "sync_done")
        # Our identifiers moved and were saved before we said so ...
        finished = generations.finish_sync_source(SYNCING)
        assert Generations.from_json(done["gen"]) == finished
        assert VolumeMeta.load(home, "r0").gen == finished
        # ... but nothing calls the pair in sync before the secondary answers.
        assert _next(far, "progress")["percent"] < 100.0
        assert not side.peer.sync_done and side.peer.sync_percent < 100.0 and not side.resync.get("done")
        assert not (home.log_dir / "ha.log").exists()  # "Sync ... complete" is its first line
        link.send(far, {"type": "synced"})
        assert _until(lambda: side.peer.sync_done)
        assert side.peer.sync_percent == 100.0 and side.peer.synced_link == 3 and side.resync["done"]
        assert _next(far, "progress")["percent"] == 100.0
        assert "the secondary is UpToDate" in (home.log_dir / "ha.log").read_text()
    finally:
        side._stop.set()
        watch.join(5)
        near.close(), far.close()
    assert not watch.is_alive()


def test_a_synced_for_no_finished_sync_ends_the_link(home: Home, tmp_path: Path) -> None:
    side = _primary(home, tmp_path)
    side.peer.sync_done = True  # reported already: a second synced is not an answer to anything
    near, far = socket.socketpair()
    link.send(far, {"type": "synced"})
    raised: list[BaseException] = []

    def watch() -> None:
        try:
            side._watch(near)
        except PeerError as exc:
            raised.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    watcher.join(5)
    side._stop.set()  # ends a loop that ignored it
    watcher.join(5)
    near.close(), far.close()
    assert raised and "not finished" in str(raised[0])


def test_the_secondary_answers_synced_after_it_saved_the_identifiers(home: Home, tmp_path: Path) -> None:
    VolumeMeta(gen=Generations(current="00000000000000b1"), disk_state=DiskState.INCONSISTENT).save(home, "r0")
    (tmp_path / "disk.img").write_bytes(bytes(SIZE))
    side = SecondarySide(home, settings(tmp_path), HALog(home), SIZE, VolumeMeta.load(home, "r0"),
                         Endpoints(A2, S2, A1, S1), lambda: None, None)
    far, follower = follow(side)
    try:
        finished = generations.finish_sync_source(SYNCING)
        link.send(far, {"type": "sync_done", "gen": finished.to_json()})
        assert link.recv(far) == {"type": "synced"}
        saved = VolumeMeta.load(home, "r0")  # what a crash from here on finds
        assert saved.gen == finished and saved.disk_state is DiskState.UP_TO_DATE
    finally:
        far.close()
        follower.join(10)
    assert not follower.is_alive()


def test_a_synced_that_cannot_be_sent_ends_the_session_with_the_sync_recorded(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary died right after its sync_done: the send of synced fails. The session must
    still end the ordinary way, and the finished sync count: the disk is UpToDate."""
    VolumeMeta(gen=Generations(current="00000000000000b1"), disk_state=DiskState.INCONSISTENT).save(home, "r0")
    (tmp_path / "disk.img").write_bytes(bytes(SIZE))
    side = SecondarySide(home, settings(tmp_path), HALog(home), SIZE, VolumeMeta.load(home, "r0"),
                         Endpoints(A2, S2, A1, S1), lambda: None, None)
    real_send = link.send

    def reset_on_synced(sock: socket.socket, message: dict[str, Any]) -> None:
        if message.get("type") == "synced":
            sock.shutdown(socket.SHUT_WR)  # the real send then fails with EPIPE, as on a dead link
        real_send(sock, message)

    ended: list[str] = []
    monkeypatch.setattr(link, "send", reset_on_synced)
    monkeypatch.setattr(side, "_end_session", lambda reason, only=None: ended.append(reason))
    far, follower = follow(side)
    try:
        real_send(far, {"type": "sync_done", "gen": generations.finish_sync_source(SYNCING).to_json()})
        follower.join(10)
    finally:
        far.close()
        follower.join(10)
    assert not follower.is_alive() and ended and "BrokenPipeError" in ended[0]
    assert side.primary.synced and VolumeMeta.load(home, "r0").disk_state is DiskState.UP_TO_DATE
