"""The IWD commands' front end: what reaches the daemon, and what a refused command line leaves behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from mirrord_cli import iwd


class Recorder:
    """Stands in for the control client: remembers the one call a command makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, command: str, **args: Any) -> tuple[str, dict[str, Any]]:
        self.calls.append((command, args))
        return "ok", {}


def test_relative_paths_reach_the_daemon_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = Recorder()

    def run(name: str, options: dict[str, Any], action: Callable[[Recorder], Any], **_: Any) -> None:
        action(client)

    monkeypatch.setattr(iwd, "run", run)
    done = CliRunner().invoke(iwd.configure_ha, ["--disk", "a.img", "--disk", "sub/../b.img", "--mount", "m1",
                                                 "--mount", "/abs/m2", "--secret-file", "key",
                                                 "-startScript", "app.sh", "--stop-script", "./app.sh"])
    assert done.exit_code == 0, done.output
    assert client.calls == [("configure_ha", {
        "disk": [str(tmp_path / "a.img"), str(tmp_path / "b.img")], "mount": [str(tmp_path / "m1"), "/abs/m2"],
        "secret_file": str(tmp_path / "key"), "start_script": str(tmp_path / "app.sh"),
        "stop_script": str(tmp_path / "app.sh")})]


@pytest.mark.parametrize(("command", "args", "name", "fragment"), [
    (iwd.configure_ha, ["--no-such-option", "1"], "configureHA", "--no-such-option"),
    (iwd.start_ha, ["--ping-interval"], "startHA", "requires an argument"),
    (iwd.stop_ha, ["extra"], "stopHA", "unexpected extra argument"),
    (iwd.ha_status, ["--count", "3"], "HAstatus", "--count and --until-synced go with --watch"),
])
def test_a_usage_error_leaves_the_three_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: Any,
                                              args: list[str], name: str, fragment: str) -> None:
    monkeypatch.setenv("MIRRORD_HOME", str(tmp_path))
    done = CliRunner().invoke(command, args)
    assert done.exit_code == 2
    result = json.loads((tmp_path / "log" / "ha.result").read_text())
    assert (result["command"], result["exit_code"], result["outcome"]) == (name, 2, "bad input")
    assert fragment in result["message"]
    log = (tmp_path / "log" / "ha.log").read_text()
    assert f"Command: {name} " in log and f"{name} exit 2: " in log
    assert " ".join(args) in log.splitlines()[0], "the command line is in ha.log"
    assert (tmp_path / "log" / "ha.out").read_text() == ""
