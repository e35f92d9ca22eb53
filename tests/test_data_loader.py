"""H5Dataset: the contract tensors, shared augmentation, validity, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import DecodedFile, MULTIMAE, SYNC, labeled_frame, run_cli
from mmtk.data import H5Dataset
from mmtk.adapters.depth import standardize_depth
from mmtk.adapters.rgb import IMAGENET_MEAN, IMAGENET_STD
from mmtk.data.transforms import CropWindow
from mmtk.errors import MmtkError


@pytest.fixture(scope="module")
def nyu_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "mm.h5"
    assert run_cli("convert", "--rgbd", MULTIMAE, out, "--no-progress")[0] == 0
    return out


@pytest.fixture(scope="module")
def sync_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "sync.h5"
    assert run_cli("convert", "--rgbd", SYNC, out, "--no-progress")[0] == 0
    return out


def test_no_augment_full_size_matches_contract(nyu_file):
    rgb, depth, labels = labeled_frame()
    sample = H5Dataset(nyu_file, split="test", image_size=None)[0]
    assert set(sample) == {"rgb", "depth", "depth_valid", "depth_m", "semseg", "semseg_full"}
    expected_rgb = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(sample["rgb"], expected_rgb)
    torch.testing.assert_close(sample["depth_m"][0], torch.from_numpy(depth), rtol=1e-6, atol=1e-6)
    full = sample["semseg_full"].numpy()
    assert full.dtype == np.int64 and full.shape == (480, 640)
    np.testing.assert_array_equal(full[labels == 0], 255)
    np.testing.assert_array_equal(full[labels > 0], labels[labels > 0].astype(np.int64) - 1)
    assert sample["semseg"].shape == (120, 160)
    np.testing.assert_array_equal(sample["semseg"].numpy(), full[2::4, 2::4])  # nearest (exact centres)


def test_depth_standardisation_is_robust(sync_file):
    sample = H5Dataset(sync_file, split="all", modalities=("depth",), image_size=None)[0]
    valid, depth, metres = sample["depth_valid"], sample["depth"], sample["depth_m"]
    assert set(sample) == {"depth", "depth_valid", "depth_m"}
    assert 0.2 < (~valid).float().mean() < 0.4            # real sensor holes survive
    assert torch.all(depth[~valid] == 0) and torch.all(metres[~valid] == 0)
    values = metres[valid]
    lo, hi = torch.quantile(values, torch.tensor([0.1, 0.9]))
    kept = values[(values >= lo) & (values <= hi)]
    expected = (metres - kept.mean()) / torch.sqrt(kept.var(unbiased=False) + 1e-6)
    torch.testing.assert_close(depth[valid], expected[valid])
    assert standardize_depth(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)).abs().sum() == 0


def test_augmentation_is_identical_for_all_modalities(nyu_file):
    rgb, depth, labels = labeled_frame()
    dataset = H5Dataset(nyu_file, split="train", image_size=(100, 150), augment=True)
    dataset.window = lambda: CropWindow(top=37, left=81, height=100, width=150, flip=True)
    sample = dataset[0]  # crop size == output size: the result is an exact flipped slice of every modality
    crop = (slice(37, 137), slice(81, 231))
    expected_rgb = (torch.from_numpy(rgb[crop][:, ::-1].copy()).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(sample["rgb"], expected_rgb)
    np.testing.assert_allclose(sample["depth_m"][0].numpy(), depth[crop][:, ::-1], rtol=1e-6)
    lab = labels[crop][:, ::-1].astype(np.int64) - 1
    np.testing.assert_array_equal(sample["semseg_full"].numpy(), np.where(lab < 0, 255, lab))


def test_random_crops_vary_and_keep_validity(sync_file):
    torch.manual_seed(0)
    dataset = H5Dataset(sync_file, split="all", modalities=("rgb", "depth"), image_size=(224, 224),
                        augment=True, crop_scale=(0.2, 0.5))
    a, b = dataset[1], dataset[1]
    assert not torch.equal(a["rgb"], b["rgb"])
    with DecodedFile(sync_file) as f:
        source = f["all/depth"][1]
    for s in (a, b):
        valid = s["depth_valid"][0]
        assert torch.all(s["depth_m"][0][valid] > 0) and torch.all(s["depth_m"][0][~valid] == 0)
        # validity-aware resizing never invents depths outside the sensor's range
        assert s["depth_m"][0][valid].min() >= source[source > 0].min() - 1e-4
        assert s["depth_m"][0].max() <= source.max() + 1e-4


def test_dataloader_with_workers(sync_file):
    dataset = H5Dataset(sync_file, split="all", modalities=("rgb", "depth"), image_size=(64, 64), augment=True)
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert batch["rgb"].shape == (3, 3, 64, 64) and batch["depth_valid"].dtype == torch.bool


def test_dataset_map_and_errors(nyu_file, tmp_path):
    dataset = H5Dataset(nyu_file, split="test", modalities=("rgb", "depth"), dataset_map={"depth": "depth"})
    assert len(dataset) == 1
    with pytest.raises(MmtkError, match="no dataset 'depth_pseudo'"):
        H5Dataset(nyu_file, split="test", dataset_map={"depth": "depth_pseudo"})
    with pytest.raises(MmtkError, match="no split 'val'"):
        H5Dataset(nyu_file, split="val")
    with pytest.raises(MmtkError, match="unknown modality"):
        H5Dataset(nyu_file, modalities=("normals",))


def test_default_modalities_are_those_the_split_stores(nyu_file, sync_file):
    assert H5Dataset(nyu_file, split="test").modalities == ("rgb", "depth", "semseg")
    unlabelled = H5Dataset(sync_file, split="all", image_size=(64, 64))  # BTS sync frames have no labels
    assert unlabelled.modalities == ("rgb", "depth")
    assert set(unlabelled[0]) == {"rgb", "depth", "depth_valid", "depth_m"}


def test_demo_file_trains_shape_ready(tmp_path):
    from mmtk.data import build_demo_file

    out = tmp_path / "demo.h5"
    build_demo_file(out)
    batch = next(iter(DataLoader(H5Dataset(out, split="train", augment=True), batch_size=2)))
    assert batch["rgb"].shape == (1, 3, 224, 224) and batch["semseg"].shape == (1, 56, 56)
    assert H5Dataset(out, split="test").classes[0] == "wall"
