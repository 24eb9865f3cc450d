import ipaddress
from pathlib import Path

import pytest

from mirrord import config
from mirrord.errors import BadInput

A1 = ipaddress.IPv4Address("198.18.0.11")
A1_SYNC = ipaddress.IPv4Address("198.19.0.1")
A2 = ipaddress.IPv4Address("198.18.0.12")
A2_SYNC = ipaddress.IPv4Address("198.19.0.2")


def options(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "primary_ip": "198.18.0.11",
        "secondary_ip": "198.18.0.12",
        "primary_sync_ip": "198.19.0.1",
        "secondary_sync_ip": "198.19.0.2",
        "floating_ip": "198.18.0.10/24",
        "ping_interval": "1",
        "disk": "/nonexistent",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(("given", "rate"), [(None, 0.0), ("", 0.0), ("0", 0.0), ("1", 1.0), ("250.5", 250.5),
                                              ("100000", 100000.0)])
def test_resync_rate(given: str | None, rate: float) -> None:
    assert config.parse(options(resync_rate=given)).resync_rate == rate


def test_good_options_parse() -> None:
    s = config.parse(options())
    assert s.floating_ip == ipaddress.IPv4Interface("198.18.0.10/24")
    assert s.ping_interval == 1.0
    assert config.parse({k: v for k, v in s.to_json().items() if k in config.FIELDS}) == s


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"floating_ip": "198.18.1.10/24"}, "outside the public subnet"),
        ({"floating_ip": "198.18.0.10"}, "no prefix length"),
        ({"floating_ip": "198.18.0.10/32"}, "prefix /32"),
        ({"floating_ip": "198.18.0.11/24"}, "appliance's own address"),
        ({"floating_ip": "198.18.0.255/24"}, "broadcast"),
        ({"floating_ip": "nonsense/24"}, "not an IPv4 address"),
        ({"secondary_ip": "198.18.0.11"}, "both 198.18.0.11"),
        ({"secondary_sync_ip": "198.19.0.1"}, "both 198.19.0.1"),
        ({"primary_ip": "198.18.0.300"}, "--primary-ip '198.18.0.300' is not an IPv4 address"),
        ({"primary_sync_ip": "198.18.0.20"}, "on the public subnet"),
        ({"secondary_sync_ip": "198.18.0.21"}, "on the public subnet"),
        ({"ping_interval": "0"}, "out of range"),
        ({"ping_interval": "-1"}, "out of range"),
        ({"ping_interval": "100000"}, "out of range"),
        ({"ping_interval": "nan"}, "out of range"),
        ({"ping_interval": "soon"}, "not a number"),
        ({"mkfs": "ntfs", "mount": "/mnt"}, "not supported"),
        ({"mkfs": "ext4"}, "--mkfs needs --mount"),
        ({"disk": None}, "Missing --disk"),
        ({"primary_ip": None, "floating_ip": None}, "Missing --primary-ip, --floating-ip"),
        ({"resync_rate": "fast"}, "--resync-rate 'fast' is not a number"),
        ({"resync_rate": "0.5"}, "out of range"),
        ({"resync_rate": "-1"}, "out of range"),
        ({"resync_rate": "nan"}, "out of range"),
        ({"resync_rate": "1e9"}, "out of range"),
    ],
)
def test_bad_options_name_the_value(over: dict[str, object], fragment: str) -> None:
    with pytest.raises(BadInput) as info:
        config.parse(options(**over))
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def test_role_from_addresses(disk: Path) -> None:
    s = config.parse(options(disk=str(disk)))
    assert config.check_local(s, {A1, A1_SYNC}) == "primary"
    assert config.check_local(s, {A2, A2_SYNC}) == "secondary"
    assert s.endpoints("secondary") == config.Endpoints(A2, A2_SYNC, A1, A1_SYNC)
    assert s.endpoints("primary") == config.Endpoints(A1, A1_SYNC, A2, A2_SYNC)


@pytest.mark.parametrize(
    ("addresses", "fragment"),
    [
        (set(), "Neither --primary-ip 198.18.0.11 nor --secondary-ip 198.18.0.12"),
        ({A1, A2, A1_SYNC}, "holds both"),
        ({A1}, "--primary-sync-ip 198.19.0.1 is not one of its addresses"),
        ({A2, A1_SYNC}, "--secondary-sync-ip 198.19.0.2 is not one of its addresses"),
    ],
)
def test_addresses_not_mine(disk: Path, addresses: set[ipaddress.IPv4Address], fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        config.check_local(config.parse(options(disk=str(disk))), addresses)


def test_missing_disk(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        config.check_local(config.parse(options(disk=str(tmp_path / "nope.img"))), {A1, A1_SYNC})


def test_disk_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="neither a block device nor a regular file"):
        config.check_local(config.parse(options(disk=str(tmp_path))), {A1, A1_SYNC})


def test_tiny_or_unaligned_disk(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    with open(path, "wb") as f:
        f.truncate((4 << 20) + 100)
    with pytest.raises(BadInput, match="multiple of 4096"):
        config.check_local(config.parse(options(disk=str(path))), {A1, A1_SYNC})


def test_mount_must_be_empty_directory(disk: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    with pytest.raises(BadInput, match="is not empty"):
        config.check_local(config.parse(options(disk=str(disk), mount=str(full))), {A1, A1_SYNC})
    with pytest.raises(BadInput, match="is not a directory"):
        config.check_local(config.parse(options(disk=str(disk), mount=str(disk))), {A1, A1_SYNC})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert config.check_local(config.parse(options(disk=str(disk), mount=str(empty))), {A1, A1_SYNC}) == "primary"


def test_scripts_must_be_executable(disk: Path, tmp_path: Path) -> None:
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(BadInput, match="not an executable file"):
        config.check_local(config.parse(options(disk=str(disk), start_script=str(script))), {A1, A1_SYNC})
    script.chmod(0o755)
    config.check_local(config.parse(options(disk=str(disk), start_script=str(script))), {A1, A1_SYNC})


def test_merge_revalidates(disk: Path) -> None:
    s = config.parse(options(disk=str(disk)))
    assert config.merge(s, {"ping_interval": "0.2"}).ping_interval == 0.2
    with pytest.raises(BadInput):
        config.merge(s, {"floating_ip": "198.18.5.1/24"})


def test_save_and_load_round_trip(disk: Path, tmp_path: Path) -> None:
    from mirrord.paths import Home

    home = Home(tmp_path / "home")
    home.ensure()
    s = config.parse(options(disk=str(disk), mount=str(tmp_path)))
    config.save(home, s)
    assert config.load(home) == s
    assert oct(home.settings_file.stat().st_mode & 0o777) == "0o600"
