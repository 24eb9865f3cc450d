"""``trace.zip``: the logs of both appliances in one file, for support.

Entries::

    <my-ip>_ha.log  <my-ip>_ha.out  <my-ip>_ha.result      from $MIRRORD_HOME/log/
    <peer-ip>_ha.log <peer-ip>_ha.out <peer-ip>_ha.result  shipped copies, from log/peer/
    status.json                                            when a status is given (secrets removed)
    MISSING.txt                                            which of the above did not exist, if any

The zip is written beside its destination under a temporary name, synced and
renamed, so a reader (or a crash) never sees half a trace. Nothing whose name
contains "secret" goes in, and keys containing "secret" are dropped from
status.json.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from mirrord.errors import MirrordError
from mirrord.paths import Home

LOG_NAMES = ("ha.log", "ha.out", "ha.result")
PEER_DIR = "peer"
TRACE_NAME = "trace.zip"


def without_secrets(value: Any) -> Any:
    """``value`` with every dict key containing "secret" (any case) dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if "secret" not in str(k).lower()}
    if isinstance(value, (list, tuple)):
        return [without_secrets(v) for v in value]
    return value


def peer_log_dir(home: Home) -> Path:
    return home.log_dir / PEER_DIR


def sources(home: Home, my_ip: str, peer_ip: str | None) -> list[tuple[str, Path]]:
    """(entry name, file) for every log a trace should hold."""
    wanted = [(f"{my_ip}_{name}", home.log_dir / name) for name in LOG_NAMES]
    if peer_ip:
        wanted += [(f"{peer_ip}_{name}", peer_log_dir(home) / f"{peer_ip}_{name}") for name in LOG_NAMES]
    return [(arc, path) for arc, path in wanted if "secret" not in arc.lower()]


def write_trace(home: Home, my_ip: str, peer_ip: str | None, dest: Path | None = None,
                status: dict[str, Any] | None = None) -> Path:
    """Write the trace zip (default ``$MIRRORD_HOME/log/trace.zip``) and return its path."""
    dest = Path(dest) if dest is not None else home.log_dir / TRACE_NAME
    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    missing: list[str] = []
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for arc, path in sources(home, my_ip, peer_ip):
                if not path.is_file():
                    missing.append(f"{arc}\t(expected at {path})")
                    continue
                try:
                    zf.write(path, arc)
                except FileNotFoundError:  # removed between the check and the copy
                    missing.append(f"{arc}\t(expected at {path})")
            if status is not None:
                zf.writestr("status.json", json.dumps(without_secrets(status), indent=2, sort_keys=True,
                                                      default=str) + "\n")
            if missing:
                zf.writestr("MISSING.txt", "These files did not exist when the trace was taken:\n"
                            + "".join(f"{m}\n" for m in missing))
        _fsync(tmp)
        os.rename(tmp, dest)
        _fsync(dest.parent, directory=True)
    except OSError as exc:
        _discard(tmp)
        raise MirrordError(f"Could not write {dest}: {exc.strerror or exc}. "
                           f"Check free space and permissions in {dest.parent}.") from exc
    except BaseException:
        _discard(tmp)
        raise
    return dest


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the directory itself is unusable: there is no temp file to leave behind


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
