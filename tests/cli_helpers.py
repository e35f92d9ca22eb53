"""Running `mmtk ...` in the tests."""

from __future__ import annotations

import sys


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `mmtk ARGS` through the real entry point (error handling included); (exit code, stdout, stderr)."""
    import mmtk.cli.main as cli_main

    monkeypatch.setattr(sys, "argv", ["mmtk", *map(str, args)])
    code = 0
    try:
        cli_main.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def invoke(*args) -> tuple[int, str]:
    """Run `mmtk ARGS` in-process with Typer's runner; (exit code, output). An MmtkError becomes exit 2 and an
    'error: ...' line, as the real entry point prints it; any other exception is raised."""
    from typer.testing import CliRunner

    from mmtk.cli.main import _register_commands, app
    from mmtk.errors import MmtkError

    _register_commands()
    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, MmtkError):
        return 2, result.output + f"error: {result.exception}\n"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output
