"""A recipe maps a stored dataset onto a modality (`data.sources`), e.g. pseudo depth instead of sensor depth."""

from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch

from engine_helpers import RECIPES, SAMPLES
from mmtk.config import load_recipe
from mmtk.data import convert_rgbd
from mmtk.errors import MmtkError
from mmtk.training import _prepare


@pytest.fixture(scope="module")
def file_with_pseudo_depth(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources") / "sample.h5"
    convert_rgbd(SAMPLES / "nyuv2_multimae", out, size=(64, 64), progress=False)
    with h5py.File(out, "a") as handle:
        depth = handle["train/depth"][...]
        pseudo = handle["train"].create_dataset("depth_pseudo", data=np.where(depth > 0, 2.0 * depth, 1.0))
        pseudo.attrs["units"] = "relative"
    return out


def test_pretraining_reads_the_mapped_dataset(file_with_pseudo_depth, tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["data.sources={depth: depth_pseudo}", "data.image_size=[64, 64]"],
                         data_path=str(file_with_pseudo_depth))
    _, dataset = _prepare(recipe)
    dataset.augment = False
    sample = dataset[0]
    with h5py.File(file_with_pseudo_depth) as handle:
        pseudo = torch.from_numpy(handle["train/depth_pseudo"][0])
    torch.testing.assert_close(sample["depth_m"][0], pseudo.float())
    assert bool(sample["depth_valid"].all())  # pseudo depth has no holes


def test_unknown_source_is_a_clear_error(file_with_pseudo_depth):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["data.sources={depth: depth_anything}"],
                         data_path=str(file_with_pseudo_depth))
    with pytest.raises(MmtkError, match="data.sources maps depth to 'depth_anything'"):
        _prepare(recipe)
