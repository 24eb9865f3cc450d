"""The two-appliance network-namespace lab (DESIGN.md §5).

One machine plays three: appliances ``a1`` and ``a2`` and a ``client``.

::

    <name>-client      <name>-sw (bridge br0)         <name>-a1            <name>-a2
    eth0 198.18.0.100 ── client   a1 ──────────────── eth0 198.18.0.11
                                  a2 ─────────────────────────────────── eth0 198.18.0.12
                                                      sync0 198.19.0.1/30 ─ sync0 198.19.0.2/30

Each appliance also has a *persistent* mount namespace, bound to
``/run/mirrord-lab/<name>/<node>.mnt`` (a private bind mount, the way
``ip netns`` keeps /run/netns), a freezer cgroup
``/sys/fs/cgroup/freezer/mirrord-lab/<name>/<node>`` that every process
started in the node joins, and a plain host directory as ``MIRRORD_HOME``
(``$MIRRORD_LAB_DIR/<name>/<node>``, default base ``/var/lib/mirrord-lab``)
holding a sparse ``disk.img``. The client only has a network namespace (and a
cgroup, so ``down`` can find its processes).

Node power model:

* powered on  = the node's mount-namespace file is bound;
* ``crash``   = power loss: freeze, links down, SIGKILL everything of the
  node, abort its FUSE connections, drop its mounts, loop devices and mount
  namespace. ``exec`` and ``heal`` then refuse until ``boot``;
* ``boot``    = power on. **On a node that is running, boot first does a
  crash** (a hard reset), so it always ends in the same state: fresh mount
  namespace, no process, links up with only the base addresses;
* ``up`` on an existing or half-built lab **repairs**: it creates whatever is
  missing (namespaces, links, base addresses, cgroups, disk images, mount
  namespaces, i.e. it also powers crashed nodes on) and sets every lab link
  up, but never kills a process, never removes an address a product added
  and never resizes an existing disk image. A failed ``up`` leaves the
  half-built lab for inspection: ``up`` again repairs, ``down`` removes it.

pyroute2 is imported only inside the functions that change links, so
``lab exec`` (run very often by tests) starts fast.

Known limits: a node's /sys is the host's (its /sys/class/net lists the
host's interfaces; use netlink, as pyroute2 and ip do, inside nodes). The
host's root mount is private on most lab machines, so a host mount that
existed when a node was booted stays in the node's copy after the host
unmounts it, until that node crashes or reboots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NoReturn, Sequence

from mirrord.errors import BadInput, LabError
from mirrord.net import namespaces as ns
from mirrord.net.cgroup import FREEZER_ROOT, Freezer, remove_if_empty

if TYPE_CHECKING:
    from pyroute2 import IPRoute

DEFAULT_NAME = "lab"
DEFAULT_DISK_SIZE = 256 * 1024 * 1024
RUN_ROOT = Path("/run/mirrord-lab")
DEFAULT_DATA_ROOT = Path("/var/lib/mirrord-lab")
DATA_DIR_ENV = "MIRRORD_LAB_DIR"
CGROUP_ROOT = FREEZER_ROOT / "mirrord-lab"

APPLIANCES = ("a1", "a2")
NODES = ("a1", "a2", "client")
LINK_CHOICES = ("sync", "public", "all")
SWITCH = "sw"
BRIDGE = "br0"
PUBLIC_IF = "eth0"
SYNC_IF = "sync0"

PUBLIC_PREFIX = 24
SYNC_PREFIX = 30
PUBLIC_IP = {"a1": "198.18.0.11", "a2": "198.18.0.12", "client": "198.18.0.100"}
SYNC_IP = {"a1": "198.19.0.1", "a2": "198.19.0.2"}
FLOATING_IP = "198.18.0.10"  # not configured by the lab: the product adds it
FLOATING_PREFIX = 24

# bounds for every wait (seconds)
FREEZE_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
HELPER_TIMEOUT = 15.0
LOOP_TIMEOUT = 5.0
LINK_TIMEOUT = 3.0

IFF_LOWER_UP = 0x10000

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,23}")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


class CommandNotFound(LabError):
    """``lab exec`` could not find the command (shell convention: 127)."""

    exit_code = 127


class CommandNotExecutable(LabError):
    exit_code = 126


# --------------------------------------------------------------------------
# argument checks


def parse_size(text: str | int) -> int:
    """Bytes from "256M", "1G", "4096K", "1048576" (binary units)."""
    match = _SIZE_RE.fullmatch(str(text).strip())
    if not match or int(match.group(1)) == 0:
        raise BadInput(f"bad disk size {text!r}: use a positive number with an optional "
                       f"K, M, G or T suffix, e.g. 256M.")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    return int(match.group(1)) << shift


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise BadInput(f"bad lab name {name!r}: use 1-24 letters, digits, '-' or '_'.")
    return name


def check_node(node: str, allowed: Sequence[str] = NODES) -> str:
    if node not in allowed:
        raise BadInput(f"unknown node {node!r}: expected one of {', '.join(allowed)}.")
    return node


def link_names(node: str, which: str) -> list[str]:
    """Interfaces of ``node`` meant by sync|public|all."""
    if which not in LINK_CHOICES:
        raise BadInput(f"unknown link {which!r}: expected one of {', '.join(LINK_CHOICES)}.")
    names = []
    if which in ("public", "all"):
        names.append(PUBLIC_IF)
    if which in ("sync", "all") and node in SYNC_IP:
        names.append(SYNC_IF)
    return names


def base_addresses(node: str) -> list[tuple[str, str, int]]:
    """(interface, address, prefix) a node has after boot."""
    addrs = [(PUBLIC_IF, PUBLIC_IP[node], PUBLIC_PREFIX)]
    if node in SYNC_IP:
        addrs.append((SYNC_IF, SYNC_IP[node], SYNC_PREFIX))
    return addrs


# --------------------------------------------------------------------------
# where things live


@dataclass(frozen=True)
class Lab:
    """Names and paths of one lab; holds no open resources."""

    name: str
    data_dir: Path  # $MIRRORD_LAB_DIR/<name>

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def state_file(self) -> Path:
        return self.run_dir / "lab.json"

    @property
    def cgroup_dir(self) -> Path:
        return CGROUP_ROOT / self.name

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def netns_file(self, node: str) -> Path:
        return ns.netns_path(self.netns(node))

    def home(self, node: str) -> Path:
        return self.data_dir / node

    def disk(self, node: str) -> Path:
        return self.home(node) / "disk.img"

    def mntns_file(self, node: str) -> Path:
        return self.run_dir / f"{node}.mnt"

    def freezer(self, node: str) -> Freezer:
        return Freezer(self.cgroup_dir / node)

    def is_powered(self, node: str) -> bool:
        if node not in APPLIANCES:
            return self.netns_file(node).exists()
        return ns.is_bind_mounted(self.mntns_file(node))

    def node_env(self, node: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of a command run in ``node``: the caller's, plus the
        lab variables, plus this interpreter's script directory on PATH."""
        env = dict(os.environ if base is None else base)
        env.update(MIRRORD_LAB_NAME=self.name, MIRRORD_LAB_NODE=node)
        # mirrord's console scripts (startHA, HAstatus, …) sit next to this
        # interpreter, e.g. .venv/bin, which is not on PATH when the tests
        # run as `.venv/bin/python -m pytest` without activating the venv
        scripts = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        if scripts and scripts not in path:
            env["PATH"] = os.pathsep.join([scripts, *path])
        if node in APPLIANCES:
            env["MIRRORD_HOME"] = str(self.home(node))
        else:
            env.pop("MIRRORD_HOME", None)  # the client is no appliance
        return env


