"""A data connection that fails right after the handshake (decision 43), with the real sides.

A PrimarySide (C server, FUSE) and a SecondarySide (C receiver) run in this
process and replicate over 127.0.0.1. Their disks and metadata are laid out
as a returning secondary finds them: the primary holds a bitmap of what the
secondary lacks. The fault is injected where the real one strikes: the
secondary's data handshake fails before (or just after) it notes the sync
identifier. The next connect must resync from the bitmap, and only a full
sync's bitmap may then hold every block. Needs root and /dev/fuse; without
them the tests skip, or fail under CI=true.
"""

from __future__ import annotations

import filecmp
import ipaddress
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirrord.config import Endpoints, Settings
from mirrord.errors import PeerError
from mirrord.halog import HALog
from mirrord.paths import Home
from mirrord.replication import extents, link
from mirrord.replication.generations import Generations
from mirrord.replication.meta import DiskState, VolumeMeta
from mirrord.replication.primary import PrimarySide
from mirrord.replication.secondary import SecondarySide
from under_ci import skip_or_fail

pytestmark = pytest.mark.lab

MiB = 1 << 20
SIZE = 16 * MiB
LOCAL = ipaddress.IPv4Address("127.0.0.1")
#: The generation the secondary holds, and the primary's since it went on alone.
HELD, ALONE = "b" * 16, "c" * 16
#: What the primary wrote alone (its bitmap says so), and what it wrote before a crash that
#: nothing recorded (only a full sync can know).
WRITTEN_ALONE = (4 * MiB, MiB)
UNRECORDED = (10 * MiB, 256 << 10)
SYNC_SECONDS = 60.0
#: All a comparing sync may copy in these tests: the two sync chunks (1 MiB each, the unit it
#: compares) that WRITTEN_ALONE and UNRECORDED fall in.
DIFFERING = 2 * MiB


def _require() -> None:
    missing = "root" if os.geteuid() != 0 else "/dev/fuse" if not os.path.exists("/dev/fuse") else None
    if missing:
        skip_or_fail(f"the lost-sync-start test needs {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((str(LOCAL), 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    home: Home
    settings: Settings

    @property
    def disk(self) -> Path:
        return self.settings.disk

    def log(self) -> str:
        path = self.home.log_dir / "ha.log"
        return path.read_text() if path.exists() else ""


def _node(root: Path, name: str, port: int, data: bytes) -> Node:
    home = Home(root / name)
    home.ensure()
    disk = root / f"{name}.img"
    disk.write_bytes(data)
    settings = Settings(primary_ip=LOCAL, secondary_ip=LOCAL, primary_sync_ip=LOCAL, secondary_sync_ip=LOCAL,
                        floating_ip=ipaddress.IPv4Interface("198.18.0.10/24"), ping_interval=1.0, disk=disk,
                        sync_port=port)
    return Node(home, settings)


def _overwrite(path: Path, where: tuple[int, int], seed: int) -> None:
    offset, length = where
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Node, Node]:
    """Two copies of one disk at HELD; the primary then wrote WRITTEN_ALONE alone and recorded it."""
    _require()
    base = random.Random(1).randbytes(SIZE)
    port = _free_port()
    primary, secondary = _node(tmp_path, "a1", port, base), _node(tmp_path, "a2", port, base)
    _overwrite(primary.disk, WRITTEN_ALONE, seed=2)
    extents.bitmap_file(primary.home, "r0").write_bytes(extents.add_to_bitmap(b"", SIZE, [WRITTEN_ALONE]))
    VolumeMeta(gen=Generations(ALONE, HELD)).save(primary.home, "r0")
    VolumeMeta(gen=Generations(HELD)).save(secondary.home, "r0")
    return primary, secondary


@contextmanager
def running(primary: Node, secondary: Node, before_data: Callable[[], None] = lambda: None) -> Iterator[PrimarySide]:
    """Both sides replicating; always stopped. ``before_data`` runs first in every data handshake
    of the secondary (a fault it raises fails that data connection)."""
    s = SecondarySide(secondary.home, secondary.settings, HALog(secondary.home), SIZE,
                      VolumeMeta.load(secondary.home, "r0"), Endpoints(LOCAL, LOCAL, LOCAL, LOCAL),
                      lambda: None, None)
    real = s._on_data

    def on_data(conn: socket.socket, msg: dict[str, object]) -> None:
        before_data()
        real(conn, msg)

    s._on_data = on_data  # type: ignore[method-assign]
    p = PrimarySide(primary.home, primary.settings, HALog(primary.home), SIZE,
                    Endpoints(LOCAL, LOCAL, LOCAL, LOCAL), lambda: None, None, VolumeMeta.load(primary.home, "r0"))
    s.start()
    try:
        p.start()
        try:
            yield p
        finally:
            p.stop()
    finally:
        s.stop()


