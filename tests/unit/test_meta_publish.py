"""The secondary's disk state is on disk before anyone can see it, and a takeover never races a
data handshake (reviewed in session 7).

The heartbeats read the volumes' metadata without waiting, and a primary told "Outdated" goes on
writing alone: an Outdated copy that is not yet Outdated on its disk would, after a power loss,
come back UpToDate and could be made primary without those writes. And a takeover that stops the
secondary while the old primary's data handshake runs must leave neither a changed disk state
nor a receiver behind.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from mirrord import atomicfile
from mirrord.config import Endpoints, Settings
from mirrord.errors import PeerError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import link, meta as meta_module
from mirrord.replication.generations import Generations, Kind, Plan
from mirrord.replication.group import SecondaryGroup, worst
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.secondary import SecondarySide

A1, A2 = ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.18.0.12")
S1, S2 = ipaddress.IPv4Address("198.19.0.11"), ipaddress.IPv4Address("198.19.0.12")


def _settings(disk: Path, volume: str = "r0") -> Settings:
    return Settings(primary_ip=A1, secondary_ip=A2, primary_sync_ip=S1, secondary_sync_ip=S2,
                    floating_ip=ipaddress.IPv4Interface("198.18.0.100/24"), ping_interval=0.1, disk=disk,
                    volume=volume)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path / "home")
    h.ensure()
    return h


def _side(home: Home, tmp_path: Path, volume: str, meta: VolumeMeta) -> SecondarySide:
    disk = tmp_path / f"{volume}.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    return SecondarySide(home, _settings(disk, volume), HALog(home), 1 << 20, meta,
                         Endpoints(A2, S2, A1, S1), lambda: None, None)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 (the handshake tunes TCP options)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    return client, server


def test_update_publishes_only_what_is_on_disk(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = VolumeMeta()
    seen: list[DiskState] = []
    real = atomicfile.write_json

    def write(path: Path, data: dict[str, Any]) -> None:
        seen.append(meta.disk_state)  # what a heartbeat would read while the file is written
        real(path, data)

    monkeypatch.setattr(meta_module.atomicfile, "write_json", write)
    meta.update(home, "r0", disk_state=DiskState.OUTDATED)
    assert seen == [DiskState.UP_TO_DATE]
    assert meta.disk_state is DiskState.OUTDATED
    assert VolumeMeta.load(home, "r0").disk_state is DiskState.OUTDATED


def test_failed_update_changes_nothing(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = VolumeMeta()
    meta.save(home, "r0")

    def full(path: Path, data: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(meta_module.atomicfile, "write_json", full)
    with pytest.raises(OSError):
        meta.update(home, "r0", disk_state=DiskState.OUTDATED, gen=Generations(current="000000000000000a"))
    assert meta.disk_state is DiskState.UP_TO_DATE and meta.gen == Generations()


def test_group_outdate_writes_every_volume_before_the_group_looks_outdated(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metas = [VolumeMeta(), VolumeMeta(), VolumeMeta(disk_state=DiskState.INCONSISTENT)]
    sides = [_side(home, tmp_path, f"r{i}", m) for i, m in enumerate(metas)]
    seen: list[DiskState] = []
    real = atomicfile.write_json

    def write(path: Path, data: dict[str, Any]) -> None:
        seen.append(worst(m.disk_state for m in metas[:2]))  # the state the heartbeats carry
        real(path, data)

    monkeypatch.setattr(meta_module.atomicfile, "write_json", write)
    try:
        SecondaryGroup(sides).outdate()
    finally:
        for side in sides:
            side.stop()
    assert seen == [DiskState.UP_TO_DATE, DiskState.UP_TO_DATE]  # the Inconsistent copy is left as it is
    assert [m.disk_state for m in metas] == [DiskState.OUTDATED, DiskState.OUTDATED, DiskState.INCONSISTENT]
    assert [VolumeMeta.load(home, f"r{i}").disk_state for i in range(2)] == [DiskState.OUTDATED] * 2


@pytest.mark.parametrize("before", [
    VolumeMeta(gen=Generations(current="00000000000000c1")),
    # a copy a verify marked keeps the mark (decision 48): --force may still serve it
    VolumeMeta(gen=Generations(current="00000000000000c1"), disk_state=DiskState.INCONSISTENT, verify_found=True),
], ids=["UpToDate", "verify_found"])
def test_takeover_during_a_data_handshake_leaves_the_disk_state_and_no_receiver(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: VolumeMeta) -> None:
    meta, state, marked = before, before.disk_state, before.verify_found
    meta.save(home, "r0")
    side = _side(home, tmp_path, "r0", meta)
    control, control_far = _tcp_pair()
    data, data_far = _tcp_pair()
    side._control = control
    side._pending = "token"
    side._pending_sync = (Plan(Kind.BITMAP, source="peer"), "00000000000000d1")
    stopper = threading.Thread(target=side.stop)
    real_send = link.send

    def send(conn: socket.socket, msg: dict[str, Any]) -> None:
        if msg == {"type": "ok"}:  # the takeover stops this side right now
            stopper.start()
            for _ in range(1000):
                if side._stop.is_set():
                    break
                threading.Event().wait(0.005)
            assert meta.disk_state is DiskState.INCONSISTENT  # on disk first, for the sync to come
        real_send(conn, msg)

    monkeypatch.setattr(link, "send", send)
    try:
        with pytest.raises(PeerError, match="stopped"):
            side._on_data(data, {"type": "data", "session": "token", "proof": link.proof(None, "data", "token")})
        stopper.join(10)
        assert not stopper.is_alive()
        assert side._receiver is None
        saved = VolumeMeta.load(home, "r0")
        for m in (meta, saved):
            assert (m.disk_state, m.verify_found, m.gen) == (state, marked, Generations(current="00000000000000c1"))
    finally:
        if stopper.is_alive() or stopper.ident is None:
            side.stop()
        for s in (control_far, data, data_far):
            s.close()


# -- VolumeMeta.following (decision 41) -----------------------------------------------------------

def test_following_survives_a_save_and_old_files_read_as_not_following(home: Home) -> None:
    VolumeMeta(following=True).save(home, "r0")
    assert VolumeMeta.load(home, "r0").following is True
    data = atomicfile.read_json(home.meta_file("r0"))
    del data["following"]
    atomicfile.write_json(home.meta_file("r0"), data)
    assert VolumeMeta.load(home, "r0").following is False


@pytest.mark.parametrize(("saved", "read"), [
    ("00000000000000c5", "00000000000000c5"),
    (None, ""),            # written before the field existed
    ("not an id", ""),     # anything else: the sync copies what it marked, as before
    (7, ""),
])
def test_checksum_sync_is_read_only_as_an_identifier(home: Home, saved: object, read: str) -> None:
    VolumeMeta(checksum_sync="00000000000000c5").save(home, "r0")
    data = atomicfile.read_json(home.meta_file("r0"))
    if saved is None:
        del data["checksum_sync"]
    else:
        data["checksum_sync"] = saved
    atomicfile.write_json(home.meta_file("r0"), data)
    assert VolumeMeta.load(home, "r0").checksum_sync == read


U, O, I = DiskState.UP_TO_DATE, DiskState.OUTDATED, DiskState.INCONSISTENT


@pytest.mark.parametrize(("state", "following", "force", "refused"), [
    (U, False, False, ""),
    (U, True, False, "was last the secondary's copy, or this appliance crashed as primary"),
    (U, True, True, ""),
    (U, False, True, "--force is not needed"),
    (O, False, False, "is Outdated"),
    (O, True, False, "is Outdated"),
    (O, False, True, ""),
    (O, True, True, ""),
    (I, False, False, "not even with --force"),
    (I, True, True, "not even with --force"),
    (I, False, True, "not even with --force"),
])
def test_why_not_primary_with_the_peer_silent(state: DiskState, following: bool, force: bool, refused: str) -> None:
    why = meta_module.why_not_primary(state, following, force, None)
    assert (refused in why) if refused else why == ""
    assert bool(why) == bool(refused)


NEWER_HERE, SAME, NEWER_THERE = Plan(Kind.BITMAP, "local", "r70"), Plan(Kind.IN_SYNC, None, "r40"), \
    Plan(Kind.BITMAP, "peer", "r50")


@pytest.mark.parametrize(("state", "following", "peer", "refused"), [
    (U, True, SAME, ""),
    (U, True, NEWER_HERE, ""),
    (O, False, NEWER_HERE, ""),       # its identifiers say the Outdated mark is stale
    (U, False, NEWER_THERE, "holds newer data"),
    (U, True, NEWER_THERE, "rule r50"),
    (U, False, Plan(Kind.FULL, "peer", "r20"), "holds newer data"),  # a blank disk here, data there
    (U, False, Plan(Kind.SPLIT_BRAIN, None, "r90"), ""),  # the handshake refuses and records it
    (I, False, NEWER_HERE, "not even with --force"),
    # Copies that changed apart vouch for nothing: a copy that may be behind needs --force.
    (U, True, Plan(Kind.SPLIT_BRAIN, None, "r90"), "changed apart (split brain)"),
    (O, False, Plan(Kind.SPLIT_BRAIN, None, "r100"), "disk is Outdated"),
    (U, True, Plan(Kind.UNRELATED, None, "r110"), "changed apart (unrelated)"),
    (U, True, Plan(Kind.FULL, None, "r10"), ""),      # two new disks
])
def test_why_not_primary_with_the_peer_answering(state: DiskState, following: bool, peer: Plan, refused: str) -> None:
    why = meta_module.why_not_primary(state, following, False, peer)
    assert (refused in why) if refused else why == ""
    assert bool(why) == bool(refused)


@pytest.mark.parametrize(("state", "following", "peer", "refused"), [
    (U, True, Plan(Kind.SPLIT_BRAIN, None, "r90"), ""),
    (O, True, Plan(Kind.UNRELATED, None, "r110"), ""),
    (U, True, NEWER_THERE, "holds newer data"),       # never: the peer's copy is the one to serve
    (U, False, Plan(Kind.SPLIT_BRAIN, None, "r90"), "--force is not needed"),
    (I, True, Plan(Kind.SPLIT_BRAIN, None, "r90"), "not even with --force"),
])
def test_why_not_primary_forced_with_the_peer_answering(state: DiskState, following: bool, peer: Plan,
                                                         refused: str) -> None:
    why = meta_module.why_not_primary(state, following, True, peer)
    assert (refused in why) if refused else why == ""
    assert bool(why) == bool(refused)


# -- Inconsistent because a verify found differences (decision 48) ---------------------------------

@pytest.mark.parametrize(("following", "force", "peer", "refused"), [
    (True, False, None, "online verify found blocks"),
    (False, False, None, "online verify found blocks"),
    (True, True, None, ""),                           # the primary is lost for good: the operator's word
    (True, False, SAME, "online verify found blocks"),  # same identifiers say nothing of those blocks
    (True, False, NEWER_HERE, "online verify found blocks"),
    (True, True, NEWER_THERE, "holds newer data"),
    (True, True, SAME, ""),                           # (startHA then refuses --force while the peer answers)
])
def test_why_not_primary_serves_a_copy_a_verify_marked_only_when_forced(
        following: bool, force: bool, peer: Plan | None, refused: str) -> None:
    why = meta_module.why_not_primary(I, following, force, peer, verify_found=True)
    assert (refused in why) if refused else why == ""
    assert bool(why) == bool(refused)


def test_a_new_disk_state_clears_the_verify_mark_unless_it_sets_it(home: Home) -> None:
    meta = VolumeMeta(following=True)
    meta.update(home, "r0", disk_state=DiskState.INCONSISTENT, verify_found=True)
    assert VolumeMeta.load(home, "r0").verify_found and meta.verify_found
    meta.update(home, "r0", following=False)  # no new disk state: the mark stays
    assert VolumeMeta.load(home, "r0").verify_found
    meta.update(home, "r0", disk_state=DiskState.INCONSISTENT)  # a sync starts into it: half-copied from now on
    assert not VolumeMeta.load(home, "r0").verify_found and not meta.verify_found
    data = atomicfile.read_json(home.meta_file("r0"))
    del data["verify_found"]  # a file written before the field
    atomicfile.write_json(home.meta_file("r0"), data)
    assert VolumeMeta.load(home, "r0").verify_found is False