def data_root() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_ROOT)


def open_lab(name: str = DEFAULT_NAME) -> Lab:
    """The lab ``name`` as recorded by ``up``; LabError when it is not up."""
    check_name(name)
    try:
        state = json.loads((RUN_ROOT / name / "lab.json").read_text())
    except FileNotFoundError:
        raise LabError(f"lab {name!r} is not up; run `mirrord lab up --name {name}`.") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"lab {name!r} has an unreadable state file: {exc}.") from exc
    return Lab(name, Path(state["data_dir"]))


def _lab_for_cleanup(name: str) -> Lab:
    """Like open_lab, but also for a half-built lab without a state file."""
    try:
        return open_lab(name)
    except LabError:
        return Lab(name, data_root() / name)


# --------------------------------------------------------------------------
# up


def up(name: str = DEFAULT_NAME, disk_size: int | str = DEFAULT_DISK_SIZE,
       data_dir_root: Path | None = None) -> Lab:
    """Create the lab, or repair an existing/half-built one (see module doc)."""
    check_name(name)
    size = parse_size(disk_size)
    _require_host()
    lab = _ensure_run_dir(name, (data_dir_root or data_root()) / name, size)
    try:
        for node in APPLIANCES:
            _ensure_disk(lab, node, size)
        for node in (SWITCH, *NODES):
            _ensure_netns(lab.netns(node))
        _ensure_links(lab)
        for node in NODES:
            _configure_node(lab, node, flush=False)
            lab.freezer(node).create()
        for node in APPLIANCES:
            _ensure_mntns(lab, node)
    except OSError as exc:
        raise LabError(f"lab {name!r} could not be built: {exc}; `mirrord lab up` repairs, "
                       f"`mirrord lab down` removes what was made.") from exc
    return lab


