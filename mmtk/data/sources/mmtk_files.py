"""Frames of an mmtk dataset file, as every source yields them (:class:`~mmtk.data.sources.frame.Frame`).

What `mmtk predict --data` and `mmtk export-pointcloud --h5` read: each frame holds every per-frame array a
registered adapter stores (``rgb``, ``depth``, ``semseg``, a plugin's ``ir`` ...) whole, with its intrinsics,
time stamp and frame id when the file has them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from mmtk.data.codecs import frame_reader
from mmtk.data.format import open_mmtk_file
from mmtk.data.sources.frame import Frame
from mmtk.errors import MmtkError
from mmtk.modality import stored_array

METADATA = ("intrinsics", "timestamp", "frame_id")
METRE_UNITS = ("m", "metre", "metres", "meter", "meters")


@contextlib.contextmanager
def open_split(path: str | os.PathLike, split: str) -> Iterator[h5py.Group]:
    """The group of ``split`` in an mmtk file (opened read-only and checked), or a one-line MmtkError."""
    with open_mmtk_file(path) as handle:
        if split not in handle:
            raise MmtkError(f"{path}: no split {split!r}; splits: {sorted(handle)}")
        yield handle[split]


def stored_arrays(group: h5py.Group) -> list[str]:
    """The per-frame arrays of a split that a registered adapter stores (others' datasets are left out)."""
    names = []
    for name in group:
        if name in METADATA:
            continue
        with contextlib.suppress(MmtkError):
            stored_array(name)
            names.append(name)
    return names


def split_length(group: h5py.Group) -> int:
    """Frames in a split (every dataset of a split has one entry per frame)."""
    lengths = {int(group[name].shape[0]) for name in group}
    if not lengths:
        raise MmtkError(f"{group.file.filename}: split {group.name.lstrip('/')!r} holds no dataset; re-create the "
                        f"file with `mmtk convert`")
    if len(lengths) != 1:
        raise MmtkError(f"{group.file.filename}:{group.name}: datasets differ in frame count ({sorted(lengths)}); "
                        f"re-create the file with `mmtk convert`")
    return lengths.pop()


class SplitFrames:
    """The frames of one split of an open mmtk file: its length and the arrays to read (``names``, default
    :func:`stored_arrays`) are worked out once, then each frame is read by its index."""

    def __init__(self, group: h5py.Group, names: Sequence[str] | None = None) -> None:
        self.group, self.split = group, group.name.lstrip("/")
        self.count = split_length(group)
        self.names = stored_arrays(group) if names is None else list(names)
        missing = [name for name in self.names if name not in group]
        if missing:
            raise MmtkError(f"{group.file.filename}: split {self.split!r} has no dataset {missing[0]!r}; "
                            f"datasets: {sorted(group)}")
        self.readers = {name: frame_reader(group[name]) for name in self.names}  # layouts looked up once

    def __len__(self) -> int:
        return self.count

    def read(self, index: int) -> Frame:
        """Frame ``index`` (negative counts from the end): its arrays, decoded in the file's units, and metadata."""
        group = self.group
        if not -self.count <= index < self.count:
            raise MmtkError(f"{group.file.filename}: split {self.split!r} has {self.count} frames; index {index} is "
                            f"out of range")
        index %= self.count
        arrays = {name: read(index) for name, read in self.readers.items()}  # decoded, in the file's units
        intrinsics = np.asarray(group["intrinsics"][index], np.float32) if "intrinsics" in group else None
        timestamp = float(group["timestamp"][index]) if "timestamp" in group else None
        frame_id = group["frame_id"].asstr()[index] if "frame_id" in group else f"{self.split}_{index:06d}"
        return Frame(self.split, arrays, intrinsics, timestamp, frame_id)


def read_frame(group: h5py.Group, index: int, names: Sequence[str] | None = None) -> Frame:
    """Frame ``index`` of a split: the arrays ``names`` (default :func:`stored_arrays`) and its metadata."""
    return SplitFrames(group, names).read(index)


def frame_location(path: str | os.PathLike, split: str, index: int) -> tuple[Path, int]:
    """(file, index in it) of frame ``index`` of ``split`` of a dataset: a file, or a shard folder (its index)."""
    if Path(path).is_dir():
        from mmtk.data.shard_index import locate_frame

        return locate_frame(path, split, index)
    return Path(path), index


def dataset_frames(path: str | os.PathLike, split: str, index: int | None = None) -> Iterator[Frame]:
    """The frames of ``split`` of a dataset (a file or a shard folder, shard by shard), or only its frame ``index``."""
    from mmtk.data.shard_index import dataset_files

    if index is not None:
        file, local = frame_location(path, split, index)
        with open_split(file, split) as group:
            yield read_frame(group, local)
        return
    files = dataset_files(path)
    if len(files) > 1:  # a shard folder: shards without this split hold none of its frames
        from mmtk.data.shard_index import read_index

        holding = {shard["file"] for shard in read_index(path)["shards"] if split in shard["splits"]}
        files = [file for file in files if file.name in holding]
        if not files:
            raise MmtkError(f"{path}: no shard has split {split!r}; `mmtk info {path}` lists the splits")
    for file in files:
        with open_split(file, split) as group:
            frames = SplitFrames(group)
            for i in range(len(frames)):
                yield frames.read(i)


def check_metres(group: h5py.Group, name: str) -> None:
    """A point cloud needs metric depth: refuse an array stored in other units, in one line."""
    units = str(group[name].attrs.get("units", "m"))
    if units not in METRE_UNITS:
        raise MmtkError(f"{Path(group.file.filename)}: {group.name.lstrip('/')}/{name} is in {units!r} units, not "
                        f"metres; a point cloud needs metric depth (use the sensor depth or a metric model)")


def class_count(group: h5py.Group, name: str) -> int | None:
    """Label ids of a labels array (classes + 1 for unlabeled), when the file names its classes."""
    classes = group[name].attrs.get("classes")
    return None if classes is None else len(json.loads(classes)) + 1
