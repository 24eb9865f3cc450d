"""The backup archive on plain files: sparse copy, checksums, refusals (fsfreeze and the daemon are lab-tested)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from mirrord import backup
from mirrord.errors import BadInput, MirrordError

SIZE = 4 << 20
SETTINGS = {"volume": "r0", "disk": "/x/disk.img", "floating_ip": "198.18.0.10/24"}


def image(path: Path, blocks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, data in blocks.items():
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return image(tmp_path / "disk.img", {0: b"superblock" * 100, 3 * backup.BLOCK + 17: b"x" * 70000,
                                         SIZE - 10: b"tail-bytes"})


def make(tmp_path: Path, disk: Path) -> Path:
    dest = tmp_path / "b.tar"
    manifest = backup.write_backup(dest, disk, SIZE, SETTINGS, None, "unused disk")
    assert manifest["disk_size"] == SIZE and manifest["consistency"] == "unused disk"
    return dest


def test_round_trip_onto_a_file_with_other_data(tmp_path: Path, disk: Path) -> None:
    dest = make(tmp_path, disk)
    target = image(tmp_path / "target.img", {backup.BLOCK * 10: b"stale" * 1000, 0: b"other"})
    manifest, settings = backup.read_backup(dest)
    assert settings == SETTINGS
    backup.restore_disk(dest, manifest, target)
    assert target.read_bytes() == disk.read_bytes()
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_only_non_zero_blocks_are_stored(tmp_path: Path, disk: Path) -> None:
    with tarfile.open(make(tmp_path, disk)) as tar:
        assert tar.getnames() == ["disk.extents", "settings.json", "manifest.json"]
        assert tar.getmember("disk.extents").size < 5 * backup.BLOCK + 100


def test_restore_onto_a_larger_disk_leaves_the_rest_alone_and_verifies(tmp_path: Path, disk: Path) -> None:
    dest = make(tmp_path, disk)
    target = tmp_path / "big.img"
    with open(target, "wb") as f:
        f.truncate(2 * SIZE)
    manifest, _ = backup.read_backup(dest)
    backup.restore_disk(dest, manifest, target)
    assert target.read_bytes()[:SIZE] == disk.read_bytes()


@pytest.mark.parametrize("member", ["disk.extents", "settings.json"])
def test_a_damaged_member_is_refused_before_anything_is_written(tmp_path: Path, disk: Path, member: str) -> None:
    dest = make(tmp_path, disk)
    with tarfile.open(dest) as tar:
        start = tar.getmember(member).offset_data
    with open(dest, "r+b") as f:
        f.seek(start + 20)
        byte = f.read(1)
        f.seek(start + 20)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BadInput, match=f"damaged: the checksum of {member}"):
        backup.read_backup(dest)


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "does not exist"),
    (b"not a tar at all" * 100, "cannot be read as a backup"),
])
def test_not_a_backup(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    path = tmp_path / "x.tar"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInput, match=fragment):
        backup.read_backup(path)


def test_a_tar_without_a_manifest_or_of_another_format(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "manifest.json", arcname="other.json")
    with pytest.raises(BadInput, match="has no manifest.json"):
        backup.read_backup(path)
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "manifest.json", arcname="manifest.json")
    with pytest.raises(BadInput, match="is not a mirrord-backup/1 archive"):
        backup.read_backup(path)


def test_a_read_back_mismatch_is_reported(tmp_path: Path, disk: Path) -> None:
    dest = make(tmp_path, disk)
    manifest, _ = backup.read_backup(dest)
    with pytest.raises(MirrordError, match="does not read back as the backup's image"):
        backup.restore_disk(dest, {**manifest, "disk_sha256": "0" * 64}, tmp_path / "disk.img")


@pytest.mark.parametrize(("name", "frozen", "fragment"), [
    ("relative.tar", None, "must be an absolute path"),
    ("exists.tar", None, "already exists"),
    ("nodir/b.tar", None, "does not exist"),
    ("mnt/b.tar", "mnt", "is on the mirrored filesystem"),
    ("mnt/sub/b.tar", "mnt", "is on the mirrored filesystem"),
])
def test_destination_refusals(tmp_path: Path, name: str, frozen: str | None, fragment: str) -> None:
    (tmp_path / "exists.tar").write_text("x")
    (tmp_path / "mnt" / "sub").mkdir(parents=True)
    dest = Path(name) if name.startswith("relative") else tmp_path / name
    with pytest.raises(BadInput, match=fragment):
        backup.check_destination(dest, tmp_path / frozen if frozen else None)


def test_a_destination_beside_the_mount_is_fine(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt2").mkdir()
    backup.check_destination(tmp_path / "mnt2" / "b.tar", tmp_path / "mnt")


def test_one_backup_at_a_time() -> None:
    with backup.exclusive():
        with pytest.raises(MirrordError, match="already running"):
            with backup.exclusive():
                pass
    with backup.exclusive():
        pass


def test_a_short_disk_is_an_error(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(b"a" * 4096)
    with pytest.raises(MirrordError, match="ended at 4096 bytes"):
        backup.write_backup(tmp_path / "b.tar", short, SIZE, SETTINGS, None, "unused disk")
    assert sorted(os.listdir(tmp_path)) == ["short.img"]
