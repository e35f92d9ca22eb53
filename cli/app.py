"""The Typer app every command module adds its commands to, and the options they share."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mmtk",
    help="Multi-modal masked autoencoders (MultiMAE) for RGB-D robotics data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PLUGIN_HELP = "A Python file registering a modality adapter (repeatable); see README, Adapters."


def load_plugins(paths: list | None) -> None:
    """Register the modality adapters of ``--plugin`` files (every command that reads or builds modalities)."""
    if paths:
        from mmtk.modality import load_plugin

        for path in paths:
            load_plugin(path)
