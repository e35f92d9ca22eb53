"""`python -m mmtk ...` is the `mmtk` command."""

from mmtk.cli.main import main

main()
