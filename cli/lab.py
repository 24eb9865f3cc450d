"""``mirrord lab …``: drive the two-appliance network-namespace lab.

A thin click layer over :mod:`mirrord.net.lab`; every failure there is a
``LabError``/``BadInput`` that is printed as one sentence on stderr, and the
process exits with the error's exit code (bad arguments: 2).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

import click

from mirrord.errors import BadInput, MirrordError
from mirrord.net import lab as labmod

F = TypeVar("F", bound=Callable[..., Any])

APPLIANCE = click.Choice(labmod.APPLIANCES)
NODE = click.Choice(labmod.NODES)
LINK = click.Choice(labmod.LINK_CHOICES)


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return labmod.parse_size(value)
        except BadInput as exc:
            self.fail(str(exc), param, ctx)


class _Name(click.ParamType):
    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return labmod.check_name(value)
        except BadInput as exc:
            self.fail(str(exc), param, ctx)


class LabGroup(click.Group):
    """Turns mirrord errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MirrordError as exc:
            click.echo(f"mirrord lab: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # the host refused something the library did not foresee
            click.echo(f"mirrord lab: {exc}", err=True)
            ctx.exit(1)


def name_option(func: F) -> F:
    return click.option("--name", type=_Name(), default=labmod.DEFAULT_NAME, show_default=True,
                        help="Lab name (prefix of its namespaces).")(func)


@click.group(cls=LabGroup)
def lab() -> None:
    """A two-appliance lab (a1, a2, client) in network namespaces on this machine."""


@lab.command()
@name_option
@click.option("--disk-size", type=_Size(), default="256M", show_default=True,
              help="Size of each appliance's sparse disk.img (K, M, G suffixes).")
def up(name: str, disk_size: int) -> None:
    """Build the lab, or repair a half-built one."""
    built = labmod.up(name, disk_size)
    click.echo(f"lab {name} is up: a1 198.18.0.11, a2 198.18.0.12, client 198.18.0.100; "
               f"data in {built.data_dir}")


@lab.command()
@name_option
def down(name: str) -> None:
    """Remove everything the lab made (idempotent)."""
    if labmod.down(name):
        click.echo(f"lab {name} removed")
    else:
        click.echo(f"lab {name} does not exist; nothing to do")


@lab.command("exec", context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@name_option
@click.argument("node", type=NODE)
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, node: str, argv: tuple[str, ...]) -> None:
    """Run CMD inside NODE (replaces this process; exit code passes through)."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    sys.stdout.flush()
    labmod.exec_in(name, node, argv)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
def crash(name: str, node: str) -> None:
    """Power loss: kill every process of NODE, drop its mounts, links down."""
    labmod.crash(name, node)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
def boot(name: str, node: str) -> None:
    """Power on NODE (a running node is reset first): base addresses only, no process."""
    labmod.boot(name, node)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
def freeze(name: str, node: str) -> None:
    """Stop NODE's processes (a hung machine; its kernel still answers)."""
    labmod.freeze(name, node)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
def thaw(name: str, node: str) -> None:
    """Resume NODE's processes."""
    labmod.thaw(name, node)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
@click.argument("link", type=LINK)
def cut(name: str, node: str, link: str) -> None:
    """Take NODE's sync|public|all link(s) down."""
    labmod.cut(name, node, link)


@lab.command()
@name_option
@click.argument("node", type=APPLIANCE)
@click.argument("link", type=LINK)
def heal(name: str, node: str, link: str) -> None:
    """Bring NODE's sync|public|all link(s) back up."""
    labmod.heal(name, node, link)


if __name__ == "__main__":
    lab()
