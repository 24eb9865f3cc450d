"""HAstatus's human view: the drbdadm-like tree, rate/ETA from two samples, the progress bar."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mirrord_cli.status_view import (Progress, human_eta, human_rate, in_sync, progress, progress_bar, render_status,
                                     syncing)

SETTINGS = {"volume": "r0", "floating_ip": "198.18.0.10/24", "ping_interval": 1.0}
BEATS_OK = {"sync": {"silent_for": 0.1, "peer": "198.19.0.2"}, "public": {"silent_for": 0.2, "peer": "198.18.0.12"}}


def status(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "primary", "role": "primary", "version": "0.1.0", "serving": True, "degraded": False,
        "peer_connected": True, "floating_ip_held": True,
        "disk": {"state": "UpToDate", "sync_percent": 100.0, "path": "/var/lib/mirrord/disk.img"},
        "replication": {"bytes_synced": 0, "dirty_blocks": 0, "dirty_granularity": 4096},
        "heartbeat": copy.deepcopy(BEATS_OK), "witness_ok": None, "settings_mismatch": [], "peer_error": "",
        "app": {"monitored": False, "healthy": None, "restarts": 0}, "busy": None, "settings": dict(SETTINGS),
    }
    for key, value in over.items():
        if key == "disk":
            base["disk"] = {**base["disk"], **value}
        else:
            base[key] = value
    return base


PRIMARY_IN_SYNC = status()
PRIMARY_SYNCING = status(disk={"sync_percent": 42.1},
                         replication={"bytes_synced": 10 << 20, "dirty_blocks": 9000, "dirty_granularity": 4096})
SECONDARY_SYNCING = status(mode="secondary", role="secondary", serving=False, floating_ip_held=False,
                           disk={"state": "Inconsistent", "sync_percent": 42.1},
                           replication={"bytes_applied": 5 << 20})
SECONDARY_IN_SYNC = status(mode="secondary", role="secondary", serving=False, floating_ip_held=False)
PEER_LOST = status(peer_connected=False, degraded=True, disk={"sync_percent": 0.0},
                   peer_error="data connection lost (peer closed)",
                   heartbeat={"sync": {"silent_for": 4.2, "peer": "198.19.0.2"},
                              "public": {"silent_for": 4.3, "peer": "198.18.0.12"}})
ONE_NETWORK_SILENT = status(heartbeat={"sync": {"silent_for": 3.5, "peer": "198.19.0.2"},
                                       "public": {"silent_for": 0.1, "peer": "198.18.0.12"}})
NEVER_HEARD = status(mode="secondary", role="secondary", peer_connected=False, serving=False,
                     heartbeat={"sync": {"silent_for": None, "peer": "198.19.0.2"},
                                "public": {"silent_for": None, "peer": "198.18.0.12"}})
STANDALONE = status(mode="standalone", role=None, peer_connected=False, serving=False, floating_ip_held=False,
                    heartbeat={}, settings=None, disk={"path": None})
SPLIT_BRAIN = status(mode="standalone", role=None, peer_connected=False, heartbeat={},
                     split_brain="both appliances were primary in term 7")
INCONSISTENT = status(mode="inconsistent", role=None, peer_connected=False, serving=False, floating_ip_held=False,
                      disk={"state": "Inconsistent", "sync_percent": 37.5})
VOLUME = {"name": "r0", "disk": "/d/0", "mount": "/m/0", "state": "UpToDate", "peer_connected": True,
          "sync_percent": 100.0}
THREE_VOLUMES = status(disk={"sync_percent": 70.0}, volumes=[
    VOLUME, {**VOLUME, "name": "r1", "disk": "/d/1", "mount": "/m/1", "sync_percent": 10.0},
    {**VOLUME, "name": "r2", "disk": "/d/2", "mount": None, "peer_connected": False, "sync_percent": 0.0}])
SECONDARY_VOLUMES = status(mode="secondary", role="secondary", serving=False, floating_ip_held=False,
                           disk={"state": "Outdated"}, volumes=[VOLUME, {**VOLUME, "name": "r1", "state": "Outdated"}])
MISMATCH = status(settings_mismatch=["ping_interval"], witness_ok=False,
                  app={"monitored": True, "healthy": False, "restarts": 2}, busy="restarting the application")


@pytest.mark.parametrize(("name", "s", "present", "absent"), [
    ("primary in sync", PRIMARY_IN_SYNC,
     ["r0 mode:primary role:Primary version:0.1.0", "disk:UpToDate /var/lib/mirrord/disk.img",
      "floating-ip:198.18.0.10/24 held-here:yes serving:yes", "peer 198.19.0.2 connection:Connected",
      "replication:Established peer-disk:UpToDate", "networks: public:ok sync:ok"],
     ["done:", "DEGRADED", "SPLIT", "rate:"]),
    ("primary syncing", PRIMARY_SYNCING,
     ["replication:SyncSource peer-disk:Inconsistent done:42.10%"], ["Established", "eta:"]),
    ("secondary syncing", SECONDARY_SYNCING,
     ["r0 mode:secondary role:Secondary", "disk:Inconsistent", "replication:SyncTarget done:42.10%",
      "held-here:no"], ["serving:", "peer-disk:"]),
    ("secondary in sync", SECONDARY_IN_SYNC, ["replication:Established", "disk:UpToDate"], ["done:"]),
    ("peer lost", PEER_LOST,
     ["connection:Connecting", "last error: data connection lost (peer closed)",
      "networks: public:SILENT 4.3s sync:SILENT 4.2s", "DEGRADED: the secondary is not connected; writes are NOT mirrored"],
     ["Connected ", "done:"]),
    ("one network silent", ONE_NETWORK_SILENT, ["networks: public:ok sync:SILENT 3.5s"], ["DEGRADED"]),
    ("never heard", NEVER_HEARD, ["connection:WFConnection", "public:never-heard sync:never-heard"], []),
    ("standalone", STANDALONE, ["r0 mode:standalone role:-", "disk:UpToDate"],
     ["peer ", "floating-ip", "networks", "last the secondary's copy"]),
    ("split brain", SPLIT_BRAIN, ["SPLIT BRAIN: both appliances were primary in term 7"], ["peer "]),
    ("standalone, last the secondary's copy", {**STANDALONE, "disk": {**STANDALONE["disk"], "following": True}},
     ["last the secondary's copy", "with an older copy, or with --force"], []),
    ("secondary: following is normal", status(mode="secondary", disk={"following": True}), [],
     ["last the secondary's copy"]),
    ("inconsistent", INCONSISTENT, ["mode:inconsistent role:Secondary", "disk:Inconsistent", "connection:WFConnection"],
     ["done:"]),
    ("three volumes", THREE_VOLUMES,
     ["disk:UpToDate (3 volumes, the worst counts)", "volume:r0 disk:UpToDate /d/0 mount:/m/0",
      "volume:r1 disk:UpToDate /d/1 mount:/m/1 done:10.00%", "volume:r2 disk:UpToDate /d/2 connection:down"],
     ["/var/lib/mirrord/disk.img", "volume:r0 disk:UpToDate /d/0 mount:/m/0 done"]),
    ("secondary volumes", SECONDARY_VOLUMES, ["disk:Outdated (2 volumes", "volume:r1 disk:Outdated"], []),
    ("one volume is the plain view", status(volumes=[VOLUME]), ["disk:UpToDate /var/lib/mirrord/disk.img"],
     ["volume:"]),
    ("mismatch, witness, app, busy", MISMATCH,
     ["settings differ from the peer's: ping_interval", "witness: not answering", "app: NOT healthy restarts:2",
      "busy: restarting the application"], []),
])
def test_tree(name: str, s: dict[str, Any], present: list[str], absent: list[str]) -> None:
    text = render_status("Summary sentence.", s)
    for fragment in present:
        assert fragment in text, f"{name}: {fragment!r} missing from\n{text}"
    for fragment in absent:
        assert fragment not in text, f"{name}: {fragment!r} unexpected in\n{text}"
    assert text.splitlines()[-1] == "  Summary sentence."
    assert all(line.startswith("  ") for line in text.splitlines()[1:]), "a tree under one head line"


def test_split_brain_flag_without_text() -> None:
    assert "SPLIT BRAIN: both copies changed independently" in render_status("", status(split_brain=True))


def test_rate_and_eta_on_the_primary() -> None:
    later = status(disk={"sync_percent": 60.0},
                   replication={"bytes_synced": 30 << 20, "dirty_blocks": 2560, "dirty_granularity": 4096})
    speed = progress(PRIMARY_SYNCING, later, 2.0)
    assert speed.rate_bps == 10 << 20
    assert speed.eta_s == pytest.approx((2560 * 4096) / (10 << 20))
    text = render_status("", later, speed)
    assert "done:60.00% rate:10.0MiB/s eta:0:00:01" in text


def test_rate_and_eta_on_the_secondary() -> None:
    later = status(mode="secondary", role="secondary", disk={"state": "Inconsistent", "sync_percent": 52.1},
                   replication={"bytes_applied": 7 << 20})
    speed = progress(SECONDARY_SYNCING, later, 1.0)
    assert speed.rate_bps == 2 << 20
    assert speed.eta_s == pytest.approx(47.9 / 10.0)
    assert "rate:2.0MiB/s eta:0:00:05" in render_status("", later, speed)


@pytest.mark.parametrize(("before", "after", "seconds"), [
    (PRIMARY_SYNCING, PRIMARY_IN_SYNC, 1.0),        # the sync finished meanwhile
    (PRIMARY_IN_SYNC, PRIMARY_SYNCING, 1.0),        # a sync started meanwhile
    (PRIMARY_SYNCING, SECONDARY_SYNCING, 1.0),      # a role change between samples
    (PRIMARY_SYNCING, PRIMARY_SYNCING, 0.0),        # no time passed
    (PRIMARY_SYNCING, PEER_LOST, 1.0),              # the peer went away
])
def test_no_speed_when_it_cannot_be_told(before: dict[str, Any], after: dict[str, Any], seconds: float) -> None:
    assert progress(before, after, seconds) == Progress(None, None)


def test_no_rate_when_a_counter_went_backwards() -> None:
    # The primary reconnected between samples: its counters restarted.
    later = status(disk={"sync_percent": 50.0}, replication={"bytes_synced": 1, "dirty_blocks": 10,
                                                             "dirty_granularity": 4096})
    speed = progress(PRIMARY_SYNCING, later, 1.0)
    assert speed.rate_bps is None
    assert speed.eta_s == pytest.approx(50.0 / 7.9)


@pytest.mark.parametrize(("s", "expected"), [
    (PRIMARY_SYNCING, True), (SECONDARY_SYNCING, True), (PRIMARY_IN_SYNC, False), (PEER_LOST, False),
    (INCONSISTENT, False), (STANDALONE, False), (status(disk={"sync_percent": None}), False),
])
def test_syncing(s: dict[str, Any], expected: bool) -> None:
    assert syncing(s) is expected


@pytest.mark.parametrize(("percent", "bar"), [
    (0.0, "[" + "." * 40 + "] 0.00%"),
    (42.1, "[" + "#" * 16 + "." * 24 + "] 42.10%"),
    (100.0, "[" + "#" * 40 + "] 100.00%"),
    (150.0, "[" + "#" * 40 + "] 100.00%"),
    (-3.0, "[" + "." * 40 + "] 0.00%"),
])
def test_progress_bar(percent: float, bar: str) -> None:
    assert progress_bar(percent) == bar


def test_bar_only_in_watch_mode_and_only_while_syncing() -> None:
    assert "[###" in render_status("", PRIMARY_SYNCING, bar=True)
    assert "[###" not in render_status("", PRIMARY_SYNCING)
    assert "[" not in render_status("", PRIMARY_IN_SYNC, bar=True)


@pytest.mark.parametrize(("bps", "text"), [
    (0, "0B/s"), (512, "512B/s"), (2048, "2.0KiB/s"), (10 << 20, "10.0MiB/s"), (3 << 30, "3.0GiB/s"),
])
def test_human_rate(bps: float, text: str) -> None:
    assert human_rate(bps) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05")])
def test_human_eta(seconds: float, text: str) -> None:
    assert human_eta(seconds) == text


@pytest.mark.parametrize(("s", "expected"), [
    (PRIMARY_IN_SYNC, True), (SECONDARY_IN_SYNC, True), (PRIMARY_SYNCING, False), (SECONDARY_SYNCING, False),
    (PEER_LOST, False), (INCONSISTENT, False), (STANDALONE, False), (NEVER_HEARD, False),
])
def test_in_sync(s: dict[str, Any], expected: bool) -> None:
    assert in_sync(s) is expected