def _wait_synced(p: PrimarySide, secondary: Node) -> None:
    deadline = time.monotonic() + SYNC_SECONDS
    while not (p.peer.sync_done and VolumeMeta.load(secondary.home, "r0").disk_state is DiskState.UP_TO_DATE):
        assert time.monotonic() < deadline, f"no sync completed in {SYNC_SECONDS} s: {p.peer}, {p.resync}"
        time.sleep(0.05)


@pytest.mark.parametrize("failures", [1, 2])
def test_a_sync_start_the_secondary_never_noted_is_resumed_from_the_bitmap(pair: tuple[Node, Node],
                                                                           failures: int) -> None:
    """Once, or twice in a row: a start retried under the same identifier is recognised again."""
    primary, secondary = pair
    injected: list[str] = []

    def fail_before_noting() -> None:
        if len(injected) < failures:
            injected.append("data handshake")
            raise PeerError("injected: the data connection failed before this disk noted the sync identifier")

    with running(primary, secondary, fail_before_noting) as p:
        _wait_synced(p, secondary)
        resync = dict(p.resync)
    assert len(injected) == failures
    assert resync["kind"] == "bitmap" and resync["rule"] == "r71", resync
    assert resync["dirty_bytes_at_start"] == WRITTEN_ALONE[1], resync
    assert resync["bytes_sent"] <= 1.05 * WRITTEN_ALONE[1], resync
    assert "the last sync start never reached the target" in primary.log()
    assert filecmp.cmp(primary.disk, secondary.disk, shallow=False)
    assert VolumeMeta.load(primary.home, "r0").gen == VolumeMeta.load(secondary.home, "r0").gen


def test_a_full_sync_cut_right_after_the_secondary_noted_it_still_sends_every_block(
        pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary crashed before, unrecorded: its bitmap is untrusted, so the sync is a full one.
    The secondary notes the sync identifier, then the link fails before the primary hears "ok":
    the next connect is a bitmap resync (the secondary holds the sync identifier), and that
    bitmap must already hold every block."""
    primary, secondary = pair
    _overwrite(primary.disk, UNRECORDED, seed=3)
    meta = VolumeMeta.load(primary.home, "r0")
    meta.bitmap_trusted = False
    meta.save(primary.home, "r0")
    real_send = link.send
    lost: list[str] = []

    def send_losing_the_first_ok(sock: socket.socket, message: dict[str, Any]) -> None:
        if message.get("type") == "ok" and not lost:
            lost.append("ok")
            raise ConnectionResetError("injected: the link failed after this disk noted the sync identifier")
        real_send(sock, message)

    monkeypatch.setattr(link, "send", send_losing_the_first_ok)
    with running(primary, secondary) as p:
        _wait_synced(p, secondary)
        resync = dict(p.resync)
    assert lost == ["ok"]
    # It goes on as it started: comparing, and copying only what differs (the session 8 review).
    assert resync["kind"] == "checksum" and resync["rule"] == "r70", resync
    assert resync["dirty_bytes_at_start"] == SIZE, resync
    assert resync["bytes_sent"] <= DIFFERING, resync
    assert filecmp.cmp(primary.disk, secondary.disk, shallow=False)


def test_a_lost_start_of_a_checksum_sync_is_retried_as_one(pair: tuple[Node, Node]) -> None:
    """The same full sync (untrusted bitmap, so every block is compared); the secondary's data
    handshake fails before it notes the sync identifier. The retry (r71) holds every block in its
    bitmap and must compare them, not copy the whole disk."""
    primary, secondary = pair
    _overwrite(primary.disk, UNRECORDED, seed=3)
    meta = VolumeMeta.load(primary.home, "r0")
    meta.bitmap_trusted = False
    meta.save(primary.home, "r0")
    injected: list[str] = []

    def fail_before_noting() -> None:
        if not injected:
            injected.append("data handshake")
            raise PeerError("injected: the data connection failed before this disk noted the sync identifier")

    with running(primary, secondary, fail_before_noting) as p:
        _wait_synced(p, secondary)
        resync = dict(p.resync)
    assert injected
    assert resync["kind"] == "checksum" and resync["rule"] == "r71", resync
    assert resync["dirty_bytes_at_start"] == SIZE, resync
    assert resync["bytes_sent"] <= DIFFERING, resync
    assert filecmp.cmp(primary.disk, secondary.disk, shallow=False)
