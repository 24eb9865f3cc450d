"""The namespace lab keeps its contract (DESIGN.md §5).

Only 198.18.0.0/24 and 198.19.0.0/30 inside the lab's own namespaces are
ever contacted. Tests share one module-scoped lab and leave it booted.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from mirrord.net import lab as labmod
from mirrord.net import namespaces as ns

if TYPE_CHECKING:  # tests do not import conftest at run time
    from conftest import LabHandle
    from pyroute2 import IPRoute

pytestmark = pytest.mark.lab

NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20


def _ipr(lab: "LabHandle", node: str) -> "IPRoute":
    from pyroute2 import IPRoute

    return IPRoute(netns=lab.netns(node), flags=0)


def _addresses(lab: "LabHandle", node: str, family: int = socket.AF_INET) -> dict[str, set[str]]:
    """{ifname: {"addr/prefix"}} as the kernel has them."""
    with _ipr(lab, node) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        found: dict[str, set[str]] = {}
        for addr in ipr.get_addr(family=family):
            found.setdefault(names[addr["index"]], set()).add(
                f"{addr.get('address')}/{addr['prefixlen']}")
        return found


def _base(node: str) -> dict[str, set[str]]:
    want = {"lo": {"127.0.0.1/8"}}
    for ifname, address, prefix in labmod.base_addresses(node):
        want[ifname] = {f"{address}/{prefix}"}
    return want


def _neighbour_state(lab: "LabHandle", node: str, address: str) -> int | None:
    with _ipr(lab, node) as ipr:
        for entry in ipr.neigh("dump", family=socket.AF_INET):
            if entry.get("dst") == address:
                return entry["state"]
    return None


def _forget_neighbour(lab: "LabHandle", node: str, address: str) -> None:
    with _ipr(lab, node) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        try:
            ipr.neigh("del", dst=address, ifindex=idx)
        except Exception:  # noqa: BLE001 - no entry is fine
            pass


def _node_pids(lab: "LabHandle", node: str) -> list[int]:
    """Live processes in the node's cgroup or network namespace."""
    tasks = labmod.CGROUP_ROOT / lab.name / node / "tasks"
    pids = [int(p) for p in tasks.read_text().split()] if tasks.exists() else []
    pids += ns.ns_members(ns.ns_id(ns.netns_path(lab.netns(node))), None)
    return [p for p in pids if ns.is_alive(p)]


@pytest.fixture
def background(lab: "LabHandle") -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped after it."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------


def test_namespaces_links_and_addresses(lab: "LabHandle") -> None:
    for node in ("sw", "a1", "a2", "client"):
        assert ns.is_bind_mounted(ns.netns_path(lab.netns(node))), node
    for node in ("a1", "a2", "client"):
        assert _addresses(lab, node) == _base(node), node
        assert not _addresses(lab, node, socket.AF_INET6), f"{node} must not speak IPv6"
    assert "sync0" not in _addresses(lab, "client")
    with _ipr(lab, "sw") as sw:
        links = {link.get("ifname"): link for link in sw.get_links()}
        bridge = links["br0"]["index"]
        for port in ("a1", "a2", "client"):
            assert links[port].get("master") == bridge, port
        assert not [a for a in sw.get_addr()
                    if a.get("address") not in ("127.0.0.1", None)], "the switch has no address"
    for node in ("a1", "a2"):
        disk = lab.home(node) / "disk.img"
        assert disk.stat().st_size == 64 * 1024 * 1024
        assert disk.stat().st_blocks == 0, "disk.img must be sparse"


def test_exec_environment_cwd_pid_and_exit_codes(lab: "LabHandle", tmp_path: Path,
                                                 background: list[subprocess.Popen[bytes]]) -> None:
    out = lab.run("a1", 'echo "$MIRRORD_HOME|$MIRRORD_LAB_NODE|$MIRRORD_LAB_NAME|$(pwd)"',
                  cwd=tmp_path, check=True).stdout.strip()
    assert out == f"{lab.home('a1')}|a1|{lab.name}|{tmp_path}"
    assert lab.run("client", 'echo "${MIRRORD_HOME-unset}"').stdout.strip() == "unset"
    assert lab.run("a2", "exit 7").returncode == 7
    missing = lab.run("a2", ["no-such-command-mirrord"])
    assert missing.returncode == 127 and "not found" in missing.stderr
    # the Popen pid is the command's pid, in the node's cgroup and namespaces
    proc = lab.popen("a2", ["sleep", "30"])
    background.append(proc)
    assert lab.wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"), 5)
    assert Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b"sleep\x0030\x00"
    assert f"freezer:/mirrord-lab/{lab.name}/a2" in Path(f"/proc/{proc.pid}/cgroup").read_text()
    assert ns.ns_id(f"/proc/{proc.pid}/ns/net") == ns.ns_id(ns.netns_path(lab.netns("a2")))
    assert ns.ns_id(f"/proc/{proc.pid}/ns/mnt") == \
        ns.ns_id(labmod.RUN_ROOT / lab.name / "a2.mnt")


