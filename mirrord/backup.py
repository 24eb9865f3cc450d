"""Backup and restore of an appliance: the mirrored disk plus its HA settings, in one checked archive.

The archive is a plain (uncompressed) tar that ``tar tvf`` lists, with three members in this order:

``disk.extents``
    The disk image, sparse-aware: a sequence of records ``>QI`` (offset, length) followed by that
    many bytes, for every 64 KiB block that is not all zeros; a record with offset 2**64-1 ends
    it. Zero blocks (and holes) are not stored.
``settings.json``
    The HA settings (``ha.json``). The shared secret itself is never in it, only its path.
``manifest.json``
    Format, mirrord version, time, volume, disk size, the SHA-256 of the whole logical disk image
    and of each other member, and how the copy was made consistent.

Consistency while serving: on the primary the mounted filesystem is frozen (``fsfreeze``) for
the copy, so it is flushed through the data path to the disk and stays unchanged until the copy
is complete; the application's writes wait meanwhile (reads go on). A standalone appliance's
disk is copied when nothing uses it. Restore verifies every checksum before it writes a byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from mirrord import __version__
from mirrord.errors import BadInput, MirrordError, Refused
from mirrord.replication import volume

FORMAT = "mirrord-backup/1"
BLOCK = 64 * 1024
CHUNK = 16 * BLOCK
_RECORD = struct.Struct(">QI")
_END = (2**64 - 1, 0)
DISK_MEMBER, SETTINGS_MEMBER, MANIFEST_MEMBER = "disk.extents", "settings.json", "manifest.json"

#: One backup or restore at a time per process: two copies would double the freeze, and a restore
#: must not race anything that reads the disk.
_one_at_a_time = threading.Lock()


@contextmanager
def exclusive() -> Iterator[None]:
    if not _one_at_a_time.acquire(blocking=False):
        raise Refused("A backup or restore is already running on this appliance; wait for it to finish.")
    try:
        yield
    finally:
        _one_at_a_time.release()


def check_destination(dest: Path, frozen: Path | None) -> None:
    """The archive must be new, in an existing directory, and never on the filesystem being frozen."""
    if not dest.is_absolute():
        raise BadInput(f"The backup file {dest} must be an absolute path.")
    if dest.exists():
        raise BadInput(f"{dest} already exists; choose a new file name (a backup never overwrites).")
    if not dest.parent.is_dir():
        raise BadInput(f"The directory {dest.parent} does not exist.")
    if frozen is not None:
        real, mount = os.path.realpath(dest.parent), os.path.realpath(frozen)
        if real == mount or real.startswith(mount + os.sep):
            raise BadInput(f"{dest} is on the mirrored filesystem {frozen}, which the backup freezes; "
                           "write the backup to another filesystem.")


@contextmanager
def frozen(mount: Path | None) -> Iterator[None]:
    """Freeze the filesystem for the duration (nothing to freeze when ``mount`` is None)."""
    if mount is None:
        yield
        return
    volume.freeze(mount, True)
    try:
        yield
    finally:
        volume.freeze(mount, False)


def _copy_extents(disk: Path, size: int, out: BinaryIO) -> str:
    """Write the non-zero blocks of the first ``size`` bytes of ``disk``; return the image's SHA-256."""
    whole = hashlib.sha256()
    zero = bytes(BLOCK)
    with open(disk, "rb", buffering=0) as src:
        offset = 0
        while offset < size:
            data = src.read(min(CHUNK, size - offset))
            if not data:
                raise MirrordError(f"{disk} ended at {offset} bytes, before its size {size}.")
            whole.update(data)
            for start in range(0, len(data), BLOCK):
                block = data[start:start + BLOCK]
                if block != zero[:len(block)]:
                    out.write(_RECORD.pack(offset + start, len(block)))
                    out.write(block)
            offset += len(data)
    out.write(_RECORD.pack(*_END))
    return whole.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_backup(dest: Path, disk: Path, size: int, settings: dict[str, Any], freeze: Path | None,
                 how: str) -> dict[str, Any]:
    """Copy ``disk`` (frozen at ``freeze`` if given) and ``settings`` into the archive ``dest``."""
    check_destination(dest, freeze)
    extents = dest.with_name(f".{dest.name}.extents.tmp")
    partial = dest.with_name(f".{dest.name}.tmp")
    started = time.monotonic()
    try:
        with open(extents, "wb") as out:
            with frozen(freeze):
                disk_sha = _copy_extents(disk, size, out)
            frozen_for = time.monotonic() - started
        settings_bytes = json.dumps(settings, indent=2, sort_keys=True).encode()
        manifest = {
            "format": FORMAT, "mirrord_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "volume": settings.get("volume"), "disk_size": size, "disk_sha256": disk_sha, "consistency": how,
            "members": {DISK_MEMBER: _sha256_file(extents),
                        SETTINGS_MEMBER: hashlib.sha256(settings_bytes).hexdigest()},
        }
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(extents, arcname=DISK_MEMBER)
            for name, data in ((SETTINGS_MEMBER, settings_bytes),
                               (MANIFEST_MEMBER, json.dumps(manifest, indent=2, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(data))
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(partial, 0o600)  # it holds the whole disk
        os.rename(partial, dest)
    finally:
        extents.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return {**manifest, "path": str(dest), "frozen_seconds": round(frozen_for, 3)}


# -- restore ----------------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str) -> BinaryIO:
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise BadInput(f"The backup has no {name}; it is not a mirrord backup or it is damaged. Nothing was restored.")
    return f  # type: ignore[return-value]


def read_backup(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, settings) of a backup whose every checksum matches; BadInput otherwise."""
    if not src.is_file():
        raise BadInput(f"The backup file {src} does not exist.")
    try:
        with tarfile.open(src, "r:") as tar:
            manifest = json.loads(_member(tar, MANIFEST_MEMBER).read())
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise BadInput(f"{src} is not a {FORMAT} archive. Nothing was restored.")
            expected = manifest.get("members") or {}
            settings_bytes = _member(tar, SETTINGS_MEMBER).read()
            digest = hashlib.sha256()
            disk = _member(tar, DISK_MEMBER)
            while chunk := disk.read(CHUNK):
                digest.update(chunk)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BadInput(f"{src} cannot be read as a backup ({exc}); nothing was restored.") from exc
    for name, actual in ((DISK_MEMBER, digest.hexdigest()), (SETTINGS_MEMBER, hashlib.sha256(settings_bytes).hexdigest())):
        if expected.get(name) != actual:
            raise BadInput(f"The backup {src} is damaged: the checksum of {name} does not match its manifest. "
                           "Nothing was restored.")
    size = manifest.get("disk_size")
    if type(size) is not int or size <= 0:
        raise BadInput(f"The backup {src} does not state its disk size. Nothing was restored.")
    return manifest, json.loads(settings_bytes)


def _records(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    while True:
        head = f.read(_RECORD.size)
        if len(head) != _RECORD.size:
            raise MirrordError("The backup's disk image ends early.")
        offset, length = _RECORD.unpack(head)
        if (offset, length) == _END:
            return
        if length > BLOCK or offset + length > size:
            raise MirrordError(f"The backup's disk image has an extent beyond its size ({offset}+{length}).")
        data = f.read(length)
        if len(data) != length:
            raise MirrordError("The backup's disk image ends early.")
        yield offset, data


def restore_disk(src: Path, manifest: dict[str, Any], disk: Path) -> None:
    """Write the backup's image over ``disk`` (checked unused and large enough by the caller), then verify it."""
    size = int(manifest["disk_size"])
    regular = stat.S_ISREG(os.stat(disk).st_mode)
    fd = os.open(disk, os.O_RDWR)
    try:
        if regular:
            # Emptying and re-growing a fixed-size image turns it into holes: the blocks not stored are zeros.
            full = os.fstat(fd).st_size
            os.ftruncate(fd, 0)
            os.ftruncate(fd, full)
        zeroed = regular
        written = 0
        with tarfile.open(src, "r:") as tar:
            for offset, data in _records(_member(tar, DISK_MEMBER), size):
                if not zeroed and offset > written:
                    _zero(fd, written, offset)
                os.pwrite(fd, data, offset)
                written = offset + len(data)
        if not zeroed and written < size:
            _zero(fd, written, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = hashlib.sha256()
    with open(disk, "rb", buffering=0) as f:
        left = size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    if digest.hexdigest() != manifest.get("disk_sha256"):
        raise MirrordError(f"After the restore {disk} does not read back as the backup's image (checksum "
                           "mismatch): check the disk, then restore again.")


def _zero(fd: int, start: int, end: int) -> None:
    zeros = bytes(CHUNK)
    while start < end:
        n = min(CHUNK, end - start)
        os.pwrite(fd, zeros[:n], start)
        start += n
