"""Who keeps a mount point busy: the processes a failed unmount names (stopHA's message)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mirrord.replication.volume import users_of_mount


def test_processes_inside_a_directory_are_named(tmp_path: Path) -> None:
    inside = tmp_path / "mnt"
    (inside / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "mnt2"  # a sibling whose name starts the same is not inside
    elsewhere.mkdir()
    with open(inside / "file", "w") as held:
        by_cwd = subprocess.Popen(["sleep", "600"], cwd=inside / "sub")
        by_fd = subprocess.Popen(["sleep", "600"], stdout=held, cwd=tmp_path)
    outside = subprocess.Popen(["sleep", "600"], cwd=elsewhere)
    try:
        users = users_of_mount(inside)
        assert f"process {by_cwd.pid} (sleep)" in users and f"process {by_fd.pid} (sleep)" in users
        assert f"process {outside.pid} (sleep)" not in users
    finally:
        for proc in (by_cwd, by_fd, outside):
            proc.kill()
            proc.wait()
