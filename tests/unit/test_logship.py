"""Log shipping over 127.0.0.1: handshake, frames, tailing, reconnects, refusals."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from mirrord.errors import HandshakeRefused, MirrordError, PeerError
from mirrord.halog import HALog
from mirrord.logship import (
    Channel, LogReceiver, LogShipper, _StreamEnds, client_handshake, peer_file, server_handshake,
)
from mirrord.paths import Home

SECRET = b"shared-secret"
ME = "127.0.0.1"


def wait_until(pred: Callable[[], Any], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Home, Home]:
    a, b = Home(tmp_path / "a"), Home(tmp_path / "b")
    a.log_dir.mkdir(parents=True)
    b.log_dir.mkdir(parents=True)
    return a, b


def pair(a: Home, b: Home, ship_secret: bytes | None, recv_secret: bytes | None,
         peer_ip: str = ME) -> tuple[LogShipper, LogReceiver]:
    receiver = LogReceiver(b, (ME, 0), peer_ip, recv_secret)
    receiver.start()
    shipper = LogShipper(a, (ME, receiver.port), ME, ship_secret, poll=0.02)
    return shipper, receiver


# -- handshake and frames over a socketpair ------------------------------------------


def handshake(client_secret: bytes | None, server_secret: bytes | None) -> tuple[Any, Any]:
    c, s = socket.socketpair()
    c.settimeout(2)
    s.settimeout(2)
    out: dict[str, Any] = {}

    def server() -> None:
        try:
            out["s"] = server_handshake(s, server_secret)
        except Exception as exc:  # noqa: BLE001
            out["s"] = exc
        finally:
            if not isinstance(out.get("s"), Channel):
                s.close()

    t = threading.Thread(target=server)
    t.start()
    try:
        client: Any = client_handshake(c, client_secret)
    except Exception as exc:  # noqa: BLE001
        client = exc
        c.close()
    t.join(5)
    return client, out["s"]


@pytest.mark.parametrize("secret", [None, SECRET])
def test_handshake_and_frames(secret: bytes | None) -> None:
    client, server = handshake(secret, secret)
    assert isinstance(client, Channel) and isinstance(server, Channel)
    client.send_frame(b"L", b"hello")
    client.send_frame(b"K")
    assert server.recv_frame() == (b"L", b"hello")
    assert server.recv_frame() == (b"K", b"")
    server.send_frame(b"A", b"x" * 16)
    assert client.recv_frame() == (b"A", b"x" * 16)


@pytest.mark.parametrize("client_secret, server_secret, client_exc, server_exc", [
    (b"one", b"two", HandshakeRefused, HandshakeRefused),
    (None, SECRET, PeerError, HandshakeRefused),    # receiver hangs up on an unauthenticated shipper
    (SECRET, None, HandshakeRefused, type(None)),   # shipper will not ship to an unauthenticated receiver
])
def test_handshake_refusals(client_secret: bytes | None, server_secret: bytes | None,
                            client_exc: type, server_exc: type) -> None:
    client, server = handshake(client_secret, server_secret)
    assert isinstance(client, client_exc)
    if server_exc is not type(None):
        assert isinstance(server, server_exc)


def test_tampered_frame_is_refused() -> None:
    c, s = socket.socketpair()
    key = b"k" * 32
    sender, receiver = Channel(c, key), Channel(s, key)
    sender.send_frame(b"L", b"first")
    assert receiver.recv_frame() == (b"L", b"first")
    # a frame MAC'd for another position in the stream (a replay) fails
    replay = Channel(c, key)
    replay.send_frame(b"L", b"first")
    with pytest.raises(HandshakeRefused):
        receiver.recv_frame()
    c.close()
    s.close()


def test_oversized_frame_and_eof() -> None:
    c, s = socket.socketpair()
    c.sendall(b"L" + (2**31).to_bytes(4, "big"))
    with pytest.raises(PeerError, match="limit"):
        Channel(s, None).recv_frame()
    c.close()
    with pytest.raises(PeerError, match="closed"):
        Channel(s, None).recv_frame()
    s.close()


def test_stream_ends_drop_duplicates() -> None:
    ends = _StreamEnds()
    assert ends.fresh_part(1, 0, b"abc\n") == b"abc\n"
    assert ends.fresh_part(1, 0, b"abc\ndef\n") == b"def\n"  # resent after a lost ack
    assert ends.fresh_part(1, 4, b"def\n") == b""
    assert ends.fresh_part(2, 0, b"new\n") == b"new\n"  # a rotated file starts over
    assert ends.ends == {1: 8, 2: 4}


# -- end to end over 127.0.0.1 ---------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, None])
def test_appended_lines_are_shipped(homes: tuple[Home, Home], secret: bytes | None) -> None:
    a, b = homes
    (a.log_dir / "ha.log").write_text("written before the shipper started\n")
    log = HALog(a, "test")
    log.write_out("startHA output\n")
    log.write_result("startHA", 0, "done")
    shipper, receiver = pair(a, b, secret, secret)
    copy = peer_file(b, ME, "ha.log")
    with receiver, shipper:
        log.log("first line")
        log.log("second line")
        assert wait_until(lambda: read(copy).count(b"\n") == 2)
        text = read(copy).decode()
        assert "first line" in text and "second line" in text
        assert "before the shipper" not in text  # tailing starts where the file is
        assert wait_until(lambda: read(peer_file(b, ME, "ha.out")) == b"startHA output\n")
        assert wait_until(lambda: b'"startHA"' in read(peer_file(b, ME, "ha.result")))
        log.write_result("failOver", 3, "refused")
        assert wait_until(lambda: b'"failOver"' in read(peer_file(b, ME, "ha.result")))
        assert wait_until(lambda: shipper.counters.log_bytes_acked == len(read(copy)))
    assert shipper.counters.connections == 1 and receiver.counters.auth_failures == 0


def test_wrong_secret_ships_nothing(homes: tuple[Home, Home]) -> None:
    a, b = homes
    log = HALog(a, "test")
    log.write_out("out\n")
    shipper, receiver = pair(a, b, b"wrong", SECRET)
    with receiver, shipper:
        log.log("must not arrive")
        assert wait_until(lambda: shipper.counters.auth_failures >= 1 and receiver.counters.auth_failures >= 1)
        time.sleep(0.2)
    assert not (b.log_dir / "peer").exists() or not any((b.log_dir / "peer").iterdir())
    assert receiver.counters.log_bytes == 0


def test_only_the_peer_address_is_accepted(homes: tuple[Home, Home]) -> None:
    a, b = homes
    shipper, receiver = pair(a, b, None, None, peer_ip="127.0.0.2")
    with receiver, shipper:
        HALog(a).log("from the wrong address")
        assert wait_until(lambda: receiver.counters.refused >= 1)
    assert receiver.counters.accepted == 0 and not (b.log_dir / "peer").exists()


def test_backlog_is_shipped_after_reconnect(homes: tuple[Home, Home]) -> None:
    a, b = homes
    log = HALog(a)
    copy = peer_file(b, ME, "ha.log")
    with LogReceiver(b, (ME, 0), ME, SECRET) as first, \
            LogShipper(a, (ME, first.port), ME, SECRET, poll=0.02) as shipper:
        log.log("one")
        assert wait_until(lambda: b"one" in read(copy))
        first.stop()
        log.log("two, while the receiver is down")
        time.sleep(0.1)
        with LogReceiver(b, shipper.peer, ME, SECRET):  # the same port, where the shipper retries
            log.log("three")
            assert wait_until(lambda: b"three" in read(copy), timeout=8)
    lines = read(copy).decode().splitlines()
    assert [l.split(": ", 1)[1] for l in lines] == ["one", "two, while the receiver is down", "three"]


def test_replaced_log_is_shipped_from_its_start(homes: tuple[Home, Home]) -> None:
    a, b = homes
    path = a.log_dir / "ha.log"
    path.write_text("old\n")
    shipper, receiver = pair(a, b, None, None)
    copy = peer_file(b, ME, "ha.log")
    with receiver, shipper:
        with open(path, "a") as f:
            f.write("appended\n")
        assert wait_until(lambda: read(copy) == b"appended\n")
        tmp = a.log_dir / "new"
        tmp.write_text("rotated 1\n")
        os.rename(tmp, path)
        assert wait_until(lambda: read(copy) == b"appended\nrotated 1\n")


def test_half_line_waits_for_its_end(homes: tuple[Home, Home]) -> None:
    a, b = homes
    path = a.log_dir / "ha.log"
    path.write_text("")
    shipper, receiver = pair(a, b, None, None)
    copy = peer_file(b, ME, "ha.log")
    with receiver, shipper:
        with open(path, "a") as f:
            f.write("half")
            f.flush()
            time.sleep(0.2)
            assert read(copy) == b""
            f.write(" and whole\n")
        assert wait_until(lambda: read(copy) == b"half and whole\n")


def test_bind_in_use_is_mirrord_error(homes: tuple[Home, Home]) -> None:
    _, b = homes
    with LogReceiver(b, (ME, 0), ME, None) as first:
        with pytest.raises(MirrordError, match="Cannot receive"):
            LogReceiver(b, (ME, first.port), ME, None).start()


def test_stop_ends_every_thread_with_a_connected_shipper(homes: tuple[Home, Home]) -> None:
    a, b = homes
    before = set(threading.enumerate())
    shipper, receiver = pair(a, b, SECRET, SECRET)
    with receiver, shipper:
        assert wait_until(lambda: shipper.counters.connections == 1)
        started = set(threading.enumerate()) - before
        assert {t.name for t in started} == {"logship", "logreceive", "logreceive-conn"}
        receiver.stop()
        shipper.stop()
        # stop() gives up quietly when its join times out: a thread still alive here is one it did not wake.
        # The connection's handler is not joined: it ends once its socket is shut down.
        assert not [t.name for t in started if t.name != "logreceive-conn" and t.is_alive()]
        assert wait_until(lambda: not any(t.is_alive() for t in started))


def test_offset_of_last_finds_the_line_start(tmp_path: Path) -> None:
    from mirrord.halog import offset_of_last

    home = Home(tmp_path)
    home.log_dir.mkdir(parents=True)
    text = b"a: one\nb: Command: startHA x\nc: two\nd: Command: startHA y\ne: three\n"
    (home.log_dir / "ha.log").write_bytes(text)
    assert offset_of_last(home, b": Command: startHA") == text.index(b"\nd: ") + 1
    assert offset_of_last(home, b"missing") is None
    assert offset_of_last(Home(tmp_path / "none"), b"x") is None
