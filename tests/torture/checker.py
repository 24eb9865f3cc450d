"""Acknowledged records against what the primary's filesystem holds (pure; the nemesis feeds it).

Every record has one place: log record n of cycle c at ``log/cNNNN.log``
offset n × RECORD, and (every sixteenth one) the file ``files/cNNNN/ID``. The
writer writes one record at a time and acknowledges it only after the write
returned, so in each cycle's log every slot below the highest acknowledged
index was acknowledged, and only slots above it may hold a torn write.

* **missing**: an acknowledged record not found intact at its place;
* **corrupted**: the place of an acknowledged record (or a slot below the
  highest acknowledged one) holding anything but that record;
* **duplicated**: an intact record found at a place that is not its own;
* **torn**: an unacknowledged write that was in flight (allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from records import RECORD, record_id


@dataclass
class Acked:
    """What the writer acknowledged, read from its output kept on the host."""
    log: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)

    def add_output(self, text: str) -> None:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ACK":
                (self.log if parts[1] == "log" else self.files).add(parts[2])


@dataclass
class Verdict:
    acknowledged: int
    present: int
    missing: list[str]
    corrupted: list[str]
    duplicated: list[str]
    torn: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupted or self.duplicated)

    def summary(self) -> str:
        return (f"{self.acknowledged} acknowledged, {self.present} present, {len(self.missing)} missing, "
                f"{len(self.corrupted)} corrupted, {len(self.duplicated)} duplicated, {len(self.torn)} torn "
                f"(unacknowledged)")


def _index(rid: str) -> int:
    return int(rid.split("-")[1])


def _cycle(rid: str) -> int:
    return int(rid.split("-")[0][1:])


def _log_place(where: str) -> str:
    """The id whose record belongs at a log place ``log/cNNNN.log@OFFSET``."""
    name, offset = where.removeprefix("log/").split("@")
    return record_id(int(name[1:5]), int(offset) // RECORD)


def _file_place(where: str) -> str:
    return where.rsplit("/", 1)[1]


def check(acked: Acked, scan: dict[str, Any]) -> Verdict:
    """Compare the acknowledged records with a scan by recscan.py."""
    highest: dict[tuple[str, int], int] = {}
    for kind, ids in (("log", acked.log), ("files", acked.files)):
        for rid in ids:
            key = (kind, _cycle(rid))
            highest[key] = max(highest.get(key, -1), _index(rid))
    place_of = {"log": _log_place, "files": _file_place}
    acked_of = {"log": acked.log, "files": acked.files}
    intact: set[tuple[str, str]] = set()
    corrupted: list[str] = []
    duplicated: list[str] = []
    torn: list[str] = []

    def owed(kind: str, rid: str) -> bool:
        """An acknowledged place, or one below the highest acknowledged of its cycle."""
        return rid in acked_of[kind] or _index(rid) < highest.get((kind, _cycle(rid)), -1)

    for kind in ("log", "files"):
        for rid, places in scan[kind].items():
            for where in places:
                own = place_of[kind](where)
                if own == rid:
                    intact.add((kind, rid))
                elif owed(kind, own):
                    corrupted.append(f"{where}: holds {rid}, not {own}")
                else:
                    duplicated.append(f"{where}: holds {rid}, not {own}")
    for where, what in scan["bad"]:
        kind = "log" if where.startswith("log/") else "files"
        own = place_of[kind](where)
        (corrupted if owed(kind, own) else torn).append(f"{where}: {what!r}")
    missing = sorted({f"{kind} {rid}" for kind in ("log", "files") for rid in acked_of[kind]
                      if (kind, rid) not in intact})
    return Verdict(acknowledged=len(acked.log) + len(acked.files), present=len(intact),
                   missing=missing, corrupted=corrupted, duplicated=duplicated, torn=torn)
