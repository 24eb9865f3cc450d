"""The shared secret: a peer (or any process) without it cannot replicate a byte."""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Iterator

import pytest

from hactl import forget_ha_state, ha_log, in_sync, start_ha, status, stop_all, wait_status

pytestmark = pytest.mark.lab

STRANGER = r"""
import json, socket, struct
from mirrord import __version__  # a stranger that knows everything but the secret
from mirrord.replication.link import PROTOCOL_VERSION
def send(s, m):
    b = json.dumps(m).encode(); s.sendall(struct.pack(">I", len(b)) + b)
def recv(s):
    n, = struct.unpack(">I", s.recv(4)); return json.loads(s.recv(n))
s = socket.create_connection(("198.19.0.2", 7788), 5, source_address=("198.19.0.1", 0))
send(s, {"type": "hello", "protocol": PROTOCOL_VERSION, "version": __version__, "node": "x", "role": "primary", "volume": "r0",
         "disk_size": 1 << 20, "settings": {}, "nonce": "00"})
print(recv(s)["type"])
send(s, {"type": "auth", "proof": "0" * 64})
print(recv(s))
d = socket.create_connection(("198.19.0.2", 7788), 5, source_address=("198.19.0.1", 0))
send(d, {"type": "data", "session": "guess", "proof": "0" * 64})
try:
    print(recv(d))
except Exception as exc:
    print("data connection closed:", type(exc).__name__)
"""


@pytest.fixture(scope="module")
def lab(make_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_lab(tmp_path_factory.mktemp("secret"), "64M") as handle:
        yield handle


@pytest.fixture
def pair(lab: Any) -> Iterator[Any]:
    yield lab
    stop_all(lab)
    forget_ha_state(lab)


def secret(lab: Any, node: str, text: str) -> str:
    path = lab.home(node) / "secret"
    path.write_text(text)
    path.chmod(0o600)
    return f"--secret-file {path}"


#: Secrets of at least config.MIN_SECRET_BYTES, each unlike anything ha.log says by itself.
ONE, ANOTHER, SHARED = "one-key-5d0c2b7e91aa4f36", "another-key-83e6f1c04b2d97a5", "pair-key-7f3a9c41d2e8b605"


def digest(lab: Any, node: str) -> str:
    return hashlib.sha256((lab.home(node) / "disk.img").read_bytes()).hexdigest()


def test_wrong_secret_replicates_nothing(pair: Any) -> None:
    pair.run("a1", "head -c 1M /dev/urandom > $MIRRORD_HOME/disk.img.head && "
                   "dd if=$MIRRORD_HOME/disk.img.head of=$MIRRORD_HOME/disk.img conv=notrunc status=none", check=True)
    before = digest(pair, "a2")
    start_ha(pair, "a2", secret(pair, "a2", ONE))
    start_ha(pair, "a1", secret(pair, "a1", ANOTHER))
    s1 = wait_status(pair, "a1", lambda s: "shared secret" in s["peer_error"], timeout=20)
    assert not s1["peer_connected"]
    assert "refused this appliance: the secondary does not know the shared secret" in ha_log(pair, "a2")
    assert digest(pair, "a2") == before
    assert status(pair, "a2")["disk"]["state"] == "UpToDate"
    for node, text in (("a1", ONE), ("a1", ANOTHER), ("a2", ONE)):
        assert text not in ha_log(pair, node)
        assert text not in pair.run(node, "HAstatus --json").stdout


def test_same_secret_replicates_and_a_stranger_cannot(pair: Any) -> None:
    start_ha(pair, "a2", secret(pair, "a2", SHARED))
    before = digest(pair, "a2")
    done = pair.run("a1", [sys.executable, "-c", STRANGER], check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "challenge"
    assert "'type': 'refuse'" in lines[1] and "shared secret" in lines[1]
    assert lines[2].startswith("data connection closed")
    assert digest(pair, "a2") == before
    start_ha(pair, "a1", secret(pair, "a1", SHARED))
    wait_status(pair, "a1", in_sync, timeout=30)
    assert SHARED not in ha_log(pair, "a1")


def test_configure_ha_never_changes_the_secret_of_a_running_pair(pair: Any) -> None:
    """A new secret on one appliance only would make the other reject its heartbeats and take over;
    a secret file gone missing must not stop the primary's heartbeats either."""
    start_ha(pair, "a2", secret(pair, "a2", SHARED))
    start_ha(pair, "a1", secret(pair, "a1", SHARED))
    wait_status(pair, "a1", in_sync, timeout=30)
    settings = (pair.home("a1") / "ha.json").read_text()
    new = pair.home("a1") / "new-secret"
    new.write_text(ANOTHER)
    done = pair.run("a1", f"configureHA --secret-file {new}", timeout=60)
    assert done.returncode == 3, done.stderr
    assert "cannot change the shared secret of a running pair" in done.stderr
    assert "stopHA on both appliances, then startHA with the new --secret-file" in done.stderr
    done = pair.run("a1", f"configureHA --secret-file {pair.home('a1') / 'missing'} --witness-ip 198.18.0.100",
                    timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr
    assert (pair.home("a1") / "ha.json").read_text() == settings
    s1, s2 = status(pair, "a1"), status(pair, "a2")
    assert s1["mode"] == "primary" and s1["peer_connected"] and s1["witness_ok"] is None
    assert s2["mode"] == "secondary" and s2["disk"]["state"] == "UpToDate"
    assert ANOTHER not in ha_log(pair, "a1")
