"""How the primary turns the exposed FUSE file into a mounted filesystem, and back.

``FUSE file → loop device (direct I/O) → filesystem → mount point``: the loop
device uses direct I/O so that the page cache sits above the filesystem only,
not a second time above the FUSE file, and every write the filesystem makes
reaches the data path at once. These steps use util-linux and e2fsprogs
(losetup, blkid, mkfs.ext4, mount, umount); their failures are translated
into :class:`MirrordError` here, at the one place that calls them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from mirrord.errors import MirrordError, Refused

COMMAND_TIMEOUT = 120.0


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MirrordError(f"Could not {what}: {exc}.") from exc
    if done.returncode != 0:
        raise MirrordError(f"Could not {what}: {' '.join(argv)} said: {done.stderr.strip() or done.returncode}.")
    return done.stdout.strip()


def users_of(path: Path) -> list[str]:
    """Processes, mounts and loop devices other than this process that hold ``path`` open."""
    target = os.path.realpath(path)
    found = _processes(lambda held: os.path.realpath(held) == target)
    found += [f"loop device {loop}" for loop in loops_backed_by(path)]
    with open("/proc/self/mounts") as f:
        for line in f:
            source, mountpoint = line.split()[:2]
            if os.path.realpath(source) == target:
                found.append(f"the filesystem mounted on {mountpoint}")
    return found


def loops_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (e.g. /dev/loop3)."""
    target = os.path.realpath(path)
    found = []
    for loop in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if os.path.realpath(backing) == target:
            found.append(f"/dev/{loop.name}")
    return found


def ensure_unused(path: Path) -> None:
    users = users_of(path)
    if users:
        raise Refused(f"Disk {path} is in use by {', '.join(users)}; stop whatever uses it before startHA.")


def attach_loop(device_file: Path) -> str:
    return _run(["losetup", "--find", "--show", "--direct-io=on", str(device_file)],
                f"attach a loop device to {device_file}")


def detach_loop(loop: str) -> None:
    _run(["losetup", "--detach", loop], f"detach {loop}")


def has_filesystem(block: str) -> bool:
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", block], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    return done.returncode == 0 and bool(done.stdout.strip())


def make_filesystem(block: str, fstype: str) -> None:
    _run([f"mkfs.{fstype}", "-q", "-F", block], f"create an {fstype} filesystem on {block}")


def mount(block: str, mountpoint: Path) -> None:
    _run(["mount", block, str(mountpoint)], f"mount {block} on {mountpoint}")


def freeze(mountpoint: Path, frozen: bool) -> None:
    """fsfreeze: flush the filesystem and hold its writes (True), or let them go on (False)."""
    what = "freeze" if frozen else "unfreeze"
    _run(["fsfreeze", f"--{what}", str(mountpoint)], f"{what} {mountpoint}")


UNMOUNT_PATIENCE = 5.0


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount, waiting a little for processes that were just killed (stop script) to let go."""
    deadline = time.monotonic() + UNMOUNT_PATIENCE
    while True:
        try:
            _run(["umount", *(["--lazy"] if lazy else []), str(mountpoint)],
                 f"unmount {mountpoint} (is an application still using it?)")
            return
        except MirrordError as exc:
            if lazy or time.monotonic() > deadline:
                users = users_of_mount(mountpoint)
                if users:  # the operator's next step: what to stop
                    raise MirrordError(f"{exc} In use by {', '.join(users)}.") from exc
                raise
            time.sleep(0.2)


def users_of_mount(mountpoint: Path) -> list[str]:
    """Processes whose working directory, root or an open file is on the filesystem at ``mountpoint``."""
    top = os.path.realpath(mountpoint)
    return _processes(lambda held: _under(held, top), places=True)


def _processes(holds: Callable[[str], bool], places: bool = False) -> list[str]:
    """Processes other than this one with an open file ``holds`` accepts (with ``places``: or their
    working directory or root), as "process PID (COMMAND)"."""
    me = str(os.getpid())
    found: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            links = [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
            if places:
                links += [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
            if any(holds(_target(link)) for link in links):
                with open(f"/proc/{pid}/comm") as f:
                    found.append(f"process {pid} ({f.read().strip()})")
        except OSError:
            continue  # the process is gone meanwhile, or not ours to look into
    return found


def _target(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:  # an fd closed meanwhile
        return ""


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def is_mounted(mountpoint: Path) -> bool:
    return os.path.ismount(mountpoint)


def mount_source(mountpoint: Path) -> str | None:
    """What is mounted on ``mountpoint`` (its source), from the mount table; None if nothing.

    Unlike is_mounted this also sees a FUSE mount whose server died (stat fails on those).
    """
    wanted = os.path.realpath(mountpoint).replace(" ", "\\040")
    with open("/proc/self/mounts") as f:
        found = [line.split()[0] for line in f if line.split()[1] == wanted]
    return found[-1] if found else None