def _require_host() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, cgroups).")
    if not FREEZER_ROOT.is_dir():
        raise LabError(f"the lab needs the cgroup-v1 freezer hierarchy at {FREEZER_ROOT}.")
    if shutil.which("unshare") is None:
        raise LabError("the lab needs util-linux `unshare` on PATH.")


def _ensure_run_dir(name: str, data_dir: Path, size: int) -> Lab:
    """A private bind mount per lab, so mount-ns files can be bound in it
    (binding an nsfs file under a shared mount would be refused or would
    propagate into the nodes)."""
    run_dir = RUN_ROOT / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not _is_mountpoint(run_dir):
        ns.mount(str(run_dir), run_dir, None, ns.MS_BIND)
    ns.mount(None, run_dir, None, ns.MS_PRIVATE)
    state_file = run_dir / "lab.json"
    if state_file.exists():
        return open_lab(name)  # repair keeps the recorded data dir
    lab = Lab(name, data_dir.absolute())
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": name, "data_dir": str(lab.data_dir),
                               "disk_size": size}, indent=1) + "\n")
    tmp.rename(state_file)
    return lab


def _is_mountpoint(path: Path) -> bool:
    return any(e.mountpoint == str(path) for e in ns.read_mountinfo())


def _ensure_disk(lab: Lab, node: str, size: int) -> None:
    lab.home(node).mkdir(parents=True, exist_ok=True)
    disk = lab.disk(node)
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(size)  # sparse: no blocks are written


def _ensure_netns(nsname: str) -> None:
    from pyroute2 import netns as p2netns

    path = ns.netns_path(nsname)
    if path.exists() and not ns.is_bind_mounted(path):
        path.unlink()  # left by a half-finished create or remove
    if not path.exists():
        p2netns.create(nsname)
    # no IPv6: the lab must only ever speak 198.18.0.0/15
    ns.run_inside(_disable_ipv6, netns_file=path, timeout=HELPER_TIMEOUT)


def _disable_ipv6() -> None:
    for conf in ("all", "default"):
        p = Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6")
        if p.exists():
            p.write_text("1\n")


@contextmanager
def _ipr(nsname: str) -> Iterator["IPRoute"]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if not ns.netns_path(nsname).exists():
        raise LabError(f"network namespace {nsname} is missing; run `mirrord lab up` to repair.")
    ipr = IPRoute(netns=nsname, flags=0)
    try:
        yield ipr
    except NetlinkError as exc:
        raise LabError(f"netlink refused a change in {nsname}: {exc}.") from exc
    finally:
        ipr.close()


