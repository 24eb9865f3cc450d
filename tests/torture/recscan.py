"""Reads back every torture record on a mounted filesystem; run inside the primary appliance.

``python recscan.py MOUNT`` prints one JSON object:
``{"log": {ID: [offset, ...]}, "files": {ID: [name, ...]}, "bad": [[where, what], ...]}``
where ``log`` maps each intact record found in the logs to the places it
was found, ``files`` the same for record files, and ``bad`` lists every
log slot or file whose bytes are not an intact record (zeros included: the
checker decides which of them may be torn, unacknowledged writes).
"""

from __future__ import annotations

import json
import os
import sys

from records import RECORD, decode


def main() -> None:
    base = os.path.join(sys.argv[1], "torture")
    found: dict[str, dict[str, list[str]]] = {"log": {}, "files": {}}
    bad: list[list[str]] = []
    log_dir = os.path.join(base, "log")
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), "rb") as f:
            data = f.read()
        for offset in range(0, len(data), RECORD):
            where = f"log/{name}@{offset}"
            rid = decode(data[offset:offset + RECORD])
            if rid is None:
                bad.append([where, data[offset:offset + 40].decode("ascii", "replace")])
            else:
                found["log"].setdefault(rid, []).append(where)
    files_dir = os.path.join(base, "files")
    for cycle in sorted(os.listdir(files_dir)) if os.path.isdir(files_dir) else []:
        for name in sorted(os.listdir(os.path.join(files_dir, cycle))):
            where = f"files/{cycle}/{name}"
            with open(os.path.join(files_dir, cycle, name), "rb") as f:
                rid = decode(f.read())
            if rid is None:
                bad.append([where, "not an intact record"])
            else:
                found["files"].setdefault(rid, []).append(where)
    print(json.dumps({**found, "bad": bad}))


if __name__ == "__main__":
    main()
