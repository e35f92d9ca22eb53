"""The Typer app every command module adds its commands to, and the options they share."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup


def _usual_names(params: list[Any]) -> list[Any]:
    """Arguments named ``RECIPE``; flags without a ``<bool>`` type (nothing is typed after a flag)."""
    for param in params:
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
        elif getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class MmtkCommand(TyperCommand):
    """A command whose help reads as usual: flags without a ``<bool>`` type, arguments as ``RECIPE`` (required)
    and ``[OUT]`` (optional) in the usage line and the table (Typer writes ``{recipe}`` and ``[out]``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _usual_names(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class MmtkGroup(TyperGroup):
    """A command group whose options read as :class:`MmtkCommand`'s."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _usual_names(super().get_params(ctx))


class MmtkTyper(typer.Typer):
    """Typer whose groups and commands are :class:`MmtkGroup` and :class:`MmtkCommand` unless given others."""

    def __init__(self, *args: Any, cls: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, cls=cls or MmtkGroup, **kwargs)

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or MmtkCommand, **kwargs)


app = MmtkTyper(
    name="mmtk",
    help="Multi-modal masked autoencoders (MultiMAE) for RGB-D robotics data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEVICE_HELP = "auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N."
def _print_version(asked: bool) -> None:
    if asked:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        import mmtk

        try:
            torch = version("torch")  # read from its metadata: importing torch would take seconds
        except PackageNotFoundError:
            torch = "not installed"
        typer.echo(f"mmtk {mmtk.__version__} (torch {torch}, python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _main_options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                               help="Print the versions of mmtk, torch and Python, and exit.")
                  ) -> None:
    """Multi-modal masked autoencoders (MultiMAE) for RGB-D robotics data."""


PLUGIN_HELP = ("A Python file registering modality adapters, task families or source layouts (repeatable); see "
               "README, Adapters, Task families and Source layouts.")


def load_plugins(paths: list | None) -> None:
    """Register the modality adapters of ``--plugin`` files (every command that reads or builds modalities)."""
    if paths:
        from mmtk.plugins import load_plugin

        for path in paths:
            load_plugin(path)


def bundled_options(param: str, options: dict[str, Any], flags: type,
                    then: Callable[[Any], None] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: give a command the options ``options`` (parameter name -> its ``Annotated`` declaration), declared
    once for every command that shares them; the command receives their values as one parameter ``param``, an
    instance of the dataclass ``flags`` (whose fields give the defaults), after ``then(flags)`` when given. In
    --help the command's arguments come first, then these options, then its own."""
    fields = {field.name: field for field in dataclasses.fields(flags)}
    defaults = {name: field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
                for name, field in fields.items()}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != param]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=declared,
                                   default=defaults[name]) for name, declared in options.items()]

        @functools.wraps(command)
        def with_bundle(**values: Any) -> Any:
            bundled = flags(**{name: values.pop(name) for name in options})
            if then is not None:
                then(bundled)
            return command(**values, **{param: bundled})

        arguments = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
        parameters = arguments + added + [p for p in own if p not in arguments]
        with_bundle.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_bundle.__annotations__ = {p.name: p.annotation for p in parameters}
        del with_bundle.__wrapped__  # typer reads the signature above, not the command's
        return with_bundle

    return decorate
