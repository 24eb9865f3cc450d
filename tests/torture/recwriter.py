"""The torture workload, run inside the primary appliance.

``python recwriter.py MOUNT CYCLE SECONDS`` writes records with unique ids
until killed, until a write fails, or for at most SECONDS:

* into ``MOUNT/torture/log/cCYCLE.log``, opened with O_DSYNC, record n at
  offset n × RECORD; ``ACK log ID`` is printed only after pwrite returned;
* every sixteenth record also as its own file ``MOUNT/torture/files/cCYCLE/ID``,
  written, fsync'd, its directory fsync'd; then ``ACK file ID``.

Each line is flushed at once: the caller keeps stdout on the host, outside
the appliances, so a printed line is an acknowledged record whatever happens
to the appliance afterwards. A failed write prints ``ERR …`` and exits 1.
"""

from __future__ import annotations

import os
import sys
import time

from records import RECORD, encode, record_id

FILE_EVERY = 16  # a file per record would exhaust the inodes of the small lab disk within a long run


def write_file(directory: str, dir_fd: int, rid: str) -> None:
    fd = os.open(os.path.join(directory, rid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, encode(rid))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def main() -> int:
    mount, cycle, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    base = os.path.join(mount, "torture")
    files = os.path.join(base, "files", f"c{cycle:04d}")
    os.makedirs(os.path.join(base, "log"), exist_ok=True)
    os.makedirs(files, exist_ok=True)
    for d in (os.path.join(base, "log"), os.path.join(base, "files"), base):  # the new names are durable too
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    log = os.open(os.path.join(base, "log", f"c{cycle:04d}.log"), os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    dir_fd = os.open(files, os.O_RDONLY | os.O_DIRECTORY)
    end = time.monotonic() + seconds
    index = 0
    try:
        while time.monotonic() < end:
            rid = record_id(cycle, index)
            os.pwrite(log, encode(rid), index * RECORD)
            print(f"ACK log {rid}", flush=True)
            if index % FILE_EVERY == 0:
                write_file(files, dir_fd, rid)
                print(f"ACK file {rid}", flush=True)
            index += 1
    except OSError as exc:
        print(f"ERR {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
