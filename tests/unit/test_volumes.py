"""Several volumes on one pair: option parsing, per-volume views, and the group's aggregate facts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mirrord import config
from mirrord.errors import BadInput
from mirrord.replication.group import links_lost, weighted_percent, worst
from mirrord.replication.meta import DiskState

A1 = ipaddress.IPv4Address("198.18.0.11")
A1_SYNC = ipaddress.IPv4Address("198.19.0.1")

U, O, I = DiskState.UP_TO_DATE, DiskState.OUTDATED, DiskState.INCONSISTENT


def options(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "primary_ip": "198.18.0.11", "secondary_ip": "198.18.0.12", "primary_sync_ip": "198.19.0.1",
        "secondary_sync_ip": "198.19.0.2", "floating_ip": "198.18.0.10/24", "ping_interval": "1",
        "disk": "/d/a",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("count", range(1, config.MAX_VOLUMES + 1))
def test_each_disk_is_a_volume_with_its_own_name_port_and_mount(count: int) -> None:
    disks = [f"/d/v{i}" for i in range(count)]
    mounts = [f"/m/v{i}" for i in range(count)]
    s = config.parse(options(disk=disks if count > 1 else disks[0], mount=mounts if count > 1 else mounts[0]))
    views = s.volumes()
    assert [v.volume for v in views] == ["r0"] + [f"r{i}" for i in range(1, count)]
    assert [str(v.disk) for v in views] == disks
    assert [str(v.mount) for v in views] == mounts
    ports = [v.sync_port for v in views]
    assert ports[0] == config.DEFAULT_SYNC_PORT and len(set(ports)) == count
    assert not {config.HEARTBEAT_PORT, config.LOGSHIP_PORT, config.STATUS_PORT} & set(ports)
    assert all(not v.extra_disks and not v.extra_mounts for v in views)
    assert s.disk == views[0].disk and s.mount == views[0].mount  # volume r0 is what one --disk always was
    # ha.json round trip: a list when several, a plain path when one (as before)
    again = config.parse({k: v for k, v in s.to_json().items() if k in config.FIELDS})
    assert again == s
    assert isinstance(s.to_json()["disk"], list if count > 1 else str)


def test_volumes_without_mounts() -> None:
    s = config.parse(options(disk=["/d/a", "/d/b", "/d/c"]))
    assert [v.mount for v in s.volumes()] == [None, None, None]
    assert s.to_json()["mount"] is None


def test_merge_keeps_the_volumes_and_changes_them() -> None:
    s = config.parse(options(disk=["/d/a", "/d/b"], mount=["/m/a", "/m/b"]))
    assert config.merge(s, {"ping_interval": "2"}).disks == s.disks
    moved = config.merge(s, {"disk": ["/d/a", "/d/c"], "mount": ["/m/a", "/m/c"]})
    assert [str(p) for p in moved.disks] == ["/d/a", "/d/c"]


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"disk": [f"/d/{i}" for i in range(config.MAX_VOLUMES + 1)]}, f"at most {config.MAX_VOLUMES} volumes"),
        ({"disk": ["/d/a", "/d/b"], "mount": ["/m/a"]}, "--mount is given 1 times for 2 disks"),
        ({"disk": ["/d/a"], "mount": ["/m/a", "/m/b"]}, "--mount is given 2 times for 1 disks"),
        ({"disk": ["/d/a", "/d/a"]}, "--disk /d/a is given twice"),
        ({"disk": ["/d/a", "/d/../d/a"]}, "is given twice"),
        ({"disk": ["/d/a", "/d/b"], "mount": ["/m/a", "/m/a"]}, "--mount /m/a is given twice"),
        ({"disk": []}, "Missing --disk"),
        ({"disk": ["/d/a", ""]}, "is not a path"),
        ({"disk": ["/d/a", 3]}, "is not a path"),
        ({"disk": ["/d/a", "/d/b"], "mkfs": "ext4"}, "--mkfs needs --mount"),
    ],
)
def test_bad_volume_options_are_refused(over: dict[str, object], fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment.replace("(", r"\(")):
        config.parse(options(**over))


def test_the_same_disk_under_two_names_is_refused_on_the_machine(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    (tmp_path / "alias.img").symlink_to(disk)
    s = config.parse(options(disk=[str(disk), str(tmp_path / "alias.img")]))
    with pytest.raises(BadInput, match="are the same disk"):
        config.check_local(s, [A1, A1_SYNC])


def test_every_disk_and_mount_is_checked_on_the_machine(tmp_path: Path) -> None:
    disks = []
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(b"\0" * (1 << 20))
        disks.append(str(tmp_path / name))
    (tmp_path / "ma").mkdir()
    (tmp_path / "mb").mkdir()
    (tmp_path / "mb" / "junk").write_text("x")
    good = config.parse(options(disk=disks))
    assert config.check_local(good, [A1, A1_SYNC]) == "primary"
    missing = config.parse(options(disk=[disks[0], str(tmp_path / "none.img")]))
    with pytest.raises(BadInput, match="none.img does not exist"):
        config.check_local(missing, [A1, A1_SYNC])
    busy = config.parse(options(disk=disks, mount=[str(tmp_path / "ma"), str(tmp_path / "mb")]))
    with pytest.raises(BadInput, match="mb is not empty"):
        config.check_local(busy, [A1, A1_SYNC])


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([U], U), ([O], O), ([I], I),
        ([U, U, U, U, U, U, U, U], U),
        ([U, U, O], O), ([O, U], O), ([U, I], I), ([I, U, U], I),
        ([O, I], I), ([I, O], I), ([U, O, I, U], I), ([O, O], O),
        ([], U),
    ],
)
def test_the_group_is_as_bad_as_its_worst_volume(states: list[DiskState], expected: DiskState) -> None:
    assert worst(states) is expected


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([(100.0, 1)], 100.0),
        ([(0.0, 1)], 0.0),
        ([(100.0, 1), (0.0, 1)], 50.0),
        ([(100.0, 3), (0.0, 1)], 75.0),
        ([(50.0, 1 << 30), (100.0, 1 << 20)], pytest.approx(50.0488, abs=1e-3)),
        ([(100.0, 7), (99.9, 1)], pytest.approx(99.9875)),
        ([], 100.0),
    ],
)
def test_sync_progress_is_the_share_of_all_bytes(parts: list[tuple[float, int]], expected: float) -> None:
    assert weighted_percent(parts) == expected


def test_progress_reaches_100_only_when_every_volume_does() -> None:
    for lagging in range(8):
        parts = [(100.0, 1 << 20)] * 8
        parts[lagging] = (99.99, 1 << 20)
        assert weighted_percent(parts) < 100.0


def test_the_command_line_in_ha_log_repeats_a_repeated_option() -> None:
    from mirrord_cli.iwd import given
    from mirrord_cli.runner import describe

    options = given({"disk": ("/d/a", "/d/b"), "mount": ("/m/a",), "mkfs": None, "checksum_sync": False})
    assert options == {"disk": ["/d/a", "/d/b"], "mount": "/m/a", "checksum_sync": False}
    assert describe("startHA", options) == "startHA --disk /d/a --disk /d/b --mount /m/a"
    assert given({"disk": ()}) == {}


UP, DOWN = True, False


@pytest.mark.parametrize(
    ("before", "now", "dropped", "lost"),
    [
        # nothing changes, or links come up (a start): nobody is lost
        ([(UP, 1), (UP, 1)], [(UP, 1), (UP, 1)], [None, None], []),
        ([(DOWN, 0), (DOWN, 0)], [(UP, 1), (DOWN, 0)], [None, None], []),
        ([(UP, 1), (DOWN, 0)], [(UP, 1), (UP, 1)], [None, None], []),
        # a link goes down, or down and up again between two looks (another session)
        ([(UP, 1), (UP, 1)], [(DOWN, 1), (UP, 1)], [None, None], [0]),
        ([(UP, 1), (UP, 4)], [(UP, 1), (UP, 5)], [None, None], [1]),
        ([(UP, 1), (UP, 1), (UP, 1)], [(DOWN, 1), (UP, 1), (DOWN, 1)], [None, None, None], [0, 2]),
        # the loss of a session we dropped ourselves is not news ...
        ([(UP, 1), (UP, 3)], [(DOWN, 1), (DOWN, 3)], [None, 3], [0]),
        ([(UP, 2), (UP, 3)], [(UP, 2), (DOWN, 3)], [None, 3], []),
        ([(UP, 2), (UP, 3)], [(UP, 2), (UP, 4)], [None, 3], []),
        # ... but the loss of its next session is
        ([(UP, 2), (UP, 4)], [(UP, 2), (DOWN, 4)], [None, 3], [1]),
        # a link that was down stays down: nothing new
        ([(DOWN, 2), (UP, 1)], [(DOWN, 2), (UP, 1)], [None, None], []),
    ],
)
def test_which_links_were_lost(before: list[tuple[bool, int]], now: list[tuple[bool, int]],
                               dropped: list[int | None], lost: list[int]) -> None:
    assert links_lost(before, now, dropped) == lost