def _index(ipr: "IPRoute", ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _ensure_links(lab: Lab) -> None:
    with _ipr(lab.netns(SWITCH)) as sw:
        if _index(sw, BRIDGE) is None:
            sw.link("add", ifname=BRIDGE, kind="bridge")
        bridge = _index(sw, BRIDGE)
        sw.link("set", index=bridge, state="up")
        sw.link("set", index=_index(sw, "lo"), state="up")
        for node in NODES:
            if not _has_pair(lab.netns(SWITCH), node, lab.netns(node), PUBLIC_IF):
                # the peer is created directly in the node's namespace
                sw.link("add", ifname=node, kind="veth",
                        peer={"ifname": PUBLIC_IF, "net_ns_fd": lab.netns(node)})
            sw.link("set", index=_index(sw, node), master=bridge, state="up")
    if not _has_pair(lab.netns("a1"), SYNC_IF, lab.netns("a2"), SYNC_IF):
        with _ipr(lab.netns("a1")) as a1:
            a1.link("add", ifname=SYNC_IF, kind="veth",
                    peer={"ifname": SYNC_IF, "net_ns_fd": lab.netns("a2")})


def _has_pair(ns_a: str, if_a: str, ns_b: str, if_b: str) -> bool:
    """True when both ends exist; otherwise remove the stray end, if any.

    A half-built or damaged lab can hold one end of a pair whose other end
    went with a deleted namespace (e.g. kept alive by a process in it).
    """
    present = []
    for nsname, ifname in ((ns_a, if_a), (ns_b, if_b)):
        with _ipr(nsname) as ipr:
            present.append(_index(ipr, ifname) is not None)
    if all(present):
        return True
    for (nsname, ifname), there in zip(((ns_a, if_a), (ns_b, if_b)), present):
        if there:
            with _ipr(nsname) as ipr:
                ipr.link("del", index=_index(ipr, ifname))
    return False


def _configure_node(lab: Lab, node: str, flush: bool) -> None:
    """lo and the node's links up with their base addresses; with ``flush``
    every other address on them goes (a boot), else they are kept (a repair)."""
    with _ipr(lab.netns(node)) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        for ifname, address, prefix in base_addresses(node):
            idx = _index(ipr, ifname)
            if idx is None:
                raise LabError(f"{ifname} is missing in {lab.netns(node)}; run `mirrord lab up`.")
            if flush:
                ipr.flush_addr(index=idx)
            if not ipr.get_addr(index=idx, address=address, prefixlen=prefix):
                ipr.addr("add", index=idx, address=address, prefixlen=prefix)
            ipr.link("set", index=idx, state="up")
        _wait_running(ipr, [ifname for ifname, _, _ in base_addresses(node)])


def _wait_running(ipr: "IPRoute", ifnames: Sequence[str], timeout: float = LINK_TIMEOUT) -> None:
    """Wait until links whose peer is up are operationally UP.

    The kernel turns a veth's queue on asynchronously (linkwatch, up to ~1 s)
    and drops what is sent before, so a test pinging right after `boot` or
    `heal` would otherwise fail at random. A link whose peer is down (no
    carrier) is not waited for.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [link for link in ipr.get_links()
                   if link.get("ifname") in ifnames
                   and link["flags"] & IFF_LOWER_UP and link.get("operstate") != "UP"]
        if not pending:
            return
        time.sleep(0.02)


def _set_links(lab: Lab, node: str, ifnames: Sequence[str], up_: bool) -> None:
    with _ipr(lab.netns(node)) as ipr:
        for ifname in ifnames:
            idx = _index(ipr, ifname)
            if idx is not None:
                ipr.link("set", index=idx, state="up" if up_ else "down")
        if up_:
            _wait_running(ipr, ifnames)


def _ensure_mntns(lab: Lab, node: str) -> None:
    """A fresh persistent mount namespace for ``node`` unless it has one.

    ``--propagation slave``: host mounts (e.g. new /run/netns entries) still
    reach the node, the node's own mounts never reach the host.
    """
    f = lab.mntns_file(node)
    if ns.is_bind_mounted(f):
        return
    f.touch()
    proc = subprocess.run(["unshare", f"--mount={f}", "--propagation", "slave", "true"],
                          capture_output=True, text=True, timeout=HELPER_TIMEOUT)
    if proc.returncode != 0:
        raise LabError(f"could not create the mount namespace of {node}: {proc.stderr.strip()}.")


# --------------------------------------------------------------------------
# exec


def exec_in(name: str, node: str, argv: Sequence[str],
            env: Mapping[str, str] | None = None) -> NoReturn:
    """Replace this process by ``argv`` running inside ``node``.

    Joins the node's freezer cgroup first (so every child is tracked; on a
    frozen node the command freezes too, as on a hung machine), then its
    network and mount namespaces, keeping the cwd and PATH.
    """
    check_node(node)
    if not argv:
        raise BadInput("lab exec needs a command to run.")
    lab = open_lab(name)
    netns_file = lab.netns_file(node)
    if not netns_file.exists():
        raise LabError(f"node {node} of lab {name!r} has no network namespace; "
                       f"run `mirrord lab up --name {name}` to repair.")
    mntns_file = None
    if node in APPLIANCES:
        if not lab.is_powered(node):
            raise LabError(f"{node} is powered off (crashed); run `mirrord lab boot --name "
                           f"{name} {node}` first.")
        mntns_file = lab.mntns_file(node)
    freezer = lab.freezer(node)
    if not freezer.exists():
        raise LabError(f"the cgroup of {node} is missing; run `mirrord lab up --name {name}`.")
    freezer.join()
    try:
        ns.enter(netns_file, mntns_file)
    except OSError as exc:  # e.g. crashed between the check above and here
        raise LabError(f"could not enter {node}: {exc}.") from exc
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec:
    # give the command the defaults a shell would (as subprocess does)
    for sig in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, sig), signal.SIG_DFL)
    try:
        os.execvpe(argv[0], list(argv), lab.node_env(node, env))
    except FileNotFoundError:
        raise CommandNotFound(f"{argv[0]}: command not found in {node}.") from None
    except PermissionError:
        raise CommandNotExecutable(f"{argv[0]}: permission denied in {node}.") from None


# --------------------------------------------------------------------------
# power


def crash(name: str, node: str) -> None:
    """Power loss of an appliance (idempotent: crashing a dead node is a no-op)."""
    check_node(node, APPLIANCES)
    _power_off(open_lab(name), node)


def boot(name: str, node: str) -> None:
    """Power on an appliance; on a running node this is a hard reset (crash first).

    Ends with: fresh mount namespace, no process, links up with only the
    base addresses (anything the product added, e.g. the floating IP, gone).
    """
    check_node(node, APPLIANCES)
    lab = open_lab(name)
    _power_off(lab, node)
    _ensure_mntns(lab, node)
    lab.freezer(node).create()
    _configure_node(lab, node, flush=True)


def _power_off(lab: Lab, node: str) -> None:
    """Stop every trace of ``node`` running; raise LabError if something survives."""
    freezer = lab.freezer(node)
    net = ns.ns_id(lab.netns_file(node)) if lab.netns_file(node).exists() else None
    mnt = ns.ns_id(lab.mntns_file(node)) if lab.is_powered(node) and node in APPLIANCES else None
    # freeze first so nothing forks or answers while we take it apart
    freezer.freeze(FREEZE_TIMEOUT)
    if net:
        _set_links(lab, node, [PUBLIC_IF, SYNC_IF], up_=False)
    victims = _kill_rounds(freezer, net, mnt)
    freezer.thaw(FREEZE_TIMEOUT)
    survivors = ns.wait_gone(victims, KILL_TIMEOUT / 2)
    loops: list[str] = []
    if mnt:
        loops = _teardown_mounts(lab, node)
        ns.umount_lazy(lab.mntns_file(node))
    # a process stuck on an aborted FUSE request dies now
    survivors = ns.wait_gone(survivors + _kill_rounds(freezer, net, mnt), KILL_TIMEOUT)
    stuck_loops = _wait_loops_detached(loops)
    if survivors or stuck_loops:
        raise LabError(f"{node} did not power off cleanly: processes still alive {survivors}, "
                       f"loop devices still attached {stuck_loops}.")


def _kill_rounds(freezer: Freezer, net: ns.NsId | None, mnt: ns.NsId | None,
                 rounds: int = 20) -> list[int]:
    """SIGKILL the node's processes until no new one shows up (bounded)."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = (set(freezer.pids()) | set(ns.ns_members(net, mnt))) - killed
        pids = {p for p in pids if ns.is_alive(p)}
        if not pids:
            break
        ns.kill_all(pids)
        killed |= pids
    return sorted(killed)


