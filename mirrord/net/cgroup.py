"""A cgroup-v1 freezer group: tracks a lab node's processes and freezes them.

Every process started in a node joins the node's group before it execs, so
its children are tracked too (a fork inherits the cgroup). The freezer is how
``lab freeze`` simulates a hung machine and how ``lab crash`` stops a node's
processes from forking while they are being killed.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from mirrord.errors import LabError

FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")


class Freezer:
    """One freezer cgroup directory (created lazily, removed when empty)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Freezer({str(self.path)!r})"

    def exists(self) -> bool:
        return (self.path / "freezer.state").exists()

    def create(self) -> None:
        if not FREEZER_ROOT.is_dir():
            raise LabError(f"no cgroup-v1 freezer hierarchy at {FREEZER_ROOT}; mount one "
                           f"(mount -t cgroup -o freezer cgroup {FREEZER_ROOT}).")
        self.path.mkdir(parents=True, exist_ok=True)

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the calling process) into this group."""
        (self.path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")

    def pids(self) -> list[int]:
        """Every task (thread ids included, so no thread escapes a kill)."""
        try:
            text = (self.path / "tasks").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def state(self) -> str:
        try:
            return (self.path / "freezer.state").read_text().strip()
        except FileNotFoundError:
            return "THAWED"

    def freeze(self, timeout: float = 5.0) -> bool:
        """Freeze and wait until the kernel reports FROZEN; False on timeout.

        A task stuck in an uninterruptible sleep (e.g. on a dead FUSE server)
        can keep the group in FREEZING; writing FROZEN again retries it.
        """
        if not self.exists():
            return True
        deadline = time.monotonic() + timeout
        while True:
            (self.path / "freezer.state").write_text("FROZEN\n")
            if self.state() == "FROZEN" or self._all_stopped():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _all_stopped(self) -> bool:
        """Every task is frozen or asleep in the kernel: the group cannot run, FREEZING or not.

        An application blocked in a FUSE request whose server is already frozen
        sleeps killably, not freezably, so the group stays FREEZING for ever;
        a hung machine looks exactly like this, so it counts as frozen.
        """
        pids = self.pids()
        return bool(pids) and all(_sched_state(pid) in ("D", "") for pid in pids)


    def thaw(self, timeout: float = 5.0) -> bool:
        if not self.exists():
            return True
        deadline = time.monotonic() + timeout
        while True:
            (self.path / "freezer.state").write_text("THAWED\n")
            if self.state() == "THAWED":
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir the group; it must be empty (dying tasks may need a moment)."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise LabError(f"cannot remove cgroup {self.path}: {exc.strerror}; "
                                   f"tasks still in it: {self.pids()}.") from exc
                time.sleep(0.05)


def remove_if_empty(path: Path) -> None:
    """rmdir a parent group unless other children (another lab) still use it."""
    try:
        path.rmdir()
    except OSError:
        pass


def _sched_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" if the task is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]
