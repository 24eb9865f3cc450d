"""Fencing state machine of the C server, without FUSE or a peer.

The server is created but never started (no mount, no root needed): only the
control calls and their return codes are exercised here; the I/O behaviour is
in tests/lab/test_datapath_local.py.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.errors import NativeError
from mirrord.replication import native as n
from mirrord.replication.native import PrimaryServer, ServerStats

MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrimaryServer]:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    s = PrimaryServer(str(disk), str(tmp_path / "dev"))
    try:
        yield s
    finally:
        s.close()


def test_new_server_is_not_fenced(server: PrimaryServer) -> None:
    st = server.stats()
    assert not st.suspended and not st.failed_io and st.held == 0
    assert isinstance(st.suspended, bool) and isinstance(st.failed_io, bool)
    assert {"suspended", "failed_io", "held"} <= st.as_dict().keys()


def test_resume_degraded_when_not_suspended_is_a_noop(server: PrimaryServer) -> None:
    server.set_fencing(True)
    server.resume(degraded=True)
    server.resume(degraded=True)
    st = server.stats()
    assert not st.suspended and not st.failed_io and st.held == 0
    server.set_fencing(False)


def test_resume_fail_steps_down_for_good(server: PrimaryServer) -> None:
    server.resume(degraded=False)
    st = server.stats()
    assert st.failed_io and not st.suspended and st.held == 0
    server.resume(degraded=False)  # idempotent
    with pytest.raises(NativeError) as ei:
        server.resume(degraded=True)
    assert ei.value.code == n.E_STATE  # type: ignore[attr-defined]
    a, b = socket.socketpair()
    try:
        with pytest.raises(NativeError) as ei:
            server.attach_peer(a.detach())  # the fd is taken even on failure
        assert ei.value.code == n.E_STATE  # type: ignore[attr-defined]
    finally:
        b.close()
    assert server.stats().failed_io


def test_bad_resume_mode_is_einval(server: PrimaryServer) -> None:
    assert n.lib.mrd_server_resume(server._ptr(), 0) == -errno.EINVAL
    assert n.lib.mrd_server_resume(server._ptr(), 3) == -errno.EINVAL
    assert n.lib.mrd_server_resume(n.ffi.NULL, n.RESUME_DEGRADED) == -errno.EINVAL
    assert n.lib.mrd_server_set_fencing(n.ffi.NULL, 1) == -errno.EINVAL


def test_stats_defaults_keep_older_constructors_working() -> None:
    names = [f for f in ServerStats.__dataclass_fields__]
    assert names[-7:] == ["suspended", "failed_io", "held", "bytes_zeroed", "verify_diff_bytes", "verifying",
                          "bytes_verified"]
    assert n.RESUME_DEGRADED == 1 and n.RESUME_FAIL == 2


def _wait(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    import time
    end = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.005)


def test_release_after_a_resync_needs_the_link_that_caught_up(server: PrimaryServer) -> None:
    """The supervisor saw the resync finish and releases the held writes; if the link went again
    in between, releasing would acknowledge them from this disk alone with the secondary neither
    Outdated nor told. The release must refuse then, and hold on to them."""
    server.set_fencing(True)
    assert server.resume_caught_up(0)  # not suspended: nothing to release
    a, b = socket.socketpair()
    server.attach_peer(a.detach())
    b.close()  # the link goes: suspended
    _wait(lambda: server.stats().suspended, "the server suspended")
    assert server.stats().peer_failures == 1
    assert not server.resume_caught_up(0)  # the link of before: gone
    assert not server.resume_caught_up(1)  # no link at all now
    assert server.stats().suspended
    c, d = socket.socketpair()
    try:
        server.attach_peer(c.detach())  # a new link (its resync would run here)
        assert not server.resume_caught_up(0)  # still not the link whose resync was seen
        assert server.stats().suspended
        assert server.resume_caught_up(1)  # this link, still up: released
        st = server.stats()
        assert not st.suspended and st.peer_connected
    finally:
        server.detach_peer()
        d.close()
    server.resume(degraded=False)
    with pytest.raises(NativeError) as ei:
        server.resume_caught_up(1)
    assert ei.value.code == n.E_STATE  # type: ignore[attr-defined]