def _teardown_mounts(lab: Lab, node: str) -> list[str]:
    """Inside the node's mount namespace: abort its FUSE connections, detach
    its loop devices and lazily unmount what only it has. Returns the loop
    devices detached (they may clear asynchronously)."""
    host_keys = [list(e.key) for e in ns.read_mountinfo()]
    home = str(lab.home(node))

    def inside() -> dict[str, Any]:
        return _cleanup_inside(host_keys, home)

    try:
        report = ns.run_inside(inside, mntns_file=lab.mntns_file(node), timeout=HELPER_TIMEOUT)
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise LabError(f"could not clean the mounts of {node}: {exc}.") from exc
    return list(report["loops"])


def _cleanup_inside(host_keys: list[list[str]], home: str) -> dict[str, Any]:
    """Runs in a forked child that joined the node's mount namespace."""
    remaining = Counter(tuple(k) for k in host_keys)
    own = []
    for entry in ns.read_mountinfo():
        if remaining[entry.key] > 0:
            remaining[entry.key] -= 1  # a copy of a host mount
        else:
            own.append(entry)
    # loop paths must be read before unmounting: d_path changes after
    loops = [dev for dev, path in ns.loop_devices().items()
             if path == home or path.startswith(home + "/")]
    aborted = _abort_fuse([e for e in own if _is_fuse(e.fstype)])
    unmounted = [e.mountpoint for e in reversed(own) if _try_umount(e.mountpoint)]
    for dev in loops:
        ns.loop_detach(dev)
    return {"aborted": aborted, "unmounted": unmounted, "loops": loops}


