"""One way to open any source `mmtk convert` and `mmtk predict` read, by kind: an RGB-D folder (or NYUv2 .mat), a
ROS bag, a folder of RGB images, or an mmtk dataset (a file or a shard folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.errors import MmtkError
from mmtk.progress import counted


def open_source(kind: str, path: str | os.PathLike, **options: Any) -> RgbdSource:
    """The source of kind ``kind`` at ``path`` with its reading ``options``: those of
    :func:`~mmtk.data.convert.convert_rgbd` (classes, depth_scale, depth_format, depth_range, layout) for "rgbd",
    of :func:`~mmtk.data.sources.ros.source.open_rosbag_source` for "rosbag", none for "images", and split and
    index for "data"."""
    if kind not in OPENERS:
        raise MmtkError(f"unknown source kind {kind!r}; one of {', '.join(OPENERS)}")
    return OPENERS[kind](Path(path), **options)


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
    from mmtk.data.sources.image_files import read_rgb
    from mmtk.data.sources.images import list_images

    found = list_images(path) if path.is_dir() else {}
    if not found:
        raise MmtkError(f"--images {path}: no image files found (a folder of .png/.jpg images)")

    def frames() -> Iterator[Frame]:
        for split, files in found.items():
            for file, frame_id in files:
                yield Frame(split, {"rgb": read_rgb(file)}, frame_id=frame_id)

    total = sum(len(files) for files in found.values())
    return RgbdSource("images", f"{counted(total, 'image')} in {path.name}", total, frames)


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
                                                 "data": _dataset}
