"""Patroni-style HTTP health endpoint, for load balancers and monitoring.

Read-only: ``GET`` and ``HEAD`` only, any other method gets 405.

=============  ==================================================================
path           200 when ... (else 503)
=============  ==================================================================
``/primary``   mode is ``primary`` and ``serving`` is True: this appliance is the
               one clients must reach (HAProxy ``option httpchk GET /primary``)
``/secondary`` mode is ``secondary`` and the disk is ``UpToDate``: a replica that
               could take over right now
``/health``    the daemon answers and its mode is one of standalone, primary,
               secondary or idle. ``inconsistent`` is 503: that appliance holds
               a half-synced disk and needs an operator or a finished resync.
``/metrics``   Prometheus text exposition (503 when the daemon does not answer)
=============  ==================================================================

Any other path is 404. If ``status()`` raises, every path above is 503.
Bodies of ``/primary``, ``/secondary`` and ``/health`` are a short JSON object
(the check, its verdict and the main status fields); no key containing
"secret" is ever shown.

``status()`` is the daemon's status dict (``HAstatus --json``) plus, read here
when present: ``serving`` (bool), ``heartbeat`` (network -> {"silent_for":
seconds or None for never}, as ``Heartbeat.snapshot()`` gives) and
``replication`` (numeric counters).
"""

from __future__ import annotations

import json
import math
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from mirrord.errors import MirrordError
from mirrord.trace import without_secrets

MODES = ("standalone", "primary", "secondary", "idle", "inconsistent")
HEALTHY_MODES = frozenset(MODES) - {"inconsistent"}
# Fields copied into the JSON bodies; the full status stays on the control socket.
BODY_FIELDS = ("mode", "role", "serving", "peer_connected", "floating_ip_held", "disk", "summary")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A client that connects and says nothing must not hold a handler thread for ever.
REQUEST_TIMEOUT = 5.0

Status = Callable[[], dict[str, Any]]


# -- verdicts (pure) --------------------------------------------------------------


def is_serving_primary(s: dict[str, Any]) -> bool:
    return s.get("mode") == "primary" and s.get("serving") is True


def is_ready_secondary(s: dict[str, Any]) -> bool:
    disk = s.get("disk") or {}
    return s.get("mode") == "secondary" and isinstance(disk, dict) and disk.get("state") == "UpToDate"


def is_healthy(s: dict[str, Any]) -> bool:
    return s.get("mode") in HEALTHY_MODES


CHECKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "/primary": is_serving_primary,
    "/secondary": is_ready_secondary,
    "/health": is_healthy,
}


def body_for(check: str, ok: bool, s: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"check": check.lstrip("/"), "ok": ok}
    body.update({k: s[k] for k in BODY_FIELDS if k in s})
    return without_secrets(body)


