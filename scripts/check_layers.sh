#!/usr/bin/env bash
# The import layering (pyproject.toml, [tool.importlinter]) checked by import-linter on an installed copy of mmtk:
# installed, adapters/ and cli/ sit inside the mmtk package as they do for users (the editable install maps them).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip install -q --disable-pip-version-check --no-deps --no-compile --no-build-isolation --target "$tmp/site" "$repo" \
    >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$tmp/site" "$repo"
rm -rf "$repo/build"  # setuptools leaves its build folder in the source tree
cd "$tmp" && PYTHONPATH="$tmp/site" lint-imports --config "$repo/pyproject.toml"
