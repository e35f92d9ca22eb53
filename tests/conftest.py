"""Test-wide settings: the run index (mmtk.train.run_folders) goes to a temporary folder, not the user's home."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config) -> None:
    # Set before test modules import (some copy os.environ for their subprocesses at import time).
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mmtk-test-state-")


@pytest.fixture(autouse=True, scope="module")
def _registries_per_test_file():
    """What a test file's plugins register (modalities, task families, layouts, schedules, weights formats) is gone
    after the file, so no test depends on the order files run in."""
    import mmtk.plugins as plugins
    from mmtk import modality, task
    from mmtk.data.sources import folders
    from mmtk.train import schedules
    from mmtk.weights import sources

    plugins.load_adapters()  # mmtk's own entries are registered before the snapshot
    folders.list_layouts()
    saved = [(registry, registry.copy()) for registry in (
        modality._REGISTRY, modality._ORIGINS, task._FAMILIES, folders._LAYOUTS, folders._ORIGINS,
        plugins._REGISTERED_BY, sources._FORMATS, schedules._SCHEDULES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before) if isinstance(registry, dict) else registry.extend(before)
