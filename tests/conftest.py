"""Test-wide settings: the run index (mmtk.train.run_folders) goes to a temporary folder, not the user's home."""

from __future__ import annotations

import os
import tempfile


def pytest_configure(config) -> None:
    # Set before test modules import (some copy os.environ for their subprocesses at import time).
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mmtk-test-state-")
