"""Fixtures and helpers for tests that run in the network-namespace lab.

Every command goes through the real CLI path
(``python -m mirrord_cli.lab exec --name N NODE -- CMD``), so what a test
does is exactly what an operator would type.

Typical use::

    def test_something(lab):                       # module-scoped lab
        daemon = lab.popen("a1", ["mirrord", "daemon"])
        assert lab.run("a2", "HAstatus --json").returncode == 0
        assert lab.ping("client", "198.18.0.11")
        lab.crash("a1"); lab.boot("a1")

    def test_fresh(fresh_lab): ...                 # one lab for this test only

    def test_x(make_lab, tmp_path):
        with make_lab(tmp_path) as other: ...      # a lab of your own, same guarantees

Each lab has a unique short name (``t`` + 5 hex digits), keeps its data in
a pytest tmp dir (``MIRRORD_LAB_DIR``), is always torn down, and the tear
down asserts nothing is left behind (namespaces, mounts, loop devices,
cgroup, processes).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from mirrord.net import lab as labmod
from mirrord.net import namespaces as ns
from under_ci import skip_or_fail

Argv = str | Sequence[str]  # a str is run with `sh -c`

# ICMP echo with a raw socket: iputils-ping may not be installed, and this
# needs nothing but the interpreter. Exit 0 on a reply, 1 on none, 2 when
# the kernel refuses to send (e.g. network unreachable).
_PING = r"""
import os, select, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
dst, timeout = sys.argv[1], float(sys.argv[2])
ident = os.getpid() & 0xFFFF
body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"mirrord-lab!"
pkt = body[:2] + struct.pack("!H", csum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
try:
    s.sendto(pkt, (dst, 0))
except OSError:
    sys.exit(2)
end = time.monotonic() + timeout
while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
    data, addr = s.recvfrom(2048)
    ihl = (data[0] & 0xF) * 4
    kind, _, _, got, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if kind == 0 and got == ident and addr[0] == dst:
        sys.exit(0)
sys.exit(1)
"""

_TCP = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""


# --------------------------------------------------------------------------
# prerequisites


def _missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not Path("/dev/fuse").exists():
        missing.append("/dev/fuse")
    if not (Path("/sys/fs/cgroup/freezer") / "freezer.state").exists() and \
            not Path("/sys/fs/cgroup/freezer/cgroup.procs").exists():
        missing.append("the cgroup-v1 freezer at /sys/fs/cgroup/freezer")
    for tool in ("losetup", "unshare"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (util-linux)")
    if not Path("/proc/self/ns/net").exists() or not Path("/proc/self/ns/mnt").exists():
        missing.append("network/mount namespace support")
    return missing


def require_lab_prerequisites() -> None:
    """Skip (or, under CI=true, fail) when this host cannot run the lab."""
    missing = _missing_prerequisites()
    if missing:
        message = "the namespace lab needs " + ", ".join(missing)
        skip_or_fail(message)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that (or the
    last falsy value after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# the handle


class LabHandle:
    """One lab, driven through the CLI. Cheap to create; ``up()`` builds it."""

    def __init__(self, name: str, data_root: Path, disk_size: str = "64M") -> None:
        self.name = name
        self.data_root = data_root
        self.disk_size = disk_size
        self._popens: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"LabHandle({self.name!r})"

    # paths --------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.data_root / self.name

    def home(self, node: str) -> Path:
        """The node's MIRRORD_HOME (a plain host directory)."""
        return self.data_dir / node

    def netns(self, node: str) -> str:
        """Network namespace name, e.g. for ``IPRoute(netns=lab.netns("a1"))``."""
        return f"{self.name}-{node}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, labmod.DATA_DIR_ENV: str(self.data_root)}

    # the CLI ------------------------------------------------------------

    def cli_argv(self, command: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "mirrord_cli.lab", command, "--name", self.name, *args]

    def cli(self, command: str, *args: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``mirrord lab COMMAND --name NAME ARGS…``; raises on failure if ``check``."""
        proc = subprocess.run(self.cli_argv(command, *args), env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"`lab {command} {' '.join(args)}` exited {proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    def up(self) -> None:
        self.cli("up", "--disk-size", self.disk_size)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.cli("down")

    def crash(self, node: str) -> None:
        self.cli("crash", node)

    def boot(self, node: str) -> None:
        self.cli("boot", node)

    def freeze(self, node: str) -> None:
        self.cli("freeze", node)

    def thaw(self, node: str) -> None:
        self.cli("thaw", node)

    def cut(self, node: str, which: str = "all") -> None:
        self.cli("cut", node, which)

    def heal(self, node: str, which: str = "all") -> None:
        self.cli("heal", node, which)

    # commands inside nodes ------------------------------------------------

    def exec_argv(self, node: str, argv: Argv) -> list[str]:
        """The full argv that runs ``argv`` inside ``node`` (a str goes to sh -c)."""
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        return self.cli_argv("exec", node, "--", *cmd)

    def run(self, node: str, argv: Argv, *, timeout: float = 30.0, check: bool = False,
            input: str | None = None, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in ``node`` to completion; text stdout/stderr captured.

        ``env`` adds to (does not replace) the test's environment; the lab
        sets MIRRORD_HOME / MIRRORD_LAB_NODE / MIRRORD_LAB_NAME itself.
        """
        proc = subprocess.run(self.exec_argv(node, argv), env={**self.env, **(env or {})},
                              cwd=cwd, input=input, text=True, capture_output=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv!r} in {node} exited {proc.returncode}: "
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def popen(self, node: str, argv: Argv, *, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in ``node`` in the background. Its pid is the
        command's own pid (lab exec execs). Killed at tear down if still alive."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_argv(node, argv), env={**self.env, **(env or {})},
                                **kwargs)
        self._popens.append(proc)
        return proc

    def ping(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """One ICMP echo from ``src`` to ``dst``; True if answered within ``timeout``."""
        return self.run(src, [sys.executable, "-c", _PING, dst, str(timeout)],
                        timeout=timeout + 15).returncode == 0

    def tcp_open(self, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
        """True if a TCP connect from ``src`` to ``dst:port`` succeeds."""
        return self.run(src, [sys.executable, "-c", _TCP, dst, str(port), str(timeout)],
                        timeout=timeout + 15).returncode == 0

    # tear down ------------------------------------------------------------

    def reap(self, grace: float = 0.0) -> None:
        """Kill and reap every process started with popen. With a ``grace``,
        SIGTERM first: a daemon started this way then stops as systemd would
        stop it (floating IP, mount, FUSE released), not as a crash."""
        alive = [proc for proc in self._popens if proc.poll() is None]
        if grace > 0:
            for proc in alive:
                proc.terminate()
            deadline = time.monotonic() + grace
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in self._popens:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._popens.clear()

    wait_for = staticmethod(wait_for)

    def leftovers(self) -> list[str]:
        """Everything of this lab still on the host (empty after a clean down)."""
        return lab_leftovers(self.name, self.data_root)


def lab_leftovers(name: str, data_root: Path) -> list[str]:
    left: list[str] = []
    prefix = f"{name}-"
    if ns.NETNS_RUN_DIR.is_dir():
        left += [f"netns {n}" for n in os.listdir(ns.NETNS_RUN_DIR) if n.startswith(prefix)]
    run_dir = labmod.RUN_ROOT / name
    mounts = ns.read_mountinfo()
    for directory in (data_root, run_dir):
        left += [f"mount {e.mountpoint}" for e in ns.mounts_under(mounts, directory)]
    if run_dir.exists():
        left.append(f"directory {run_dir}")
    left += [f"loop {dev} -> {path}" for dev, path in ns.loop_devices().items()
             if path.startswith(str(data_root) + "/")]
    cgroup = labmod.CGROUP_ROOT / name
    if cgroup.exists():
        left.append(f"cgroup {cgroup}")
    left += [f"process {pid}" for pid in _processes_with_env(f"MIRRORD_LAB_NAME={name}")]
    return left


def _processes_with_env(assignment: str) -> list[int]:
    needle = assignment.encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ and ns.is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def unique_lab_name() -> str:
    return "t" + uuid.uuid4().hex[:5]


@contextmanager
def make_lab(data_root: Path, disk_size: str = "64M") -> Iterator[LabHandle]:
    """A lab that exists inside the ``with`` and is gone (checked) after it."""
    require_lab_prerequisites()
    handle = LabHandle(unique_lab_name(), data_root, disk_size)
    try:
        handle.up()
        yield handle
    finally:
        handle.reap()
        result = handle.cli("down", check=False)
        handle.reap()  # zombies of processes the down killed
        assert result.returncode == 0, f"lab down failed: {result.stderr.strip()}"
        clean = wait_for(lambda: not handle.leftovers(), timeout=5)
        assert clean, f"lab {handle.name} left behind: {handle.leftovers()}"


@pytest.fixture(name="make_lab", scope="session")
def make_lab_fixture() -> Callable[..., Any]:
    """``with make_lab(tmp_path) as lab2:`` a lab of a test's own (tests do not
    import conftest: another tests/ directory may have a conftest too)."""
    return make_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """One lab shared by the tests of a module (tests must leave it booted)."""
    with make_lab(tmp_path_factory.mktemp("lab")) as handle:
        yield handle


@pytest.fixture
def fresh_lab(tmp_path: Path) -> Iterator[LabHandle]:
    """A lab for one test only (for tests that break it on purpose)."""
    with make_lab(tmp_path) as handle:
        yield handle


@pytest.fixture(scope="session")
def fuse_hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libfuse3's hello example, built once: a tiny FUSE server for crash tests."""
    source = Path("/usr/share/doc/libfuse3-dev/examples/hello.c")
    cc = shutil.which("gcc") or shutil.which("cc")
    pkg = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                         text=True) if shutil.which("pkg-config") else None
    if not source.exists() or cc is None or pkg is None or pkg.returncode != 0:
        message = "libfuse3-dev (examples/hello.c), pkg-config and a C compiler are needed"
        skip_or_fail(message)
    binary = tmp_path_factory.mktemp("fuse") / "hello"
    subprocess.run([cc, "-o", str(binary), str(source), *shlex.split(pkg.stdout)], check=True,
                   capture_output=True, timeout=120)
    return binary
