"""A recipe maps a stored dataset onto a modality (`data.sources`), e.g. pseudo depth instead of sensor depth."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from engine_helpers import RECIPES, SAMPLES
from data_helpers import DecodedFile
from mmtk.config import load_recipe
from mmtk.data import convert_rgbd
from mmtk.errors import MmtkError
from mmtk.train.run import _prepare


@pytest.fixture(scope="module")
def file_with_pseudo_depth(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources") / "sample.h5"
    convert_rgbd(SAMPLES / "nyuv2_multimae", out, size=(64, 64), progress=False)
    with DecodedFile(out, "a") as handle:
        depth = handle["train/depth"][...]
        pseudo = handle["train"].create_dataset("depth_pseudo", data=np.where(depth > 0, 1.0 / np.maximum(depth, 1e-3), 1.0))  # inverse depth: relative
        pseudo.attrs["units"] = "relative"
    return out


def test_pretraining_reads_the_mapped_dataset(file_with_pseudo_depth, tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["data.sources={depth: depth_pseudo}", "data.image_size=[64, 64]"],
                         data_path=str(file_with_pseudo_depth))
    _, dataset = _prepare(recipe)
    dataset.augment = False
    sample = dataset[0]
    with DecodedFile(file_with_pseudo_depth) as handle:
        pseudo = torch.from_numpy(handle["train/depth_pseudo"][0])
    torch.testing.assert_close(sample["depth_m"][0], pseudo.float())
    assert bool(sample["depth_valid"].all())  # pseudo depth has no holes


def test_unknown_source_is_a_clear_error(file_with_pseudo_depth):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["data.sources={depth: depth_anything}"],
                         data_path=str(file_with_pseudo_depth))
    with pytest.raises(MmtkError, match="data.sources maps depth to 'depth_anything'"):
        _prepare(recipe)


def test_sensor_and_pseudo_depth_together(file_with_pseudo_depth):
    """depth_pseudo is a modality of its own (one adapter file): a recipe can pretrain on both depths."""
    recipe = load_recipe(RECIPES / "tiny.yaml", ["model.inputs=[rgb, depth, depth_pseudo]",
                                                 "model.outputs=[rgb, depth, depth_pseudo]", "data.image_size=[64, 64]"],
                         data_path=str(file_with_pseudo_depth))
    info, dataset = _prepare(recipe)
    assert "depth_pseudo" in info.modalities
    batch = torch.utils.data.default_collate([dataset[0], dataset[0]])
    with DecodedFile(file_with_pseudo_depth) as handle:
        assert float(handle["train/depth_pseudo"][0].min()) > 0
    assert bool(batch["depth_pseudo_valid"].all())
    # standardised pseudo depth (inverse depth here) is its own signal, not a copy of the sensor's
    assert batch["depth_pseudo"].shape == batch["depth"].shape and not torch.allclose(batch["depth_pseudo"], batch["depth"])

    import mmtk
    from mmtk.train.run import model_args, pretrain_loss_fn

    model = mmtk.create_model(recipe.model.name, **model_args(recipe, info))
    loss, losses = pretrain_loss_fn()(model, batch)
    assert set(losses) == {"rgb", "depth", "depth_pseudo"} and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.tokenizers["depth_pseudo"].proj.weight.grad.abs().sum() > 0
