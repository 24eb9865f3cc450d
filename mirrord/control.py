"""The control socket: how HA commands reach the local daemon.

One JSON object per line each way over a Unix stream socket at
``$MIRRORD_HOME/run/control.sock``. The socket is mode 0600 in a 0700
directory, and the server also checks the caller's uid (SO_PEERCRED), so only
root (or the daemon's own user) can drive the appliance.

Request:  ``{"command": "start_ha", "args": {...}}``
Reply:    ``{"ok": true, "message": "...", "data": {...}}`` or
          ``{"ok": false, "error": "Refused", "exit_code": 3, "message": "..."}``
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from typing import Any, Callable

from mirrord import errors
from mirrord.errors import DaemonNotRunning, MirrordError
from mirrord.paths import Home

Handler = Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]]
MAX_REQUEST = 1 << 20


class ControlServer:
    """Serves requests on a thread per connection; ``handler`` returns (message, data) or raises."""

    def __init__(self, home: Home, handler: Handler) -> None:
        self.home = home
        self.handler = handler
        path = home.control_socket
        home.ensure()
        if path.exists():
            if _answers(path):
                raise errors.Refused(f"Another mirrord daemon already serves {path}; stop it first.")
            path.unlink()
        outer = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer._serve_one(self.connection, self.rfile, self.wfile)

        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(path), _Request)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            self.home.control_socket.unlink()
        except FileNotFoundError:
            pass

    def _serve_one(self, conn: socket.socket, rfile: Any, wfile: Any) -> None:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, os.getuid()):
            reply: dict[str, Any] = {"ok": False, "error": "Refused", "exit_code": 3,
                                     "message": "Only root may control mirrord."}
        else:
            line = rfile.readline(MAX_REQUEST)
            if not line:  # a liveness probe: connected and left
                return
            try:
                request = json.loads(line)
                message, data = self.handler(str(request["command"]), dict(request.get("args") or {}))
                reply = {"ok": True, "message": message, "data": data}
            except MirrordError as exc:
                reply = {"ok": False, "error": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": "BadInput", "exit_code": 2, "message": f"Malformed control request: {exc}"}
            except Exception as exc:  # the daemon must outlive a bug in one request
                reply = {"ok": False, "error": "MirrordError", "exit_code": 1,
                         "message": f"Internal error in the daemon ({type(exc).__name__}: {exc}); see ha.log."}
        try:
            wfile.write((json.dumps(reply) + "\n").encode())
            wfile.flush()
        except OSError:
            pass  # the client gave up waiting; the daemon has logged what it did


def _answers(path: os.PathLike[str]) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlClient:
    def __init__(self, home: Home, timeout: float = 300.0) -> None:
        self.home = home
        self.timeout = timeout

    def daemon_running(self) -> bool:
        return _answers(self.home.control_socket)

    def call(self, command: str, **args: Any) -> tuple[str, dict[str, Any]]:
        path = self.home.control_socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonNotRunning(
                    f"HA is not running on this appliance: no mirrord daemon answers on {path}. "
                    "Start it with startHA (or `mirrord daemon`)."
                ) from None
            except PermissionError:
                raise errors.Refused(f"Permission denied on {path}: HA commands must be run as root.") from None
            s.sendall((json.dumps({"command": command, "args": args}) + "\n").encode())
            with s.makefile("rb") as f:
                line = f.readline(MAX_REQUEST)
        except socket.timeout:
            raise MirrordError(f"The daemon did not answer {command} within {self.timeout:g} s; see ha.log.") from None
        finally:
            s.close()
        if not line:
            raise MirrordError(f"The daemon closed the connection during {command}; see ha.log.")
        reply = json.loads(line)
        if reply.get("ok"):
            return str(reply.get("message", "")), dict(reply.get("data") or {})
        cls = getattr(errors, str(reply.get("error")), None)
        if not (isinstance(cls, type) and issubclass(cls, MirrordError)):
            cls = MirrordError
        exc = cls(reply.get("message", "unknown error"))
        exc.exit_code = int(reply.get("exit_code", cls.exit_code))
        raise exc
