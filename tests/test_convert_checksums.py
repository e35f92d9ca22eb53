"""`mmtk convert` on every shipped layout stores the same arrays as the format before the adapter-owned storage.

tests/data/convert_checksums.json holds, per layout, the shape, dtype and sha256 of every dataset that mmtk at
commit ba8a605 (before StoredArray/Modality.check_stored replaced the fixed rgb/depth/semseg lists) wrote for the
same command. Datasets added since (e.g. intrinsics read from a file beside the frames) are not compared. Format 2
keeps JPEG bytes, QOI and integer depth with its scale: its frames are compared decoded (pixels and metres), so
this also proves that format 2 reads back bit-exact what format 1 stored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_helpers import invoke as run_cli
from data_helpers import DecodedFile

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
EXPECTED = json.loads((Path(__file__).parent / "data" / "convert_checksums.json").read_text())
CASES = {
    "nyuv2_multimae": ["--rgbd", SAMPLES / "nyuv2_multimae"],
    "nyuv2_sync": ["--rgbd", SAMPLES / "nyuv2_sync"],
    "tum_rgbd": ["--rgbd", SAMPLES / "tum_rgbd", "--depth-scale", "5000", "--size", "240x320"],
    "pcl_kinect": ["--rgbd", SAMPLES / "pcl_kinect", "--depth-scale", "1000"],
    "rosbag": ["--rosbag", SAMPLES / "rosbag_pcl_kinect" / "pcl_kinect_2frames.bag",
               "--rgb-topic", "/camera/rgb/image_color", "--depth-topic", "/camera/depth_registered/image_raw"],
}


def _digest(dataset: h5py.Dataset) -> list:
    values = dataset[()]
    if dataset.dtype.kind == "O":  # strings (frame ids)
        text = "\n".join(v.decode() if isinstance(v, bytes) else v for v in values)
        return [list(dataset.shape), "str", hashlib.sha256(text.encode()).hexdigest()]
    return [list(dataset.shape), str(dataset.dtype), hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()]


@pytest.mark.parametrize("layout", sorted(CASES))
def test_shipped_layout_converts_to_the_same_arrays(layout, tmp_path):
    out = tmp_path / f"{layout}.h5"
    source, path, *flags = CASES[layout]
    code, text = run_cli("convert", source, path, out, *flags, "--no-progress")
    assert code == 0, text
    with DecodedFile(out) as f:
        for key, expected in EXPECTED[layout].items():
            assert key in f, f"{layout}: {key} is no longer written"
            assert _digest(f[key]) == expected, f"{layout}: {key} differs from the previous format"
