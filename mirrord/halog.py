"""The three IWD log files in ``$MIRRORD_HOME/log``.

* ``ha.log``: every activity of the daemon and of every HA command, one
  timestamped line each, appended (O_APPEND keeps lines from different
  processes whole).
* ``ha.out``: the standard output of the last HA command, replaced by each.
* ``ha.result``: the result of the last HA command (command, outcome, exit
  code, message) as JSON, replaced by each.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import dataclass

from mirrord import atomicfile
from mirrord.paths import Home


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class HALog:
    home: Home
    source: str = "mirrord"

    def log(self, sentence: str) -> None:
        self.home.log_dir.mkdir(parents=True, exist_ok=True)
        line = f"{timestamp()} {socket.gethostname()} {self.source}[{os.getpid()}]: {sentence}\n"
        fd = os.open(self.home.log_dir / "ha.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def write_out(self, text: str) -> None:
        self.home.log_dir.mkdir(parents=True, exist_ok=True)
        atomicfile.write_bytes(self.home.log_dir / "ha.out", text.encode())

    def write_result(self, command: str, exit_code: int, message: str) -> None:
        self.home.log_dir.mkdir(parents=True, exist_ok=True)
        outcome = {0: "succeeded", 2: "bad input", 3: "refused"}.get(exit_code, "failed")
        result = {"command": command, "outcome": outcome, "exit_code": exit_code, "message": message, "time": timestamp()}
        atomicfile.write_bytes(self.home.log_dir / "ha.result", (json.dumps(result) + "\n").encode())


def offset_of_last(home: Home, marker: bytes, window: int = 1 << 20) -> int | None:
    """Byte offset in ha.log of the start of the last line containing ``marker`` (within the last ``window``)."""
    path = home.log_dir / "ha.log"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            base = max(0, size - window)
            f.seek(base)
            data = f.read(window)
    except FileNotFoundError:
        return None
    hit = data.rfind(marker)
    if hit < 0:
        return None
    return base + data.rfind(b"\n", 0, hit) + 1
