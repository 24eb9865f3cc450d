"""The status endpoint: every path, every mode, GET and HEAD, over a real socket on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
from typing import Any, Callable, Iterator

import pytest

from mirrord.errors import MirrordError
from mirrord.httpstatus import MODES, StatusServer, metrics_text


def status_of(mode: str, **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "mode": mode, "role": "primary", "serving": mode == "primary", "peer_connected": True,
        "floating_ip_held": mode == "primary",
        "disk": {"state": "UpToDate", "sync_percent": 100.0, "path": "/d"},
        "replication": {"writes": 10, "bytes_sent": 4096, "lag_seconds": 0.25, "state": "Connected"},
        "heartbeat": {"sync": {"silent_for": 0.5}, "public": {"silent_for": None}},
        "settings": {"secret_file": "/etc/mirrord/secret", "disk": "/d"},
        "secret": "hunter2",
        "summary": f"Mode {mode}.",
    }
    s.update(extra)
    return s


class Holder:
    def __init__(self) -> None:
        self.status: Callable[[], dict[str, Any]] = lambda: status_of("standalone")

    def __call__(self) -> dict[str, Any]:
        return self.status()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[StatusServer, Holder]]:
    holder = Holder()
    srv = StatusServer("127.0.0.1", 0, holder)
    srv.start()
    try:
        yield srv, holder
    finally:
        srv.stop()


def request(srv: StatusServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


EXPECTED = {  # mode -> (/primary, /secondary, /health)
    "standalone": (503, 503, 200),
    "primary": (200, 503, 200),
    "secondary": (503, 200, 200),
    "idle": (503, 503, 200),
    "inconsistent": (503, 503, 503),
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("mode", MODES)
def test_checks_for_every_mode(server: tuple[StatusServer, Holder], mode: str, method: str) -> None:
    srv, holder = server
    holder.status = lambda: status_of(mode)
    for path, code in zip(("/primary", "/secondary", "/health"), EXPECTED[mode]):
        status, headers, body = request(srv, method, path)
        assert status == code, (mode, path)
        assert headers["content-type"] == "application/json"
        length = int(headers["content-length"])
        if method == "HEAD":
            assert body == b"" and length > 0
        else:
            assert len(body) == length
            doc = json.loads(body)
            assert doc["ok"] is (code == 200) and doc["mode"] == mode
            assert "secret" not in body.decode() and "hunter2" not in body.decode()
            assert "settings" not in doc and "replication" not in doc


def test_primary_not_serving_is_503(server: tuple[StatusServer, Holder]) -> None:
    srv, holder = server
    for serving in (False, None, "yes"):
        holder.status = lambda: status_of("primary", serving=serving)
        assert request(srv, "GET", "/primary")[0] == 503
    holder.status = lambda: {k: v for k, v in status_of("primary").items() if k != "serving"}
    assert request(srv, "GET", "/primary")[0] == 503


@pytest.mark.parametrize("state", ["Inconsistent", "Outdated", None])
def test_secondary_needs_uptodate_disk(server: tuple[StatusServer, Holder], state: str | None) -> None:
    srv, holder = server
    holder.status = lambda: status_of("secondary", disk={"state": state, "sync_percent": 40.0})
    assert request(srv, "GET", "/secondary")[0] == 503
    assert request(srv, "GET", "/health")[0] == 200


def test_unknown_mode_is_unhealthy(server: tuple[StatusServer, Holder]) -> None:
    srv, holder = server
    holder.status = lambda: status_of("weird")
    assert request(srv, "GET", "/health")[0] == 503


def test_status_raising_is_503_everywhere(server: tuple[StatusServer, Holder]) -> None:
    srv, holder = server

    def broken() -> dict[str, Any]:
        raise ConnectionRefusedError("daemon gone")

    holder.status = broken
    for path in ("/primary", "/secondary", "/health", "/metrics"):
        for method in ("GET", "HEAD"):
            code, _, body = request(srv, method, path)
            assert code == 503
            if method == "GET":
                assert json.loads(body)["ok"] is False
    holder.status = lambda: ["not", "a", "dict"]  # type: ignore[assignment, return-value]
    assert request(srv, "GET", "/health")[0] == 503


def test_unknown_path_404(server: tuple[StatusServer, Holder]) -> None:
    srv, _ = server
    assert request(srv, "GET", "/nope")[0] == 404
    assert request(srv, "HEAD", "/")[0] == 404


def test_query_and_trailing_slash_ignored(server: tuple[StatusServer, Holder]) -> None:
    srv, holder = server
    holder.status = lambda: status_of("primary")
    assert request(srv, "GET", "/primary/?x=1")[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_other_methods_405(server: tuple[StatusServer, Holder], method: str) -> None:
    srv, _ = server
    code, headers, _ = request(srv, method, "/primary")
    assert code == 405 and headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_metrics_endpoint(server: tuple[StatusServer, Holder], method: str) -> None:
    srv, holder = server
    holder.status = lambda: status_of("secondary")
    code, headers, body = request(srv, method, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert (body == b"") is (method == "HEAD")


def test_metrics_text() -> None:
    text = metrics_text(status_of("primary"))
    lines = set(text.splitlines())
    for m in MODES:
        assert f'mirrord_mode{{mode="{m}"}} {1 if m == "primary" else 0}' in lines
    assert "mirrord_peer_connected 1" in lines
    assert "mirrord_floating_ip_held 1" in lines
    assert "mirrord_serving 1" in lines
    assert "mirrord_sync_percent 100" in lines
    assert 'mirrord_heartbeat_silence_seconds{network="sync"} 0.5' in lines
    assert 'mirrord_heartbeat_silence_seconds{network="public"} +Inf' in lines
    assert "mirrord_replication_writes 10" in lines
    assert "mirrord_replication_bytes_sent 4096" in lines
    assert "mirrord_replication_lag_seconds 0.25" in lines
    assert "mirrord_replication_state" not in text  # not numeric
    assert "# TYPE mirrord_mode gauge" in lines
    assert text.endswith("\n") and "secret" not in text


def test_metrics_out_of_sync_and_resynced_bytes() -> None:
    text = metrics_text({"mode": "primary", "replication": {"dirty_blocks": 3, "dirty_granularity": 4096,
                                                            "bytes_synced": 12345}})
    lines = set(text.splitlines())
    assert "mirrord_out_of_sync_bytes 12288" in lines and "mirrord_resync_bytes 12345" in lines
    bare = metrics_text({"mode": "secondary", "replication": {}})
    assert "mirrord_out_of_sync_bytes" not in bare and "mirrord_resync_bytes" not in bare


@pytest.mark.parametrize(("volumes", "total"), [
    ([{"name": "r0", "state": "UpToDate", "peer_connected": True, "sync_percent": 100.0, "out_of_sync_bytes": 0},
      {"name": "r1", "state": "UpToDate", "peer_connected": False, "sync_percent": 0.0, "out_of_sync_bytes": 8192}],
     "8192"),
    ([{"name": "r0", "state": "UpToDate", "peer_connected": True, "sync_percent": 100.0},  # a secondary: no bitmap
      {"name": "r1", "state": "Outdated", "peer_connected": True, "sync_percent": 50.5}], None),
])
def test_metrics_per_volume(volumes: list[dict[str, object]], total: str | None) -> None:
    text = metrics_text({"mode": "primary", "volumes": volumes,
                         "replication": {"dirty_blocks": 1, "dirty_granularity": 4096}})
    lines = set(text.splitlines())
    assert ("mirrord_out_of_sync_bytes " + (total or "4096")) in lines  # the sum, else r0's bitmap
    for v in volumes:
        name = v["name"]
        assert f'mirrord_volume_up_to_date{{volume="{name}"}} {1 if v["state"] == "UpToDate" else 0}' in lines
        assert f'mirrord_volume_peer_connected{{volume="{name}"}} {1 if v["peer_connected"] else 0}' in lines
    assert 'mirrord_volume_sync_percent{volume="r1"} ' + ("0" if total else "50.5") in lines
    one = metrics_text({"mode": "primary", "volumes": volumes[:1]})
    assert "mirrord_volume_" not in one  # a single volume is the pair-wide figures


def test_metrics_text_sparse_status() -> None:
    text = metrics_text({"mode": "idle", "replication": {"a-b": True, "nested": {"x": 2}, "secret_n": 3}})
    lines = set(text.splitlines())
    assert "mirrord_peer_connected 0" in lines and "mirrord_sync_percent NaN" in lines
    assert "mirrord_replication_a_b 1" in lines and "mirrord_replication_nested_x 2" in lines
    assert "secret" not in text and "heartbeat" not in text


def test_start_twice_and_port_in_use() -> None:
    a = StatusServer("127.0.0.1", 0, lambda: status_of("idle"))
    with a:
        a.start()  # idempotent
        b = StatusServer("127.0.0.1", a.port, lambda: {})
        with pytest.raises(MirrordError, match="Cannot serve"):
            b.start()
    a.stop()  # idempotent
