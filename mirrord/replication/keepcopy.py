"""A copy of a disk kept before its changes are discarded (split-brain resolution).

``startHA --discard-my-data`` overwrites this appliance's changes with the
peer's. Before a byte is overwritten the whole disk is copied to
``$MIRRORD_HOME/splitbrain/<volume>-<UTC time>.img``: the whole image, not just
the blocks that will change, because which blocks the *peer* changed is only
known after the handshake, and a copy that can simply be loop-mounted is what
an operator needs to recover a file. The copy is sparse: holes of the disk
(SEEK_DATA/SEEK_HOLE) and all-zero chunks are not written, so a mostly empty
disk costs little space.
"""

from __future__ import annotations

import datetime
import errno
import os
from pathlib import Path

from mirrord.errors import MirrordError
from mirrord.paths import Home

CHUNK = 1 << 20


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Where the disk holds data; the whole disk when the file system (or a block device) cannot say."""
    out, offset = [], 0
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            offset = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after offset
            return out
        return [(0, size)]
    return out


def save_copy(home: Home, volume: str, disk: Path, size: int) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    directory = home.root / "splitbrain"
    directory.mkdir(mode=0o700, exist_ok=True)
    target = directory / f"{volume}-{stamp}.img"
    zero = bytes(CHUNK)
    try:
        src = os.open(disk, os.O_RDONLY)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(dst, size)
                for start, length in _data_ranges(src, size):
                    for offset in range(start, start + length, CHUNK):
                        chunk = os.pread(src, min(CHUNK, start + length - offset), offset)
                        if chunk != zero[:len(chunk)]:
                            os.pwrite(dst, chunk, offset)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise MirrordError(f"Could not save a copy of {disk} to {target} ({exc.strerror}); nothing was "
                           "discarded. Free space there and run the command again.") from exc
    return target