def _is_fuse(fstype: str) -> bool:
    return fstype in ("fuse", "fuseblk") or fstype.startswith("fuse.")


def _abort_fuse(entries: list[ns.MountEntry]) -> list[int]:
    if not entries:
        return []
    if not any(ns.FUSECTL_DIR.iterdir()):
        # only inside this (doomed) mount namespace
        ns.mount("fusectl", ns.FUSECTL_DIR, "fusectl", 0)
    aborted = []
    for entry in entries:
        major, minor = (int(x) for x in entry.dev.split(":"))
        conn = ns.FUSECTL_DIR / str((major << 20) | minor)  # the kernel's dev_t
        try:
            (conn / "abort").write_text("1")
            aborted.append(int(conn.name))
        except OSError:
            pass  # already gone with its server
    return aborted


def _try_umount(mountpoint: str) -> bool:
    try:
        return ns.umount_lazy(mountpoint)
    except OSError:
        return False


def _wait_loops_detached(devices: Sequence[str]) -> list[str]:
    deadline = time.monotonic() + LOOP_TIMEOUT
    while True:
        attached = [d for d in devices if d in ns.loop_devices()]
        if not attached or time.monotonic() > deadline:
            return attached
        time.sleep(0.05)


# --------------------------------------------------------------------------
# freeze / links


def freeze(name: str, node: str) -> None:
    """Stop every process of ``node`` (its kernel keeps answering)."""
    check_node(node, APPLIANCES)
    freezer = open_lab(name).freezer(node)
    if not freezer.freeze(FREEZE_TIMEOUT):
        raise LabError(f"{node} did not freeze within {FREEZE_TIMEOUT:g} s "
                       f"(state {freezer.state()}).")


