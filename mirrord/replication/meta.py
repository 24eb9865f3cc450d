"""Per-volume metadata kept beside the disk (never inside it), written crash-safely.

What a node must remember across crashes about its copy of the volume:

* ``disk_state``: ``UpToDate`` (a complete, current copy), ``Inconsistent``
  (a sync into it started and has not finished: parts are old, parts new),
  ``Outdated`` (complete but known to be behind the peer);
* ``epoch``: the highest primary term this copy has served or followed;
  each promotion takes a higher one, so two primaries can tell which is newer;
* ``source``: on a secondary, the lineage (primary's node id and term) of
  the last sync into this disk, finished or not; a primary with the same
  lineage still holds the bitmap of every block this disk lacks, so a
  reconnect sends only those (and an interrupted sync resumes);
* ``node_id``: a random identity for this copy of the data, chosen on first use.

The file is replaced atomically (temp + fsync + rename + directory fsync), so
after a crash it is either the old or the new version. A sync target marks
itself Inconsistent *before* the first sync byte lands, and UpToDate only
after the source says the sync is complete.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import asdict, dataclass, field

from mirrord import atomicfile
from mirrord.paths import Home


class DiskState(str, enum.Enum):
    UP_TO_DATE = "UpToDate"
    INCONSISTENT = "Inconsistent"
    OUTDATED = "Outdated"

    def __str__(self) -> str:
        return self.value


@dataclass
class VolumeMeta:
    disk_state: DiskState = DiskState.UP_TO_DATE
    epoch: int = 0
    source: str = ""
    node_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def load(cls, home: Home, volume: str) -> "VolumeMeta":
        data = atomicfile.read_json(home.meta_file(volume))
        if data is None:
            meta = cls()
            meta.save(home, volume)
            return meta
        return cls(disk_state=DiskState(data["disk_state"]), epoch=int(data.get("epoch", 0)), source=str(data.get("source", "")),
                   node_id=str(data["node_id"]))

    def save(self, home: Home, volume: str) -> None:
        data = asdict(self)
        data["disk_state"] = str(self.disk_state)
        atomicfile.write_json(home.meta_file(volume), data)
