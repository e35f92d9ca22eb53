"""The shipped training recipes (YAML package data, installed as ``mmtk.recipes``; `mmtk recipes` lists them)."""
