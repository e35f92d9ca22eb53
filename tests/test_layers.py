"""The layering holds: import-linter's contracts in pyproject.toml, on an installed copy (scripts/check_layers.sh)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_layers.sh"


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is a dev extra (setup.sh --dev)")
def test_import_contracts_are_kept():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
