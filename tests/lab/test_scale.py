"""Scale (issue 7): a 1 TiB sparse disk, mirrored, with daemons that stay small.

The lab's disk images are sparse files, so a 1 TiB pair costs only what is
written: the filesystem's metadata and journal, and the test's files. The
initial sync sends the holes as SYNC_ZERO frames (docs/protocol.md), so it
takes seconds, and the replica stays sparse. The daemons' resident memory is
read from /proc while the pair is in sync: the 1 TiB dirty bitmap (4 KiB per
bit) is 32 MiB of it on the primary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from hactl import in_sync, reset_pair, start_ha, start_primary_with_fs, status, stop_ha, wait_status

pytestmark = pytest.mark.lab

TiB = 1 << 40
MiB = 1 << 20
RSS_LIMIT = 128 * MiB


@pytest.fixture(scope="module")
def lab_1t(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("scale"), "1T") as handle:
        yield handle
        reset_pair(handle)


def daemon_rss(lab: Any, node: str) -> int:
    """Resident bytes of the node's `mirrord daemon` (found by its MIRRORD_HOME)."""
    home = f"MIRRORD_HOME={lab.home(node)}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"daemon" not in argv or home not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found.append(int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    assert len(found) == 1, f"expected one daemon for {node}, found {len(found)}"
    return found[0]


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every data extent of a sparse file (SEEK_DATA / SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    return out


def sparse_difference(a: Path, b: Path) -> str | None:
    """Compare two sparse images by reading only where either holds data (a hole reads as zeros)."""
    if a.stat().st_size != b.stat().st_size:
        return f"sizes differ: {a.stat().st_size} and {b.stat().st_size}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(data_extents(a) + data_extents(b)):
            for off in range(start, end, 4 * MiB):
                n = min(4 * MiB, end - off)
                if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                    return f"the images differ within [{off}, {off + n})"
    return None


def test_a_1_tib_sparse_disk_is_mirrored_with_small_daemons(lab_1t: Any) -> None:
    lab = lab_1t
    assert (lab.home("a1") / "disk.img").stat().st_size == TiB
    start_ha(lab, "a2")
    start_primary_with_fs(lab)
    wait_status(lab, "a1", in_sync, timeout=600)
    lab.run("a1", "for i in $(seq 1 8); do head -c 8M /dev/urandom > $MIRRORD_HOME/mnt/f$i; done; sync",
            check=True, timeout=180)
    s1, s2 = status(lab, "a1"), status(lab, "a2")
    assert s1["mode"] == "primary" and s2["mode"] == "secondary" and s2["disk"]["state"] == "UpToDate"
    rss = {node: daemon_rss(lab, node) for node in ("a1", "a2")}
    assert all(v <= RSS_LIMIT for v in rss.values()), f"daemon RSS over {RSS_LIMIT >> 20} MiB: {rss}"
    stop_ha(lab, "a1")
    a, b = lab.home("a1") / "disk.img", lab.home("a2") / "disk.img"
    assert sparse_difference(a, b) is None, sparse_difference(a, b)
    # The replica stayed sparse: it holds about what the primary holds, not 1 TiB.
    used = {"a1": a.stat().st_blocks * 512, "a2": b.stat().st_blocks * 512}
    assert used["a2"] <= used["a1"] + 64 * MiB, used
