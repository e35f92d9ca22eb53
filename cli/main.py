"""Entry point of the `mmtk` command: one Typer app, one module per command group."""

from __future__ import annotations

import signal
import sys
import threading

import typer

from mmtk.cli.app import app
from mmtk.errors import CorruptCheckpoint, MmtkError


def _register_commands() -> None:
    # Each module adds its commands to `app`; imports stay inside so `mmtk --help` is fast.
    from mmtk.cli import model_cmds  # noqa: F401
    from mmtk.cli import data_cmds  # noqa: F401
    from mmtk.cli import recipe_cmds  # noqa: F401
    from mmtk.cli import robot_cmds  # noqa: F401
    from mmtk.cli import train_cmds  # noqa: F401


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (kill, a job scheduler's time limit) unwinds like Ctrl-C, so open writes remove their
    # temporary files; a SIGKILL cannot be caught: the next write into that folder removes them.
    sys.exit(128 + signum)


def _instead_of_corrupt(path: object) -> str:
    """The fix for a corrupt checkpoint: the older intact one of the same run, when there is one."""
    from mmtk.train.checkpoint import older_intact

    older = older_intact(path) if path is not None else None
    if older is None:
        return "copy it again from where it came from (no older intact checkpoint lies beside it)"
    return f"use the older intact {older} instead (pass that file), or copy the damaged one again"


def main() -> None:
    """Run the CLI; user errors, full disks and missing permissions become one line on stderr and exit status 2."""
    from mmtk.io import disk_error

    _register_commands()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except CorruptCheckpoint as err:
        typer.echo(f"error: {err}; {_instead_of_corrupt(err.path)}", err=True)
        sys.exit(2)
    except MmtkError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Exception as err:  # a disk or permission error no command translated itself
        translated = disk_error(err, getattr(err, "filename", None))
        if translated is None:
            raise
        typer.echo(f"error: {translated}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
