"""``mirrord shell``: the HA administrator's restricted prompt (the appliance's SSH prompt, as on IWD).

It offers the HA commands, ``trace``, ``help`` and ``exit`` — nothing else: no shell escapes
(``!``), no pipes or redirections (a line is split with shlex and run as one argv, never through
a shell), no other program. Tab completes command names and their options; history is kept in
``$MIRRORD_HOME/shell_history``. ``-c LINE`` runs one line the same way (``ssh admin@appliance
HAstatus`` through sshd's ForceCommand; see docs/operations.md).
"""

from __future__ import annotations

import cmd
import os
import shlex
import socket
import subprocess
import sys
from typing import Any

import click

from mirrord.paths import Home

#: Shell command -> (``mirrord`` subcommand, one line of help).
COMMANDS: dict[str, tuple[str, str]] = {
    "startHA": ("start-ha", "Start high availability on this appliance."),
    "configureHA": ("configure-ha", "Change settings of a running pair (run it on both appliances)."),
    "stopHA": ("stop-ha", "Return this appliance to standalone mode."),
    "failOver": ("fail-over", "Switch roles gracefully: the secondary becomes primary."),
    "HAstatus": ("ha-status", "Show the mode of this appliance and the state of the mirror."),
    "trace": ("trace", "Write trace.zip with both appliances' HA logs."),
}
BUILTINS = {"help": "List the commands, or show one command's options: help startHA.", "exit": "Leave the shell."}
HISTORY_LENGTH = 1000


def options_of(name: str) -> list[str]:
    """The option spellings of a command (long and IWD forms), for completion."""
    from mirrord_cli.main import mirrord

    command = mirrord.commands[COMMANDS[name][0]]
    return sorted(opt for param in command.params if isinstance(param, click.Option) for opt in param.opts
                  if opt.startswith("-"))


def argv_for(line: str) -> list[str] | str:
    """The argv that runs ``line``, or the sentence refusing it (pure: nothing is run here)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"Cannot read that line: {exc}."
    if not words:
        return []
    name, args = words[0], words[1:]
    if name not in COMMANDS:
        return f"Not an HA command: {name!r}. Commands: {', '.join([*COMMANDS, *BUILTINS])}."
    return [sys.executable, "-m", "mirrord_cli.main", COMMANDS[name][0], *args]


class HAShell(cmd.Cmd):
    intro = "mirrord HA shell: startHA, configureHA, stopHA, failOver, HAstatus, trace, help, exit. Tab completes."

    def __init__(self, home: Home) -> None:
        super().__init__()
        self.home = home
        self.prompt = f"{socket.gethostname()} HA> "
        self.last_code = 0

    # Every line goes through onecmd -> default: there are no do_* handlers to escape to.
    def onecmd(self, line: str) -> bool:
        words = line.split()
        if not words:
            return False
        if words[0] in ("exit", "quit", "EOF"):
            return True
        if words[0] == "help":
            self.show_help(words[1:])
            return False
        self.run_line(line)
        return False

    def emptyline(self) -> bool:
        return False

    def run_line(self, line: str) -> int:
        argv = argv_for(line)
        if isinstance(argv, str):
            click.echo(argv, err=True)
            self.last_code = 2
        elif argv:
            try:
                self.last_code = subprocess.run(argv, env={**os.environ, "MIRRORD_HOME": str(self.home.root)}).returncode
            except KeyboardInterrupt:  # e.g. Ctrl-C ends HAstatus --watch; the shell goes on
                self.last_code = 130
        return self.last_code

    def show_help(self, topic: list[str]) -> None:
        if topic and topic[0] in COMMANDS:
            self.run_line(f"{topic[0]} --help")
            return
        if topic:
            click.echo(f"No help on {topic[0]!r}.", err=True)
        for name, (_, text) in COMMANDS.items():
            click.echo(f"  {name:<12} {text}")
        for name, text in BUILTINS.items():
            click.echo(f"  {name:<12} {text}")

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [name + " " for name in [*COMMANDS, *BUILTINS] if name.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        name = line.split()[0]
        if name == "help":
            return [n for n in COMMANDS if n.startswith(text)]
        if name not in COMMANDS:
            return []
        return [opt + " " for opt in options_of(name) if opt.startswith(text)]

    def complete(self, text: str, state: int) -> str | None:
        import readline

        line = readline.get_line_buffer()
        begidx = readline.get_begidx()
        # cmd.Cmd only sends the first word to completenames; everything else to completedefault.
        if not line[:begidx].strip():
            matches = self.completenames(text)
        else:
            matches = self.completedefault(text, line, begidx, readline.get_endidx())
        return matches[state] if state < len(matches) else None


def run_shell(home: Home, command: str | None) -> int:
    shell = HAShell(home)
    if command is not None:
        shell.onecmd(command)
        return shell.last_code
    history = home.root / "shell_history"
    try:
        import readline

        readline.set_completer_delims(" \t")
        readline.parse_and_bind("tab: complete")
        readline.set_history_length(HISTORY_LENGTH)
        if history.exists():
            readline.read_history_file(history)
    except (ImportError, OSError):
        readline = None  # type: ignore[assignment]
    try:
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, never a way out to a shell
                click.echo("^C")
                shell.intro = None
    finally:
        if readline is not None:
            home.ensure()
            readline.write_history_file(history)
    return 0
