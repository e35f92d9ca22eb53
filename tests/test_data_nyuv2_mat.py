"""NYUv2 labeled .mat conversion: transposition, units, label maps, splits, intrinsics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.io import savemat

from data_helpers import DecodedFile, labeled_frame, nyu_mat_frames, run_cli, shared, write_nyu_mat
from mmtk.data.sources.nyuv2_meta import nyuv2_meta
from mmtk.data.sources.layouts.nyuv2_mat import nyuv2_split_indices
from mmtk.data import read_info

SCENES = ["kitchen_0004", "office_0003", "kitchen_0004"]


@pytest.fixture(scope="module")
def mat_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nyu")
    write_nyu_mat(folder / "nyu_depth_v2_labeled.mat", nyu_mat_frames(), SCENES)
    return folder


def test_mat_converts_to_all_split_with_values(mat_dir, tmp_path):
    out = tmp_path / "nyu.h5"
    code, text = run_cli("convert", "--rgbd", mat_dir, out, "--no-progress")
    assert code == 0, text
    assert "layout: nyuv2-mat" in text and "no split: not 1449 frames" in text
    frames = nyu_mat_frames()
    rgb, depth, labels40 = labeled_frame()
    with DecodedFile(out) as f:
        group = f["all"]
        assert group["rgb"].shape == (3, 480, 640, 3)
        np.testing.assert_array_equal(group["rgb"][0], rgb)           # column-major undone, RGB order kept
        np.testing.assert_array_equal(group["rgb"][1], rgb[:, ::-1])
        np.testing.assert_array_equal(group["depth"][0], depth)        # metres, unchanged
        np.testing.assert_array_equal(group["depth_raw"][2], frames[2]["raw"])
        assert (group["depth_raw"][0] == 0).sum() == (frames[0]["raw"] == 0).sum() > 0
        np.testing.assert_array_equal(group["semseg"][0], labels40)   # 894 -> 40 gives the real labels back
        assert json.loads(group["semseg"].attrs["classes"])[0] == "wall"
        k = group["intrinsics"][0]
        assert k[0, 0] == pytest.approx(518.8579, abs=1e-3) and k[0, 2] == pytest.approx(324.5824, abs=1e-3)
        assert k[1, 2] == pytest.approx(252.7362, abs=1e-3)            # 1-based toolbox value minus 1
        assert group["frame_id"][1].decode() == "0001 office_0003"
        assert group["depth"].attrs["units"] == "m"


@pytest.mark.parametrize("classes", [13, 894])
def test_mat_label_spaces(mat_dir, tmp_path, classes):
    out = tmp_path / f"nyu{classes}.h5"
    code, text = run_cli("convert", "--rgbd", mat_dir, out, "--classes", classes, "--no-progress")
    assert code == 0, text
    _, _, labels40 = labeled_frame()
    meta = nyuv2_meta()
    with DecodedFile(out) as f:
        stored = f["all/semseg"][0]
        names = json.loads(f["all/semseg"].attrs["classes"])
    if classes == 13:
        np.testing.assert_array_equal(stored, np.asarray(meta["map40_to_13"])[labels40])
        assert names == meta["names13"]
    else:
        assert stored.dtype == np.uint16 and len(names) == 894
        np.testing.assert_array_equal(np.asarray(meta["map894_to_40"])[stored], labels40)
        assert names[int(stored[240, 320]) - 1] == meta["names894"][int(stored[240, 320]) - 1]


def test_splits_mat_beside_the_file_wins(mat_dir, tmp_path):
    folder = tmp_path / "with_splits"
    folder.mkdir()
    (folder / "nyu_depth_v2_labeled.mat").symlink_to(mat_dir / "nyu_depth_v2_labeled.mat")
    savemat(folder / "splits.mat", {"trainNdxs": np.array([[2]], np.uint16), "testNdxs": np.array([[1], [3]], np.uint16)})
    out = tmp_path / "split.h5"
    code, text = run_cli("convert", "--rgbd", folder, out, "--no-progress")
    assert code == 0, text
    rgb, _, _ = labeled_frame()
    with DecodedFile(out) as f:
        assert set(f) == {"train", "test"}
        np.testing.assert_array_equal(f["train/rgb"][0], rgb[:, ::-1])    # 1-based index 2 = the mirrored frame
        assert [s.decode() for s in f["test/frame_id"][:]] == ["0000 kitchen_0004", "0002 kitchen_0004"]
    assert read_info(out)["splits"]["train"]["frames"] == 1


def test_official_split_is_shipped_and_matches_splits_mat():
    splits = nyuv2_split_indices(1449, None)
    assert len(splits["train"]) == 795 and len(splits["test"]) == 654
    assert sorted(splits["train"] + splits["test"]) == list(range(1449))
    assert 0 in splits["test"]  # the shipped labeled frame #1 is an official test image (SA-Gate test.txt)
    assert nyuv2_split_indices(1449, shared("nyuv2-meta/splits.mat")) == splits
    assert nyuv2_split_indices(3, None) == {"all": [0, 1, 2]}


def test_truncated_mat_fails_cleanly(mat_dir, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    data = (mat_dir / "nyu_depth_v2_labeled.mat").read_bytes()
    (folder / "nyu_depth_v2_labeled.mat").write_bytes(data[: len(data) // 3])
    out = tmp_path / "broken.h5"
    code, text = run_cli("convert", "--rgbd", folder, out, "--no-progress")
    assert code == 2 and "error:" in text and "truncated" in text
    assert not out.exists() and not list(tmp_path.glob("broken.h5*"))
