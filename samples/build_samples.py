"""Rebuild samples/ from the real frames in ../shared/data (run from the repo root; documents provenance).

Usage: python samples/build_samples.py [SHARED_DATA_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MULTIMAE_DEPTH_SCALE = 6553.6


def build_multimae(shared: Path) -> None:
    """The one NYUv2 labeled frame (SA-Gate copy) in MultiMAE's prepared layout, in both train and test."""
    src = shared / "nyuv2_sagate_labeled"
    rgb = np.array(Image.open(src / "RGB" / "0.jpg").convert("RGB"))
    depth_m = np.load(src / "Depth" / "0.npy")
    labels = np.array(Image.open(src / "Label" / "0.png"))
    depth_units = np.clip(np.round(depth_m * MULTIMAE_DEPTH_SCALE), 0, 65535).astype(np.uint16)
    for split in ("train", "test"):
        for name, array in (("rgb", rgb), ("depth", depth_units), ("semseg", labels)):
            folder = HERE / "nyuv2_multimae" / split / name / "data"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / "0000.png", optimize=True)


def build_sync(shared: Path) -> None:
    """The three NYUv2 raw 'sync' frames (Metric3D copy) in BTS layout, bytes unchanged."""
    src = shared / "nyuv2_metric3d_sync"
    for sub in ("rgb", "depth"):
        shutil.copytree(src / sub, HERE / "nyuv2_sync" / sub, dirs_exist_ok=True)


def build_tum(shared: Path) -> None:
    """The TUM RGB-D frame (Open3D copy), bytes unchanged."""
    dst = HERE / "tum_rgbd"
    dst.mkdir(exist_ok=True)
    for name in ("TUM_color.png", "TUM_depth.png"):
        shutil.copy2(shared / "tum_rgbd_open3d" / name, dst / name)


def build_rosbag(shared: Path) -> None:
    """A small ROS1 bag (bz2) with the first two PCL frames of the shared bag: rgb8, 16UC1, CameraInfo."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer

    src = shared / "rosbag_pcl_kinect" / "pcl_kinect_3frames.bag"
    dst = HERE / "rosbag_pcl_kinect" / "pcl_kinect_2frames.bag"
    dst.parent.mkdir(exist_ok=True)
    dst.unlink(missing_ok=True)
    keep = ("/camera/rgb/image_color", "/camera/rgb/camera_info", "/camera/depth_registered/image_raw")
    writer = Writer(dst)
    writer.set_compression(Writer.CompressionFormat.BZ2)
    with AnyReader([src]) as reader, writer:
        conns = {}
        for conn in reader.connections:
            if conn.topic in keep:
                conns[conn.topic] = writer.add_connection(conn.topic, conn.msgtype, msgdef=conn.msgdef.data,
                                                          md5sum=conn.digest)
        seen: dict[str, int] = {}
        for conn, stamp, raw in reader.messages(connections=[c for c in reader.connections if c.topic in keep]):
            if seen.get(conn.topic, 0) < 2:
                writer.write(conns[conn.topic], stamp, raw)
                seen[conn.topic] = seen.get(conn.topic, 0) + 1


if __name__ == "__main__":
    shared_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data"
    build_multimae(shared_dir)
    build_sync(shared_dir)
    build_tum(shared_dir)
    build_rosbag(shared_dir)
