"""mirrord shell: what a line becomes (pure), completion, and the command line's --help/completion texts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mirrord.paths import Home
from mirrord_cli.iwd import configure_ha, fail_over, ha_status, start_ha, stop_ha
from mirrord_cli.main import mirrord
from mirrord_cli.shell import HAShell, argv_for, options_of

BASE = [sys.executable, "-m", "mirrord_cli.main"]


@pytest.mark.parametrize(("line", "argv"), [
    ("HAstatus", [*BASE, "ha-status"]),
    ("HAstatus --json", [*BASE, "ha-status", "--json"]),
    ("startHA -primaryIP 198.18.0.11 --disk '/var/lib/my disk.img'",
     [*BASE, "start-ha", "-primaryIP", "198.18.0.11", "--disk", "/var/lib/my disk.img"]),
    ("stopHA", [*BASE, "stop-ha"]), ("failOver", [*BASE, "fail-over"]), ("trace", [*BASE, "trace"]),
    ("configureHA --ping-interval 2", [*BASE, "configure-ha", "--ping-interval", "2"]),
    ("HAstatus; rm -rf /", None),  # one word "HAstatus;": not a command
    ("", []), ("   ", []),
])
def test_lines_become_one_argv_never_a_shell(line: str, argv: list[str] | None) -> None:
    result = argv_for(line)
    if argv is None:
        assert isinstance(result, str) and "Not an HA command" in result
    else:
        assert result == argv


@pytest.mark.parametrize("line", ["ls", "!sh", "sh -c id", "bash", "python3", "mirrord daemon", "/bin/sh",
                                  "HAstatus;id", "`id`", "$(id)", "hastatus", "lab up"])
def test_everything_else_is_refused(line: str) -> None:
    result = argv_for(line)
    assert isinstance(result, str) and result.startswith("Not an HA command")


def test_an_unreadable_line() -> None:
    assert argv_for("HAstatus 'unclosed") == "Cannot read that line: No closing quotation."


def test_refused_lines_run_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shell = HAShell(Home(tmp_path))
    assert shell.onecmd("!id") is False and shell.last_code == 2
    assert "Not an HA command: '!id'" in capsys.readouterr().err
    assert shell.onecmd("exit") is True and shell.onecmd("EOF") is True


@pytest.mark.parametrize(("text", "names"), [
    ("", ["startHA ", "configureHA ", "stopHA ", "failOver ", "HAstatus ", "trace ", "help ", "exit "]),
    ("HA", ["HAstatus "]), ("st", ["startHA ", "stopHA "]), ("x", []), ("ls", []),
])
def test_command_names_complete(tmp_path: Path, text: str, names: list[str]) -> None:
    assert HAShell(Home(tmp_path)).completenames(text) == names


def test_options_complete(tmp_path: Path) -> None:
    shell = HAShell(Home(tmp_path))
    assert shell.completedefault("--float", "startHA --float", 8, 15) == ["--floating-ip "]
    assert shell.completedefault("-float", "startHA -float", 8, 14) == ["-floatingIP "]
    assert "--watch " in shell.completedefault("--", "HAstatus --", 9, 11)
    assert shell.completedefault("HA", "help HA", 5, 7) == ["HAstatus"]
    assert shell.completedefault("-", "ls -", 3, 4) == []
    assert "--ping-interval" in options_of("configureHA")


# -- the command line: man-style --help with examples, shell completion --------------------------

IWD = {"startHA": start_ha, "configureHA": configure_ha, "stopHA": stop_ha, "failOver": fail_over,
       "HAstatus": ha_status}


@pytest.mark.parametrize("name", [*IWD, "backup", "restore", "shell", "daemon", "completion"])
def test_help_has_examples(name: str) -> None:
    command = IWD.get(name) or mirrord.commands[name]
    result = CliRunner().invoke(command, ["--help"], prog_name=name)
    assert result.exit_code == 0, result.output
    examples = result.output.split("Example", 1)
    assert len(examples) == 2, f"{name} --help has no Examples section:\n{result.output}"
    assert examples[1].strip(), f"{name} --help: an empty Examples section"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script(shell: str) -> None:
    result = CliRunner().invoke(mirrord, ["completion", shell])
    assert result.exit_code == 0, result.output
    assert "_MIRRORD_COMPLETE" in result.output and len(result.output) > 200


def test_completion_of_an_unknown_shell_is_bad_input() -> None:
    result = CliRunner().invoke(mirrord, ["completion", "tcsh"])
    assert result.exit_code == 2


def test_completion_completes_subcommands_and_options() -> None:
    from click.shell_completion import ShellComplete

    completer = ShellComplete(mirrord, {}, "mirrord", "_MIRRORD_COMPLETE")
    assert [c.value for c in completer.get_completions([], "ha")] == ["ha-status"]
    assert [c.value for c in completer.get_completions(["start-ha"], "--fl")] == ["--floating-ip"]
