"""The `mmtk` command line (Typer)."""
