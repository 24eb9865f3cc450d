"""Thin, dependency-free helpers for Linux namespaces and mounts.

Python 3.11 has no ``os.setns``/``os.unshare`` and no ``mount(2)`` wrapper, so
they are reached through ctypes here. Nothing in this module imports pyroute2:
``mirrord lab exec`` uses it on every call and must start fast.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

LOOP_CLR_FD = 0x4C01

NETNS_RUN_DIR = Path("/run/netns")
FUSECTL_DIR = Path("/sys/fs/fuse/connections")

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str, target: str | os.PathLike[str] = "") -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(target))


def setns(fd: int, nstype: int) -> None:
    """Move the calling process into the namespace open on ``fd``."""
    _check(_c().setns(fd, nstype), "setns")


def mount(source: str | None, target: str | os.PathLike[str], fstype: str | None,
          flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_c().mount(enc(source), os.fsencode(target), enc(fstype),
                      ctypes.c_ulong(flags), enc(data)), "mount", target)


def umount_lazy(target: str | os.PathLike[str]) -> bool:
    """Detach ``target``; False when it was not a mount point (already gone)."""
    if _c().umount2(os.fsencode(target), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount2: {os.strerror(err)}", str(target))


def netns_path(nsname: str) -> Path:
    return NETNS_RUN_DIR / nsname


NsId = tuple[int, int]


def ns_id(path: str | os.PathLike[str]) -> NsId | None:
    """(st_dev, st_ino) of a namespace file, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def is_bind_mounted(path: Path) -> bool:
    """True when ``path`` (a file or directory) is itself a mount point.

    Compares st_dev with the parent directory's; works for nsfs bind files
    where os.path.ismount's directory heuristics do not apply.
    """
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def enter(netns_file: Path, mntns_file: Path | None) -> None:
    """Join a network (and optionally a mount) namespace, keeping the cwd.

    Both files are opened before either setns, because after entering the
    mount namespace the host paths may no longer be visible. setns into a
    mount namespace resets cwd and root, so the cwd is restored by path (it
    falls back to "/" when that path does not exist inside the node).
    """
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # the cwd was deleted
        cwd = "/"
    net_fd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
    mnt_fd = os.open(mntns_file, os.O_RDONLY | os.O_CLOEXEC) if mntns_file else -1
    try:
        setns(net_fd, CLONE_NEWNET)
        if mnt_fd >= 0:
            setns(mnt_fd, CLONE_NEWNS)
    finally:
        os.close(net_fd)
        if mnt_fd >= 0:
            os.close(mnt_fd)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


# --------------------------------------------------------------------------
# mountinfo


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str          # "major:minor" of the superblock
    root: str
    mountpoint: str
    fstype: str
    source: str

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What identifies "the same mount" across two mount namespaces.

        Mount ids differ between a namespace and its copy, so compare the
        visible properties instead.
        """
        return (self.dev, self.root, self.mountpoint, self.fstype, self.source)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        entries.append(MountEntry(int(f[0]), int(f[1]), f[2], _unescape(f[3]),
                                  _unescape(f[4]), r[0], _unescape(r[1])))
    return entries


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())


def mounts_under(entries: Iterable[MountEntry], directory: Path) -> list[MountEntry]:
    prefix = str(directory).rstrip("/") + "/"
    return [e for e in entries if e.mountpoint == str(directory) or e.mountpoint.startswith(prefix)]


# --------------------------------------------------------------------------
# loop devices


def loop_devices() -> dict[str, str]:
    """{"/dev/loopN": backing file path} for every attached loop device.

    The path is as the *reader* sees it (d_path), so call this from inside
    the mount namespace whose paths you want to compare with.
    """
    found: dict[str, str] = {}
    for sysdir in Path("/sys/block").glob("loop*"):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        found[f"/dev/{sysdir.name}"] = backing.removesuffix(" (deleted)")
    return found


def loop_detach(device: str) -> None:
    """Detach a loop device; if it is still open it detaches on last close.

    Since Linux 5.x LOOP_CLR_FD on a busy device sets autoclear and succeeds.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        import fcntl
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: already detached
                raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# processes


def ns_members(net: NsId | None, mnt: NsId | None) -> list[int]:
    """Live (non-zombie) pids whose net or mount namespace is one of these."""
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        if (net and ns_id(f"/proc/{pid}/ns/net") == net) or \
           (mnt and ns_id(f"/proc/{pid}/ns/mnt") == mnt):
            if is_alive(pid):
                pids.append(pid)
    return pids


def is_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (a zombie holds no sockets,
    mounts or namespaces any more, it only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def kill_all(pids: Iterable[int]) -> None:
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive."""
    left = list(pids)
    deadline = time.monotonic() + timeout
    while left:
        left = [p for p in left if is_alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return left


# --------------------------------------------------------------------------
# running a function inside namespaces


def run_inside(func: Callable[[], Any], netns_file: Path | None = None,
               mntns_file: Path | None = None, timeout: float = 10.0) -> Any:
    """Run ``func()`` in a forked child that joined the given namespaces.

    setns(CLONE_NEWNS) changes the whole process, so it is done in a child
    (fork gives a single-threaded process, which setns requires). ``func``
    must return something JSON-serialisable; its exception comes back as
    OSError/RuntimeError text. The child is killed after ``timeout`` s.
    """
    import json
    import select
    import signal

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        code = 0
        try:
            os.close(rfd)
            fds = [(os.open(p, os.O_RDONLY), t) for p, t in
                   ((netns_file, CLONE_NEWNET), (mntns_file, CLONE_NEWNS)) if p]
            for fd, nstype in fds:
                setns(fd, nstype)
            payload = {"ok": func()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = {"error": f"{type(exc).__name__}: {exc}"}
            code = 1
        try:
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(wfd, data):]
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"namespace helper did not finish within {timeout:g} s")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "helper died"}')
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["ok"]
