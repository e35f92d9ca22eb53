"""The paper's NYUv2 finetuning: its augmentations (torchvision.transforms.v2, one draw for every array), its berHu
loss over the batch, its depth normalisation, and its recipes running end to end on the real sample frame.

Official values (EPFL-VILAB/MultiMAE): semseg utils/datasets_semseg.py simple_transform; depth
utils/dataset_regression.py nyu_transform; loss run_finetuning_depth.py masked_berhu_loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmtk
from engine_helpers import RECIPES, TINY_DEPTH, TINY_SEMSEG, one_thread, sample_h5  # noqa: F401
from mmtk.config import load_recipe
from mmtk.data.augment import multimae_depth, multimae_semseg
from mmtk.train.engine import read_metrics
from mmtk.errors import MmtkError
from mmtk.adapters.tasks.depth import depth_loss
from mmtk.train.run import run_training

KINDS = {"rgb": "image", "ir": "image", "depth": "metric", "semseg": "labels"}


def frames(height: int, width: int) -> dict[str, np.ndarray]:
    """The same block pattern as colour (rgb), a non-colour image (ir), depth in metres and labels."""
    rows, cols = np.mgrid[:height, :width]
    blocks = ((rows // 8) * 7 + (cols // 8) * 3) % 40 + 1  # 1..40, constant on 8 x 8 blocks
    colour = np.stack([blocks * 5, blocks * 3 + 20, 250 - blocks * 4], axis=-1).astype(np.uint8)
    return {"rgb": colour, "ir": colour.copy(), "depth": (blocks * 0.1).astype(np.float32),
            "semseg": blocks.astype(np.uint8)}


def interior(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 radius + 1)^2 neighbourhood lies in the frame and has one label: bilinear and nearest
    resizing agree there."""
    pad = np.pad(labels, radius, constant_values=-1)
    same = np.ones(labels.shape, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= pad[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] == labels
    return same


@pytest.mark.parametrize("build, size", [(multimae_semseg, (64, 64)), (multimae_depth, (32, 32))])
def test_geometry_is_one_draw_for_every_array_and_colour_only_for_colour(build, size):
    augmentation = build(size)
    source = frames(48, 64)
    jittered = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = augmentation(source, KINDS, colour={"rgb"})
        labels = out["semseg"].astype(np.int64)
        keep = interior(labels) & (labels > 0)  # away from block edges, not padding
        assert {k: v.shape[:2] for k, v in out.items()} == dict.fromkeys(KINDS, size)
        assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in source.items()}
        # geometry: depth, labels and the untouched image show the same block at every pixel (inside blocks: masks
        # are resized nearest, floor-aligned as the official cv2, images bilinear: half a source pixel apart)
        np.testing.assert_allclose(out["depth"][keep], labels[keep] * 0.1, rtol=1e-5)
        off = np.abs(out["ir"][keep][:, 0].astype(int) - labels[keep] * 5) > 1
        assert not off.any()
        assert (out["depth"][labels == 0] == 0).all()  # padding is invalid depth and unlabelled
        jittered += not np.array_equal(out["rgb"], out["ir"])
    assert 5 < jittered < 40  # colour steps hit the colour array only, with a probability


def test_semseg_scale_jitter_is_0_1_to_2_with_padding_at_the_bottom_right():
    augmentation = multimae_semseg((64, 64))
    source = frames(48, 64)  # fitted into 64 x 64 at scale 1, so the scale is the jitter alone
    scales, padded = [], 0
    for seed in range(300):
        torch.manual_seed(seed)
        labels = augmentation(source, KINDS, colour=set())["semseg"]
        content = labels > 0
        if not content.all():
            padded += 1
            rows, cols = np.nonzero(content)
            assert rows.min() == 0 and cols.min() == 0  # the frame stays at the top left
            scales.append(math.sqrt(content.sum() / (48 * 64)))
    # padding when 48 s < 64, i.e. s < 4/3: probability (4/3 - 0.1) / 1.9 = 0.65 for s uniform in [0.1, 2]
    assert 0.55 < padded / 300 < 0.75
    assert 0.08 < min(scales) < 0.2  # 0.1 up to the rounding of a 5 x 6 px frame


def test_depth_crop_keeps_the_short_side_scale_and_grayscale_is_about_30_percent():
    augmentation = multimae_depth((32, 32))
    rows, cols = np.mgrid[:48, :64]
    source = {"semseg": (cols + 1).astype(np.uint8), "rgb": np.stack([cols * 3, rows * 4, 255 - cols * 2],
                                                                    axis=-1).astype(np.uint8)}
    gray = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = augmentation(source, {"semseg": "labels", "rgb": "image"}, colour={"rgb"})
        columns = out["semseg"][0].astype(int)
        assert (out["semseg"] == out["semseg"][0]).all()  # no vertical change: rows come whole
        step = np.abs(np.diff(columns))
        assert step.max() <= 2 and abs(abs(int(columns[-1]) - int(columns[0])) - 31 * 48 / 32) <= 2  # scale 32/48
        gray += bool((out["rgb"][..., 0] == out["rgb"][..., 1]).all() and (out["rgb"][..., 1] == out["rgb"][..., 2]).all())
    assert 0.2 < gray / 200 < 0.4  # RandomGrayscale p 0.3


