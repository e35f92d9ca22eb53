"""`mmtk recipes` (the shipped recipes, one line each) and `mmtk recipes show NAME` (one as YAML)."""

from __future__ import annotations

import typer

from mmtk.cli.app import MmtkTyper, app

recipes_app = MmtkTyper(help="The shipped training recipes: list them, or print one to start your own.",
                          no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes (use one by name: `mmtk pretrain tiny`)."""
    if ctx.invoked_subcommand is not None:
        return
    from mmtk.config import shipped_recipes

    found = shipped_recipes()
    width = max(map(len, found))
    for name, description in found.items():
        typer.echo(f"{name:<{width}}  {description}")
    typer.echo("use one by name (mmtk pretrain tiny --data FILE.h5); start your own with "
               "mmtk recipes show tiny > my.yaml, then mmtk pretrain my.yaml")


@recipes_app.command("show")
def show(name: str = typer.Argument(..., help="A shipped recipe's name, e.g. tiny.")) -> None:
    """Print a shipped recipe's YAML (redirect it into a file to start your own)."""
    from mmtk.config import shipped_recipe_text

    typer.echo(shipped_recipe_text(name), nl=False)
