"""Entry point of the `mmtk` command: one Typer app, one module per command group."""

from __future__ import annotations

import sys

import typer

from mmtk.cli.app import app
from mmtk.errors import MmtkError


def _register_commands() -> None:
    # Each module adds its commands to `app`; imports stay inside so `mmtk --help` is fast.
    from mmtk.cli import model_cmds  # noqa: F401
    from mmtk.cli import data_cmds  # noqa: F401
    from mmtk.cli import recipe_cmds  # noqa: F401
    from mmtk.cli import robot_cmds  # noqa: F401
    from mmtk.cli import train_cmds  # noqa: F401


def main() -> None:
    """Run the CLI; user errors become one line on stderr and exit status 2."""
    _register_commands()
    try:
        app()
    except MmtkError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