def official_berhu(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """masked_berhu_loss as the official script defines it, restated."""
    diff = torch.where(valid, pred - target, torch.zeros_like(pred))
    c = max(float(diff.abs().max()) * 0.2, 1e-5)
    l1 = diff.abs()
    l2 = (diff.square() + c**2) / 2 / c
    return (l1[diff.abs() < c].sum() + l2[diff.abs() >= c].sum()) / valid.sum()


def test_batch_berhu_is_the_official_and_target_norm_divides_by_the_std():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 8, 8, generator=generator) * 4 + 0.5
    pred = target + 0.2 * torch.rand(3, 1, 8, 8, generator=generator)
    pred[2] += 3.0 * torch.rand(1, 8, 8, generator=generator)  # one image far off: its errors set the batch's threshold
    target[0, 0, :4] = 0.0  # invalid
    valid = target > 0
    assert float(depth_loss(pred, target, valid, "berhu", "batch")) == pytest.approx(
        float(official_berhu(pred, target, valid)), rel=1e-6)
    per_image = float(depth_loss(pred, target, valid, "berhu", "image"))
    assert per_image != pytest.approx(float(official_berhu(pred, target, valid)), rel=0.05)
    mean, std = 2.07, 0.78  # normalised with (d - mean) / std as the official does
    normalised = official_berhu((pred - mean) / std, (target - mean) / std, valid)
    assert float(depth_loss(pred, target, valid, "berhu", "batch", scale=std)) == pytest.approx(float(normalised),
                                                                                                rel=1e-5)


def test_the_head_predicts_normalised_depth_and_the_model_returns_metres():
    plain = mmtk.create_model("multimae-tiny", outputs=[], head="dpt", task="depth", image_size=[32, 32], depth=4,
                              dim=64, num_heads=2, hooks=[0, 1, 2, 3], dpt_dim=32, layer_dims=[16, 32, 64, 128],
                              verbose=False)
    normed = mmtk.create_model("multimae-tiny", outputs=[], head="dpt", task="depth", image_size=[32, 32], depth=4,
                               dim=64, num_heads=2, hooks=[0, 1, 2, 3], dpt_dim=32, layer_dims=[16, 32, 64, 128],
                               output_norm=[2.0, 0.5], verbose=False)
    normed.load_state_dict(plain.state_dict())
    rgb = {"rgb": torch.randn(1, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(normed(rgb), plain(rgb) * 0.5 + 2.0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recipe, sizes", [
    ("nyuv2_depth_paper", TINY_DEPTH + ["model.overrides.drop_path_rate=0.0"]),
    ("nyuv2_semseg_paper", TINY_SEMSEG + ["model.overrides.drop_path_rate=0.0", "model.overrides.preds_per_patch=4"]),
])
def test_paper_recipes_train_on_the_sample_frame(recipe, sizes, sample_h5, tmp_path):
    """CPU-sized through --set (tiny encoder, 64 x 64 crops), everything else as the recipe says."""
    shipped = load_recipe(recipe, ["data.path=null"])
    assert shipped.data.augmentation.startswith("multimae-") and shipped.optim.weight_decay_on == "weights"
    overrides = sizes + ["model.name=multimae-tiny", "optim.batch_size=2", "optim.epochs=3", "optim.warmup_epochs=1",
                         "data.repeat=2", "train.precision=fp32"]
    run = load_recipe(recipe, overrides, data_path=str(sample_h5))
    result = run_training(run, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert result.steps == 3 and all(math.isfinite(r["loss"]) for r in records)
    if recipe == "nyuv2_depth_paper":
        assert run.train.loss_reduction == "batch" and run.train.target_norm == (2.0707764, 0.7775723)
        state = mmtk.train.checkpoint.load_checkpoint(result.last_checkpoint)
        assert state["model_args"]["output_norm"] == [2.0707764, 0.7775723]  # eval rebuilds a metric model
        # what the head was trained to predict cannot change on a resume
        changed = load_recipe(recipe, overrides + ["train.target_norm=null"], data_path=str(sample_h5))
        with pytest.raises(MmtkError, match=r"train.target_norm \[2.0707764, 0.7775723\] -> None: the recipe "
                                            r"contradicts checkpoint"):
            run_training(changed, tmp_path / "run", resume=True)
        # a finetune from this run without target_norm records that its head predicts metres
        plain = load_recipe(recipe, overrides + ["train.target_norm=null", "train.max_steps=1"],
                            data_path=str(sample_h5))
        again = run_training(plain, tmp_path / "plain", init=result.last_checkpoint)
        assert mmtk.train.checkpoint.load_checkpoint(again.last_checkpoint)["model_args"]["output_norm"] is None


def test_augmentation_errors_are_one_line(sample_h5):
    with pytest.raises(MmtkError, match="data.augmentation: unknown 'flip'; choose one of random-resized-crop, "):
        load_recipe("tiny_finetune_depth", ["data.augmentation=flip"], data_path=str(sample_h5))
    with pytest.raises(MmtkError, match="train.target_norm normalises regression targets such as depth"):
        load_recipe("tiny_finetune_semseg", ["train.target_norm=[2,1]"], data_path=str(sample_h5))

def test_whole_frame_augmentations_refuse_what_they_cannot_transform(tmp_path):
    from data_helpers import kinect_frame, kinect_intrinsics
    from mmtk.data import H5Dataset, H5Writer

    rgb, depth = kinect_frame()
    with H5Writer(tmp_path / "k.h5", source="test: PCL Kinect frame") as writer:
        writer.add_frame("all", {"rgb": rgb, "depth": depth}, intrinsics=kinect_intrinsics().astype(np.float32))
    with pytest.raises(MmtkError, match="reads 'intrinsics', which it cannot adjust .*random-resized-crop"):
        H5Dataset(tmp_path / "k.h5", "all", ("xyz",), (64, 64), augment=True, augmentation="multimae-depth")
