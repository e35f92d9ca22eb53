"""One way to open any source `mmtk convert` and `mmtk predict` read, by kind: an RGB-D folder (or NYUv2 .mat), a
ROS bag, a folder of RGB images, or an mmtk dataset (a file or a shard folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.errors import MmtkError


def open_source(kind: str, path: str | os.PathLike, **options: Any) -> RgbdSource:
    """The source of kind ``kind`` at ``path`` with its reading ``options``: those of
    :func:`~mmtk.data.convert.convert_rgbd` (classes, depth_scale, depth_format, depth_range, layout) for "rgbd",
    of :func:`~mmtk.data.sources.ros.source.open_rosbag_source` for "rosbag", none for "images", depth and
    depth_scale for "image" (one colour image), and split and index for "data"."""
    if kind not in OPENERS:
        raise MmtkError(f"unknown source kind {kind!r}; one of {', '.join(OPENERS)}")
    check_options(**options)
    return OPENERS[kind](Path(path), **options)


def check_options(*, depth_scale: float | None = None, max_dt: float | None = None, depth_topic: str | None = None,
                  cloud_topic: str | None = None, depth_format: str | None = None, depth_range: str | None = None,
                  **_: Any) -> None:
    """Refuse, before any input is read, conversion options out of range (one input, or a shard folder's many):
    the one place they are checked (other keyword options are the converters' and pass through)."""
    from mmtk.data.sources.depth_encoding import DepthEncoding, encoding_for, parse_depth_range
    from mmtk.data.sources.ros.source import check_depth_topics

    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    if max_dt is not None and max_dt <= 0:
        raise MmtkError(f"--max-dt must be positive seconds, got {max_dt}")
    encoding_for(depth_format, depth_scale, DepthEncoding())  # unknown or conflicting units
    parse_depth_range(depth_range)
    check_depth_topics(depth_topic, cloud_topic, depth_scale)


def _rgbd(path: Path, classes: int = 40, depth_scale: float | None = None, depth_format: str | None = None,
          depth_range: str | None = None, layout: str | None = None) -> RgbdSource:
    from mmtk.data.sources.depth_encoding import parse_depth_range
    from mmtk.data.sources.folders import open_rgbd_source
    from mmtk.data.sources.frame import ConvertOptions

    return open_rgbd_source(path, ConvertOptions(classes=classes, depth_scale=depth_scale, depth_format=depth_format,
                                                 depth_range=parse_depth_range(depth_range), layout=layout))


def _rosbag(path: Path, **options: Any) -> RgbdSource:
    from mmtk.data.sources.ros.source import open_rosbag_source

    return open_rosbag_source(path, **options)


def _images(path: Path) -> RgbdSource:
    """Every image of a folder of RGB images (flat, class folders, or train/val/test above them) as a colour frame."""
    from mmtk.data.sources.images import open_image_folder

    return open_image_folder(path).source


def _image(path: Path, depth: Path | None = None, depth_scale: float | None = None) -> RgbdSource:
    """One colour image, with an optional depth image aligned with it (PNG/TIFF/.npy: integers in ``depth_scale``
    units per metre, default 1000 = mm; floats in metres unless a scale is given)."""
    from mmtk.data.sources.depth_encoding import read_depth_units, to_metres
    from mmtk.data.sources.image_files import read_rgb

    arrays = {"rgb": read_rgb(path)}
    if depth is not None:
        raw = read_depth_units(depth)
        default = 1000.0 if raw.dtype.kind in "iu" else None
        arrays["depth"] = to_metres(raw, depth_scale if depth_scale is not None else default)
        if arrays["depth"].shape != arrays["rgb"].shape[:2]:
            raise MmtkError(f"{depth}: depth is {arrays['depth'].shape} but {path} is {arrays['rgb'].shape[:2]}; "
                            f"they must be aligned")
    frame = Frame("all", arrays, frame_id=path.name)
    return RgbdSource("image", path.name, 1, lambda: iter([frame]))


def _dataset(path: Path, split: str = "test", index: int | None = None) -> RgbdSource:
    """The frames of one split of an mmtk dataset (every array an adapter stores), or only its frame ``index``."""
    from mmtk.data.sources.mmtk_files import dataset_frames

    total = 1 if index is not None else _split_frames(path, split)  # opens and checks the dataset and the split
    return RgbdSource("data", f"mmtk dataset {path.name}, split {split}", total,
                      lambda: dataset_frames(path, split, index))


def _split_frames(path: Path, split: str) -> int:
    """Frames of ``split`` in a dataset file or shard folder (its index); MmtkError when the split is not there."""
    from mmtk.data.shard_index import read_index
    from mmtk.data.sources.mmtk_files import open_split, split_length

    if not path.is_dir():
        with open_split(path, split) as group:
            return split_length(group)
    splits = read_index(path)["splits"]
    if split not in splits:
        raise MmtkError(f"{path}: no split {split!r}; splits: {sorted(splits)}")
    return int(splits[split]["frames"])


OPENERS: dict[str, Callable[..., RgbdSource]] = {"rgbd": _rgbd, "rosbag": _rosbag, "images": _images,
                                                 "image": _image, "data": _dataset}