def test_public_network_and_sync_link(lab: "LabHandle") -> None:
    assert lab.ping("client", "198.18.0.11")
    assert lab.ping("client", "198.18.0.12")
    assert lab.ping("a1", "198.18.0.12")
    assert lab.ping("a1", "198.19.0.2")
    assert lab.ping("a2", "198.19.0.1")
    # the client has no route to the sync link, and appliances do not forward
    assert not lab.ping("client", "198.19.0.1", timeout=0.5)
    assert not lab.ping("client", "198.19.0.2", timeout=0.5)


def test_cut_and_heal(lab: "LabHandle") -> None:
    lab.cut("a1", "sync")
    try:
        assert not lab.ping("a1", "198.19.0.2", timeout=0.5)
        assert not lab.ping("a2", "198.19.0.1", timeout=0.5)
        assert lab.ping("client", "198.18.0.11"), "public must work while sync is cut"
        assert lab.ping("a1", "198.18.0.12")
    finally:
        lab.heal("a1", "sync")
    assert lab.ping("a1", "198.19.0.2")

    lab.cut("a2", "public")
    try:
        assert not lab.ping("client", "198.18.0.12", timeout=0.5)
        assert lab.ping("a2", "198.19.0.1"), "sync must work while public is cut"
    finally:
        lab.heal("a2", "all")
    assert lab.ping("client", "198.18.0.12")


def test_freeze_stops_processes_but_kernel_answers(lab: "LabHandle", background: list[subprocess.Popen[bytes]]) -> None:
    counter = lab.home("a1") / "counter"
    background.append(lab.popen(
        "a1", 'i=0; while :; do i=$((i+1)); echo $i > "$MIRRORD_HOME/counter.tmp"; '
              'mv "$MIRRORD_HOME/counter.tmp" "$MIRRORD_HOME/counter"; sleep 0.02; done'))
    assert lab.wait_for(counter.exists, 5)
    pid = background[-1].pid
    lab.freeze("a1")
    try:
        state = (labmod.CGROUP_ROOT / lab.name / "a1" / "freezer.state").read_text().strip()
        assert state == "FROZEN"
        # a frozen task shows as D (TASK_FROZEN) on recent kernels, T on old ones
        assert Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "DT"
        before = counter.read_text()
        time.sleep(0.4)
        assert counter.read_text() == before, "a frozen node must not make progress"
        assert lab.ping("client", "198.18.0.11"), "a frozen node's kernel still answers"
    finally:
        lab.thaw("a1")
    assert lab.wait_for(lambda: counter.read_text() != before, 5), "thaw must resume it"


def test_mounts_persist_in_the_node_and_stay_private(lab: "LabHandle") -> None:
    mnt = lab.home("a1") / "mnt"
    lab.run("a1", 'mkdir -p "$MIRRORD_HOME/mnt" && mount -t tmpfs lab-a1-tmpfs "$MIRRORD_HOME/mnt"'
                  ' && echo hello > "$MIRRORD_HOME/mnt/f"', check=True)
    try:
        assert lab.run("a1", 'cat "$MIRRORD_HOME/mnt/f"').stdout == "hello\n"
        assert "lab-a1-tmpfs" in lab.run("a1", "cat /proc/self/mountinfo").stdout
        assert "lab-a1-tmpfs" not in lab.run("a2", "cat /proc/self/mountinfo").stdout
        assert "lab-a1-tmpfs" not in Path("/proc/self/mountinfo").read_text()
        assert not (mnt / "f").exists(), "the host sees the plain directory"
    finally:
        lab.run("a1", 'umount "$MIRRORD_HOME/mnt"', check=True)


