"""Helpers for the tests/test_data_*.py files: paths to real sample frames, an in-process CLI runner,
and a builder of a faithful NYUv2 labeled .mat (MATLAB v7.3 layout) from the real labeled frame."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from cli_helpers import invoke as run_cli  # noqa: F401  (the tests' way to run `mmtk ...`)
from mmtk.data.sources.nyuv2_meta import nyuv2_meta

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED = REPO.parent / "shared" / "data"
MULTIMAE = SAMPLES / "nyuv2_multimae"
SYNC = SAMPLES / "nyuv2_sync"
TUM = SAMPLES / "tum_rgbd"
BAG1 = SAMPLES / "rosbag_pcl_kinect" / "pcl_kinect_2frames.bag"
KINECT = SAMPLES / "pcl_kinect"  # a real frame of PCL's Kinect grabber (its README: source and licence)
KINECT_FRAME = "frame_20121214T142255.814212"
RGB_TOPIC = "/camera/rgb/image_color"
DEPTH_TOPIC = "/camera/depth_registered/image_raw"


def kinect_intrinsics() -> np.ndarray:
    """K of the Kinect frame (fx = fy = 525, cx = 320, cy = 240 px; the frame's intrinsics XML)."""
    from mmtk.pointcloud import intrinsics_matrix

    return intrinsics_matrix(525.0, 525.0, 320.0, 240.0)


def kinect_frame() -> tuple[np.ndarray, np.ndarray]:
    """The Kinect frame: rgb uint8 [480, 640, 3] and depth float32 metres (stored in millimetres, 0 = none)."""
    rgb = np.array(Image.open(KINECT / f"{KINECT_FRAME}_rgb.png").convert("RGB"))
    depth_m = np.array(Image.open(KINECT / f"{KINECT_FRAME}_depth.png")).astype(np.float32) / 1000.0
    return rgb, depth_m


def shared(path: str) -> Path:
    """A path inside ../shared/data, skipping the test when the folder is not there."""
    import pytest  # (here: benchmarks/bench_convert.py imports this module without pytest installed)

    full = SHARED / path
    if not full.exists():
        pytest.skip(f"{full} not available")
    return full


def labeled_frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real NYUv2 labeled frame shipped in samples: rgb uint8, depth float32 m, 40-class labels uint8."""
    root = MULTIMAE / "train"
    rgb = np.array(Image.open(root / "rgb" / "data" / "0000.png"))
    depth = np.array(Image.open(root / "depth" / "data" / "0000.png")).astype(np.float32) / np.float32(6553.6)
    labels = np.array(Image.open(root / "semseg" / "data" / "0000.png"))
    return rgb, depth, labels


def raw_hole_mask() -> np.ndarray:
    """Where a real NYUv2 raw (sync) depth frame has no measurement, True = hole; [480, 640]."""
    return np.array(Image.open(SYNC / "depth" / "sync_depth_00000.png")) == 0


def labels40_to_894(labels40: np.ndarray) -> np.ndarray:
    """Inverse of the 894->40 map: each 40-class id becomes the smallest raw id that maps to it."""
    map40 = np.asarray(nyuv2_meta()["map894_to_40"])
    inverse = np.zeros(41, np.uint16)
    for cls in range(1, 41):
        inverse[cls] = int(np.flatnonzero(map40 == cls)[0])
    return inverse[labels40]


def _matlab_strings(f: h5py.File, strings: list[str], name: str) -> None:
    refs = f.require_group("#refs#")
    out = np.empty((1, len(strings)), dtype=h5py.ref_dtype)
    for i, text in enumerate(strings):
        ds = refs.create_dataset(f"{name}_{i}", data=np.array([[ord(c)] for c in text], np.uint16))
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        out[0, i] = ds.ref
    f.create_dataset(name, data=out).attrs["MATLAB_class"] = np.bytes_("cell")


def write_nyu_mat(path: Path, frames: list[dict[str, np.ndarray]], scenes: list[str]) -> None:
    """Write frames in the official nyu_depth_v2_labeled.mat layout (v7.3, column-major, see nyuv2-meta/README).

    Each frame dict: rgb [H,W,3] uint8, depth/raw [H,W] float32 m, labels [H,W] uint16 (894 ids).
    """
    with h5py.File(path, "w", userblock_size=512) as f:
        def put(name: str, arrays: list[np.ndarray], matlab_class: str) -> None:
            f.create_dataset(name, data=np.stack(arrays), chunks=(1, *arrays[0].shape)).attrs["MATLAB_class"] = \
                np.bytes_(matlab_class)

        put("images", [fr["rgb"].transpose(2, 1, 0) for fr in frames], "uint8")  # [N, 3, W, H]
        put("depths", [fr["depth"].T for fr in frames], "single")                # [N, W, H]
        put("rawDepths", [fr["raw"].T for fr in frames], "single")
        put("labels", [fr["labels"].T for fr in frames], "uint16")
        put("instances", [np.zeros_like(fr["labels"].T, np.uint8) for fr in frames], "uint8")
        _matlab_strings(f, list(nyuv2_meta()["names894"]), "names")
        _matlab_strings(f, scenes, "scenes")
        _matlab_strings(f, [s.rsplit("_", 1)[0] for s in scenes], "sceneTypes")
    header = (f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {dt.datetime(2012, 6, 6):%c} HDF5 schema 1.00 .")
    with open(path, "r+b") as handle:
        handle.write(header.encode().ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")


def nyu_mat_frames() -> list[dict[str, np.ndarray]]:
    """Three frames from the real labeled frame: as is, mirrored, and with the real raw-depth holes shifted."""
    rgb, depth, labels40 = labeled_frame()
    holes = raw_hole_mask()
    labels = labels40_to_894(labels40)
    raw = np.where(holes, 0, depth).astype(np.float32)
    mirrored = {"rgb": rgb[:, ::-1], "depth": depth[:, ::-1], "raw": raw[:, ::-1], "labels": labels[:, ::-1]}
    shifted = {"rgb": rgb, "depth": depth, "raw": np.where(np.roll(holes, 40, 0), 0, depth).astype(np.float32),
               "labels": labels}
    return [{"rgb": rgb, "depth": depth, "raw": raw, "labels": labels}, mirrored, shifted]




class DecodedFile:
    """An mmtk file opened with h5py whose stored image arrays read as their decoded frames (format 2 keeps JPEG
    or QOI bytes and integer depth with its scale), so tests compare frames as format 1 stored them."""

    def __init__(self, path, mode: str = "r") -> None:
        self.handle = h5py.File(path, mode)

    def __enter__(self) -> "DecodedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __contains__(self, key: str) -> bool:
        return key in self.handle

    def __iter__(self):
        return iter(self.handle)

    def __getitem__(self, key: str):
        from mmtk.data.codecs import FrameView
        from mmtk.data.format import is_image

        value = self.handle[key]
        if isinstance(value, h5py.Group):
            group = DecodedFile.__new__(DecodedFile)
            group.handle = value
            return group
        return FrameView(value) if is_image(key.rsplit("/", 1)[-1], value) else value
