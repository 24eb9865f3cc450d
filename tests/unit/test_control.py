import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirrord.control import ControlClient, ControlServer
from mirrord.errors import BadInput, DaemonNotRunning, MirrordError, Refused
from mirrord.paths import Home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def test_round_trip_and_typed_errors(home: Home) -> None:
    def handler(command: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if command == "echo":
            return "echoed", args
        if command == "refuse":
            raise Refused("not now")
        if command == "crash":
            raise RuntimeError("boom")
        raise BadInput("unknown")

    server = ControlServer(home, handler)
    server.start()
    try:
        client = ControlClient(home, timeout=5)
        assert client.call("echo", a=1) == ("echoed", {"a": 1})
        with pytest.raises(Refused, match="not now") as info:
            client.call("refuse")
        assert info.value.exit_code == 3
        with pytest.raises(BadInput):
            client.call("other")
        with pytest.raises(MirrordError, match="Internal error.*boom"):
            client.call("crash")
        mode = os.stat(home.control_socket).st_mode & 0o777
        assert mode == 0o600
        assert os.stat(home.run_dir).st_mode & 0o777 == 0o700
        with pytest.raises(Refused, match="already serves"):
            ControlServer(home, handler)
    finally:
        server.stop()
    assert not home.control_socket.exists()


def test_no_daemon(home: Home) -> None:
    with pytest.raises(DaemonNotRunning, match="no mirrord daemon answers"):
        ControlClient(home).call("status")


def run_cli(home: Home, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MIRRORD_HOME=str(home.root))
    return subprocess.run([sys.executable, "-m", "mirrord_cli", *argv], capture_output=True, text=True, env=env,
                          timeout=60)


def test_hastatus_without_daemon_exits_3_and_logs(home: Home) -> None:
    done = run_cli(home, "ha-status", "--json")
    assert done.returncode == 3
    assert "no mirrord daemon answers" in done.stderr
    result = json.loads((home.log_dir / "ha.result").read_text())
    assert result["command"] == "HAstatus" and result["exit_code"] == 3 and result["outcome"] == "refused"
    log = (home.log_dir / "ha.log").read_text()
    assert "HAstatus exit 3" in log


def test_starthA_bad_input_changes_nothing(home: Home, tmp_path: Path) -> None:
    done = run_cli(home, "start-ha", "-primaryIP", "198.18.0.11", "-secondaryIP", "198.18.0.12",
                   "-primarySyncIP", "198.19.0.1", "-secondarySyncIP", "198.19.0.2",
                   "-floatingIP", "198.18.7.10/24", "-pingInterval", "1", "-disk", str(tmp_path / "d.img"))
    assert done.returncode == 2, done.stderr
    assert "outside the public subnet" in done.stderr
    assert not home.control_socket.exists()
    assert not home.settings_file.exists()
    result = json.loads((home.log_dir / "ha.result").read_text())
    assert result == result | {"command": "startHA", "exit_code": 2, "outcome": "bad input"}


def test_commands_without_daemon(home: Home) -> None:
    for argv in (["stop-ha"], ["fail-over"], ["configure-ha", "--ping-interval", "2"]):
        done = run_cli(home, *argv)
        assert done.returncode == 3, (argv, done.stderr)
        assert "HA is not running on this appliance" in done.stderr