def test_crash_silences_the_node_and_boot_brings_back_base_only(
        lab: "LabHandle", background: list[subprocess.Popen[bytes]], fuse_hello: Path) -> None:
    home = lab.home("a1")
    # a node with a life: processes, a listener, the floating IP, a mount,
    # a loop device and a FUSE file system
    with _ipr(lab, "a1") as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="198.18.0.10",
                 prefixlen=24)
    lab.run("a1", 'mkdir -p "$MIRRORD_HOME/mnt" "$MIRRORD_HOME/fuse" && '
                  'mount -t tmpfs lab-a1-tmpfs "$MIRRORD_HOME/mnt"', check=True)
    sleeper = lab.popen("a1", ["sleep", "600"])
    server = lab.popen("a1", [sys.executable, "-m", "http.server", "--bind", "198.18.0.11",
                              "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fuse = lab.popen("a1", [str(fuse_hello), "-f", str(home / "fuse")])
    background += [sleeper, server, fuse]
    loop = lab.run("a1", 'losetup -f --show "$MIRRORD_HOME/disk.img"', check=True).stdout.strip()
    assert loop in ns.loop_devices()
    assert lab.wait_for(lambda: lab.tcp_open("client", "198.18.0.11", 8080), 10)
    assert lab.wait_for(lambda: lab.run("a1", 'cat "$MIRRORD_HOME/fuse/hello"').stdout
                    == "Hello World!\n", 10)
    assert lab.ping("client", "198.18.0.10")

    lab.crash("a1")

    for proc in (sleeper, server, fuse):
        assert proc.wait(timeout=5) == -9
    assert _node_pids(lab, "a1") == []
    assert loop not in ns.loop_devices(), "crash must detach the node's loop devices"
    assert not ns.is_bind_mounted(labmod.RUN_ROOT / lab.name / "a1.mnt")
    for address in ("198.18.0.11", "198.18.0.10"):
        _forget_neighbour(lab, "client", address)
        assert not lab.ping("client", address, timeout=0.5), address
        assert not lab.tcp_open("client", address, 8080, timeout=0.5), address
        # nobody answered the ARP request
        assert _neighbour_state(lab, "client", address) in (NUD_INCOMPLETE, NUD_FAILED, None)
    assert not lab.ping("a2", "198.19.0.1", timeout=0.5)
    refused = lab.run("a1", "true")
    assert refused.returncode == 1 and "powered off" in refused.stderr
    assert lab.cli("heal", "a1", "all", check=False).returncode == 1

    lab.boot("a1")

    assert _addresses(lab, "a1") == _base("a1"), "boot keeps only the base addresses"
    assert _node_pids(lab, "a1") == []
    mounts = ns.parse_mountinfo(lab.run("a1", "cat /proc/self/mountinfo", check=True).stdout)
    assert not ns.mounts_under(mounts, home), "boot starts with a fresh mount namespace"
    assert not [m for m in mounts if m.fstype.startswith("fuse.")]
    assert lab.ping("client", "198.18.0.11")
    assert lab.ping("a1", "198.19.0.2")
    assert not lab.tcp_open("client", "198.18.0.11", 8080, timeout=0.5)


def test_bad_arguments_and_missing_lab(lab: "LabHandle") -> None:
    assert lab.cli("exec", "a3", "--", "true", check=False).returncode == 2
    assert lab.cli("crash", "client", check=False).returncode == 2
    assert lab.cli("cut", "a1", "both", check=False).returncode == 2
    assert lab.cli("up", "--disk-size", "12X", check=False).returncode == 2
    ghost = type(lab)("tghost" + lab.name[1:], lab.data_root)
    result = ghost.cli("exec", "a1", "--", "true", check=False)
    assert result.returncode == 1 and "is not up" in result.stderr
    result = ghost.cli("down", check=False)
    assert result.returncode == 0 and "does not exist" in result.stdout
    assert labmod.parse_size("4096K") == 4 << 20 and labmod.parse_size("1G") == 1 << 30
    assert labmod.parse_size("12345") == 12345


def test_up_repairs_and_down_leaves_nothing(make_lab: Callable[..., Any], tmp_path: Path) -> None:
    with make_lab(tmp_path) as other:
        # repair: a crashed node and a deleted namespace come back with `up`
        other.crash("a2")
        from pyroute2 import netns

        netns.remove(other.netns("client"))
        other.up()
        assert other.run("a2", "true").returncode == 0
        assert other.ping("client", "198.18.0.12")
        assert other.ping("a1", "198.19.0.2")

        # leave a mess behind: processes, a mount and a loop device
        sleeper = other.popen("a1", ["sleep", "600"])
        other.popen("client", ["sleep", "600"])
        other.run("a2", 'mkdir -p "$MIRRORD_HOME/mnt" && mount -t tmpfs x "$MIRRORD_HOME/mnt" &&'
                        ' losetup -f --show "$MIRRORD_HOME/disk.img"', check=True)
        assert other.leftovers()
        result = other.down()
        assert "removed" in result.stdout
        assert sleeper.wait(timeout=5) == -9
        other.reap()
        assert other.leftovers() == []
        assert not other.data_dir.exists()
        again = other.down()
        assert "does not exist" in again.stdout