def thaw(name: str, node: str) -> None:
    check_node(node, APPLIANCES)
    freezer = open_lab(name).freezer(node)
    if not freezer.thaw(FREEZE_TIMEOUT):
        raise LabError(f"{node} did not thaw within {FREEZE_TIMEOUT:g} s.")


def cut(name: str, node: str, which: str) -> None:
    """Take ``node``'s sync|public|all link(s) down."""
    check_node(node, APPLIANCES)
    _set_links(open_lab(name), node, link_names(node, which), up_=False)


def heal(name: str, node: str, which: str) -> None:
    """Bring ``node``'s link(s) back up; refused while the node is crashed."""
    check_node(node, APPLIANCES)
    lab = open_lab(name)
    if not lab.is_powered(node):
        raise LabError(f"{node} is powered off; `mirrord lab boot --name {name} {node}` "
                       f"brings its links back.")
    _set_links(lab, node, link_names(node, which), up_=True)


# --------------------------------------------------------------------------
# down


def exists(name: str) -> bool:
    """True if anything of lab ``name`` is left on this host."""
    lab = _lab_for_cleanup(check_name(name))
    return (lab.run_dir.exists() or lab.cgroup_dir.exists() or lab.data_dir.exists()
            or any(lab.netns_file(n).exists() for n in (SWITCH, *NODES)))


def down(name: str = DEFAULT_NAME) -> bool:
    """Remove everything lab ``name`` made; False if there was nothing."""
    check_name(name)
    if not exists(name):
        return False
    lab = _lab_for_cleanup(name)
    problems: list[str] = []
    for node in NODES:
        _best_effort(problems, _power_off, lab, node)
    for node in (SWITCH, *NODES):
        _best_effort(problems, _remove_netns, lab.netns(node))
    _best_effort(problems, _remove_cgroups, lab)
    _best_effort(problems, _remove_run_dir, lab)
    _best_effort(problems, _remove_data_dir, lab)
    if problems:
        raise LabError(f"lab {name!r} was not removed completely: {'; '.join(problems)}")
    return True


def _best_effort(problems: list[str], func: Callable[..., Any], *args: Any) -> None:
    """down goes on after a failure so it removes as much as it can."""
    try:
        func(*args)
    except (LabError, OSError, RuntimeError, TimeoutError) as exc:
        problems.append(str(exc).rstrip("."))


def _remove_netns(nsname: str) -> None:
    path = ns.netns_path(nsname)
    # e.g. a tcpdump someone started in the switch namespace
    ns.kill_all(ns.ns_members(ns.ns_id(path), None) if path.exists() else [])
    ns.umount_lazy(path)
    path.unlink(missing_ok=True)


def _remove_cgroups(lab: Lab) -> None:
    for node in NODES:
        lab.freezer(node).thaw()
        lab.freezer(node).remove()
    remove_if_empty(lab.cgroup_dir)
    remove_if_empty(CGROUP_ROOT)  # other labs may still use it


def _remove_run_dir(lab: Lab) -> None:
    if not lab.run_dir.exists():
        return
    for node in APPLIANCES:
        ns.umount_lazy(lab.mntns_file(node))
    for _ in range(16):  # a repeated `up` may have stacked binds
        if not ns.umount_lazy(lab.run_dir):
            break
    shutil.rmtree(lab.run_dir)
    remove_if_empty(RUN_ROOT)


def _remove_data_dir(lab: Lab) -> None:
    if not lab.data_dir.exists():
        return
    # rmtree would walk into anything mounted below (and delete its files)
    for entry in reversed(ns.mounts_under(ns.read_mountinfo(), lab.data_dir)):
        ns.umount_lazy(entry.mountpoint)
    left = ns.mounts_under(ns.read_mountinfo(), lab.data_dir)
    if left:
        raise LabError(f"not removing {lab.data_dir}: still mounted below it: "
                       f"{', '.join(e.mountpoint for e in left)}.")
    shutil.rmtree(lab.data_dir)