# -- metrics (pure) ---------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _metric_name(key: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()
    return name or "unnamed"


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for k, v in value.items():
            if "secret" in str(k).lower():
                continue
            yield from _flatten(f"{prefix}_{_metric_name(str(k))}", v)
    else:
        n = _number(value)
        if n is not None:
            yield prefix, n


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(s: dict[str, Any]) -> str:
    lines: list[str] = []

    def gauge(name: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{labels} {_fmt(v)}" for labels, v in samples)

    mode = s.get("mode")
    gauge("mirrord_mode", "Current mode of this appliance (1 for the current one).",
          [(f'{{mode="{m}"}}', 1.0 if mode == m else 0.0) for m in MODES])
    gauge("mirrord_serving", "1 when this appliance serves the application.",
          [("", 1.0 if s.get("serving") is True else 0.0)])
    gauge("mirrord_peer_connected", "1 when the replication link to the peer is up.",
          [("", 1.0 if s.get("peer_connected") is True else 0.0)])
    gauge("mirrord_floating_ip_held", "1 when this appliance holds the floating IP.",
          [("", 1.0 if s.get("floating_ip_held") is True else 0.0)])
    disk = s.get("disk") if isinstance(s.get("disk"), dict) else {}
    pct = _number(disk.get("sync_percent"))
    gauge("mirrord_sync_percent", "How much of the disk the secondary has (percent).",
          [("", pct if pct is not None else math.nan)])
    heartbeat = s.get("heartbeat") if isinstance(s.get("heartbeat"), dict) else {}
    silences: list[tuple[str, float]] = []
    for network, info in sorted(heartbeat.items()):
        raw = info.get("silent_for") if isinstance(info, dict) else info
        value = _number(raw)
        silences.append((f'{{network="{_label(str(network))}"}}', math.inf if value is None else value))
    if silences:
        gauge("mirrord_heartbeat_silence_seconds",
              "Seconds since the peer's last valid heartbeat on each network (+Inf: never heard).", silences)
    replication = s.get("replication") if isinstance(s.get("replication"), dict) else {}
    volumes = [v for v in s.get("volumes") or [] if isinstance(v, dict)] if isinstance(s.get("volumes"), list) else []
    per_volume = [_number(v.get("out_of_sync_bytes")) for v in volumes]
    blocks, granularity = _number(replication.get("dirty_blocks")), _number(replication.get("dirty_granularity"))
    if len(volumes) > 1 and None not in per_volume:  # the primary of several volumes: all of them
        gauge("mirrord_out_of_sync_bytes", "Bytes the peer lacks (the dirty bitmap): what a resync will send.",
              [("", float(sum(v for v in per_volume if v is not None)))])
    elif blocks is not None and granularity is not None:
        gauge("mirrord_out_of_sync_bytes", "Bytes the peer lacks (the dirty bitmap): what a resync will send.",
              [("", blocks * granularity)])
    if len(volumes) > 1:
        def label(v: dict[str, Any]) -> str:
            return f'{{volume="{_label(str(v.get("name")))}"}}'
        gauge("mirrord_volume_up_to_date", "1 when this volume's disk is UpToDate here.",
              [(label(v), 1.0 if v.get("state") == "UpToDate" else 0.0) for v in volumes])
        gauge("mirrord_volume_peer_connected", "1 when this volume's replication link is up.",
              [(label(v), 1.0 if v.get("peer_connected") is True else 0.0) for v in volumes])
        gauge("mirrord_volume_sync_percent", "How much of this volume the secondary has (percent).",
              [(label(v), pct if (pct := _number(v.get("sync_percent"))) is not None else math.nan) for v in volumes])
    synced = _number(replication.get("bytes_synced"))
    if synced is not None:
        gauge("mirrord_resync_bytes", "Bytes the current or last sync has brought to the peer.", [("", synced)])
    for name, value in sorted(dict(_flatten("mirrord_replication", replication)).items()):
        gauge(name, "Replication counter reported by the data path.", [("", value)])
    return "\n".join(lines) + "\n"


# -- the server -------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    timeout = REQUEST_TIMEOUT
    server_version = "mirrord"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler looks up do_<METHOD>; every method we do not
        # serve is "not allowed" (405), not "not implemented" (501).
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        # Its request body (if any) is never read, so the connection cannot be reused.
        self.close_connection = True
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b'{"error": "read-only: GET or HEAD"}\n',
                   "application/json", True, extra={"Allow": "GET, HEAD", "Connection": "close"})

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path not in CHECKS and path != "/metrics":
            self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}\n', "application/json", send_body)
            return
        try:
            s = self.server.status()
            if not isinstance(s, dict):
                raise TypeError(f"status() returned {type(s).__name__}")
        except Exception as exc:  # noqa: BLE001 - any failure to get a status means "not available"
            body = json.dumps({"ok": False, "error": f"status unavailable ({type(exc).__name__})"}) + "\n"
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, body.encode(), "application/json", send_body)
            return
        if path == "/metrics":
            self._send(HTTPStatus.OK, metrics_text(s).encode(), METRICS_CONTENT_TYPE, send_body)
            return
        ok = CHECKS[path](s)
        body = json.dumps(body_for(path, ok, s), sort_keys=True, default=str) + "\n"
        self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body.encode(),
                   "application/json", send_body)

    def _send(self, code: HTTPStatus, body: bytes, content_type: str, send_body: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # health checks every second or two would flood stderr; ha.log records state changes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], status: Status) -> None:
        self.status = status
        super().__init__(address, _Handler)


class StatusServer:
    """The status endpoint on ``address:port`` (port 0 picks a free one; see ``.port``)."""

    def __init__(self, address: str, port: int, status: Status) -> None:
        self.address = address
        self._port = port
        self._status = status
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = _Server((self.address, self._port), self._status)
        except OSError as exc:
            raise MirrordError(f"Cannot serve the status endpoint on {self.address}:{self._port}: "
                               f"{exc.strerror or exc}.") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="httpstatus", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever's loop (0.2 s poll) has ended
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "StatusServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
