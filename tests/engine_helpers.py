"""Shared pieces of the engine tests: a real sample file and tiny-model recipe overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke as run_cli  # noqa: F401  (the tests' way to run `mmtk ...`)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SAMPLES = REPO / "samples"
CLI = [sys.executable, "-c", "from mmtk.cli.main import main; main()"]
# Tiny models are dominated by per-op overhead: one thread is many times faster than two that compete
# with other test processes, and results do not depend on it.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A ViT of 2 blocks, width 64, on 64x64 crops: seconds per run on a CPU.
TINY = ["data.image_size=[64,64]", "model.overrides.dim=64", "model.overrides.depth=2",
        "model.overrides.num_heads=2", "model.overrides.decoder_dim=64", "model.overrides.decoder_depth=1",
        "train.log_every=1", "data.num_workers=0"]
TINY_SEMSEG = TINY + ["model.overrides.convnext_dim=64", "model.overrides.convnext_depth=1"]
TINY_DEPTH = TINY + ["model.overrides.hooks=[0,1,1,1]", "model.overrides.layer_dims=[8,16,32,64]",
                     "model.overrides.dpt_dim=32"]


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_h5(tmp_path_factory) -> Path:
    """The real NYUv2 labeled frame shipped in samples/ (train and test split), stored at 120x160 px."""
    from mmtk.data import convert_rgbd

    out = tmp_path_factory.mktemp("data") / "nyuv2_sample.h5"
    convert_rgbd(SAMPLES / "nyuv2_multimae", out, size=(120, 160), progress=False)
    return out


@pytest.fixture(scope="session")
def sync_h5(tmp_path_factory) -> Path:
    """3 real NYUv2 raw frames with depth holes and no labels (rgb + depth only)."""
    from mmtk.data import convert_rgbd

    out = tmp_path_factory.mktemp("data") / "nyuv2_sync.h5"
    convert_rgbd(SAMPLES / "nyuv2_sync", out, size=(120, 160), progress=False)
    return out




def assert_same_final_weights(one: Path, two: Path, recipe: Path, sets: list[str], data) -> None:
    """The newest checkpoints of run folders ``one`` and ``two`` hold the same weights, and those moved away from the
    initialisation both runs started from (same seed, same create_model call), so the runs did train."""
    import mmtk
    from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
    from mmtk.config import load_recipe
    from mmtk.runtime import seed_run
    from mmtk.train.run import _prepare, model_args

    final_one = load_checkpoint(checkpoint_paths(one)[-1])["model"]
    final_two = load_checkpoint(checkpoint_paths(two)[-1])["model"]
    # atol 1e-4 (a tenth of the lr): the key part of qkv.bias has a mathematically zero gradient (softmax
    # ignores a constant added to every key), so Adam turns float noise there into steps of up to ~lr.
    for name, weight in final_one.items():
        torch.testing.assert_close(final_two[name], weight, rtol=1e-4, atol=1e-4, msg=name)
    loaded = load_recipe(recipe, sets, data_path=data)
    info, _ = _prepare(loaded)
    seed_run(loaded.train.seed)
    initial = mmtk.create_model(loaded.model.name, verbose=False, **model_args(loaded, info)).state_dict()
    moved = max((final_one[n] - w).abs().max().item() for n, w in initial.items())
    assert moved > 1e-3  # the runs trained: the comparison is not between two untouched initialisations
