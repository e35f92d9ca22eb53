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
