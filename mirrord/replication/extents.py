"""Byte ranges a node asks its sync source to resend, besides the source's own bitmap.

A sync target may hold blocks the source does not know differ: writes it
made as a primary that were never acknowledged (it stepped down, or crashed),
or, as the victim of a split brain, its own changes since the split. It sends
them in the handshake as ``extra_dirty``: ``[[offset, length], ...]``; the
source marks them dirty before the sync, so they are overwritten with the
source's data. Sending more than needed only costs bandwidth; sending less
would leave the copies different, so every transformation here only grows
the set (coarsening merges neighbours, never drops a range).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from mirrord.errors import ActivityLogError
from mirrord.paths import Home
from mirrord.replication import native

Range = tuple[int, int]
_SOME_SET = re.compile(rb"[^\x00]")
_SOME_CLEAR = re.compile(rb"[^\xff]")
#: At most this many ranges cross the link (a control message is at most 64 KiB).
MAX_RANGES = 1024


def ranges_from_bitmap(data: bytes, size: int, granularity: int = 4096) -> list[Range]:
    """Runs of set bits (block i is bit i % 8 of byte i // 8, as in ext/bitmap.h) as byte ranges.

    Clean and fully dirty bytes are skipped by a regular-expression scan (in C): a
    handshake must not spend seconds in Python on the bitmap of a large disk.
    """
    nblocks = -(-size // granularity)
    view = data[:-(-nblocks // 8)]
    out: list[Range] = []
    start: int | None = None

    def close(end_block: int) -> None:
        assert start is not None
        out.append((start * granularity, min(end_block * granularity, size) - start * granularity))

    pos = 0
    while pos < len(view):
        found = (_SOME_SET if start is None else _SOME_CLEAR).search(view, pos)
        if found is None:
            break
        pos = found.start()
        for bit in range(8):
            block = pos * 8 + bit
            dirty = block < nblocks and bool(view[pos] >> bit & 1)
            if dirty and start is None:
                start = block
            elif not dirty and start is not None:
                close(block)
                start = None
        pos += 1
    if start is not None:
        close(min(nblocks, len(view) * 8))
    return out


def add_to_bitmap(data: bytes, size: int, ranges: Iterable[Range], granularity: int = 4096) -> bytes:
    """The serialised bitmap ``data`` (empty: none yet) with every block the ranges touch set."""
    nblocks = -(-size // granularity)
    bits = bytearray(data if len(data) == -(-nblocks // 8) else bytes(-(-nblocks // 8)))
    for offset, length in ranges:
        for block in range(offset // granularity, min(nblocks, -(-(offset + length) // granularity))):
            bits[block // 8] |= 1 << (block % 8)
    return bytes(bits)


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping and touching ranges joined."""
    out: list[Range] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_off + last_len, offset + length) - last_off)
        else:
            out.append((offset, length))
    return out


def coarsen(ranges: Iterable[Range], limit: int = MAX_RANGES) -> list[Range]:
    """At most ``limit`` ranges covering at least the given ones: the closest neighbours are joined first."""
    out = merge(ranges)
    gap = 4096
    while len(out) > limit:
        joined: list[Range] = []
        for offset, length in out:
            if joined and offset - (joined[-1][0] + joined[-1][1]) <= gap:
                joined[-1] = (joined[-1][0], offset + length - joined[-1][0])
            else:
                joined.append((offset, length))
        out = joined
        gap *= 2
    return out


def validate(value: object, disk_size: int, limit: int = MAX_RANGES) -> list[Range]:
    """A peer's ``extra_dirty``, checked: a list of at most ``limit`` in-disk [offset, length] pairs."""
    if not isinstance(value, list) or len(value) > limit:
        raise ValueError(f"extra_dirty must be a list of at most {limit} [offset, length] pairs")
    out: list[Range] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            raise ValueError(f"extra_dirty entry {item!r} is not an [offset, length] pair of integers")
        offset, length = item
        if offset < 0 or length <= 0 or offset + length > disk_size:
            raise ValueError(f"extra_dirty range [{offset}, {length}] is not within the {disk_size}-byte disk")
        out.append((offset, length))
    return out


def activity_log_extents(home: Home, volume: str) -> list[Range] | None:
    """The extents a primary may have been writing when it crashed, or None when nothing recorded them.

    They come from the activity log the C server keeps (ext/activity_log.h),
    which creates the file before the first write it lets through. None — no
    log, or one that cannot be read — makes a crashed primary's bitmap
    untrusted (the next sync with it is a full one).
    """
    path = home.activity_log(volume)
    if not path.exists():
        return None
    try:
        return native.read_activity_log(str(path))
    except ActivityLogError:
        return None


def forget_activity_log(home: Home, volume: str) -> None:
    """Drop the activity log once its extents are in the saved bitmap (or a full sync is due).

    Done after the meta file and the bitmap are saved: a crash in between
    only replays the same extents again.
    """
    home.activity_log(volume).unlink(missing_ok=True)


def bitmap_file(home: Home, volume: str) -> Path:
    """The primary's dirty bitmap, persisted beside the meta file on a clean stop."""
    return home.root / f"{volume}.bitmap"
