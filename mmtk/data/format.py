"""The mmtk HDF5 dataset format (version :data:`FORMAT_VERSION`) and its atomic writer.

Layout (documented in ``docs/dataset-format.md``)::

    /                 attrs: mmtk_format (int), source (str), created (ISO 8601 str)
    /<split>/         one group per split: "train", "test", or "all"
        rgb           uint8   [N, H, W, 3]
        depth         float32 [N, H, W]   metres, 0 = invalid
        depth_raw     float32 [N, H, W]   metres, 0 = invalid            (optional)
        semseg        uint8|uint16 [N, H, W], 0 = unlabeled, attr classes (JSON list)   (optional)
        intrinsics    float32 [N, 3, 3]   pixels, 0-based principal point (optional)
        timestamp     float64 [N]         seconds                        (optional)
        frame_id      str     [N]                                        (optional)

Every array is chunked one frame per chunk. Datasets with a physical unit carry a ``units`` attr;
depth datasets also carry summary statistics (``valid_fraction``, ``min_m``, ``max_m``) and semseg a
``histogram`` so that ``mmtk info`` never has to scan the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Sequence

import h5py
import numpy as np

from mmtk.errors import MmtkError

FORMAT_VERSION = 1
"""Integer written to the root attr ``mmtk_format``; bumped on incompatible changes."""

SPLIT_NAMES = ("train", "test", "all")
IMAGE_DATASETS = ("rgb", "depth", "depth_raw", "semseg")
UNITS = {
    "rgb": "uint8 sRGB, channels R,G,B",
    "depth": "m",
    "depth_raw": "m",
    "semseg": "class id, 0 = unlabeled, k = classes[k-1]",
    "intrinsics": "px",
    "timestamp": "s",
}
# Chosen by measurement (benchmarks/bench_loader.py, see docs/dataset-format.md): uncompressed chunks
# read fastest and let HDF5 read a crop window without touching the rest of the frame.
COMPRESSION: str | None = None
MAX_PLAUSIBLE_MEDIAN_DEPTH_M = 80.0


@dataclass
class _SplitStats:
    """Running statistics of one split, stored as attrs at close."""

    depth_valid: dict[str, int] = field(default_factory=dict)
    depth_total: dict[str, int] = field(default_factory=dict)
    depth_min: dict[str, float] = field(default_factory=dict)
    depth_max: dict[str, float] = field(default_factory=dict)
    histogram: np.ndarray | None = None


def _check_image(name: str, array: np.ndarray, dtypes: Sequence[type], ndim: int) -> None:
    if array.ndim != ndim:
        raise MmtkError(f"{name} has shape {array.shape}, expected {ndim} dimensions; check the input images")
    if array.dtype.type not in dtypes:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise MmtkError(f"{name} has dtype {array.dtype}, expected {names}")


def check_out_path(path: str | os.PathLike, force: bool) -> None:
    """An output file must end in .h5/.hdf5 and may replace an existing file only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise MmtkError(f"{path} already exists; add --force to overwrite it")
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise MmtkError(f"output {path} should end in .h5 or .hdf5")


class H5Writer:
    """Write an mmtk HDF5 dataset atomically, one frame at a time (memory stays bounded).

    Use it as a context manager. Frames go to a temporary file beside ``out_path``, which is
    renamed to ``out_path`` only when the ``with`` block ends without an exception; on error the
    temporary file is deleted, so a partial file never sits under the final name. An existing
    ``out_path`` is refused unless ``force=True``.

    Example::

        with H5Writer("out.h5", source="my camera") as w:
            w.set_classes(["wall", "floor"])
            w.add_frame("train", rgb=rgb, depth=depth_m, semseg=labels)
    """

    def __init__(self, out_path: str | os.PathLike, source: str, force: bool = False,
                 classes: Sequence[str] | None = None, compression: str | None = COMPRESSION) -> None:
        self.out_path = Path(out_path)
        self.compression = compression
        self.source = source
        self.force = force
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self._file: h5py.File | None = None
        self._tmp_path: Path | None = None
        self._counts: dict[str, int] = {}
        self._keys: dict[str, tuple[str, ...]] = {}
        self._stats: dict[str, _SplitStats] = {}

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "H5Writer":
        self._check_out_path()
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.out_path.name + ".tmp-", dir=self.out_path.parent)
        os.close(fd)
        self._tmp_path = Path(tmp)
        self._file = h5py.File(self._tmp_path, "w")
        self._file.attrs["mmtk_format"] = FORMAT_VERSION
        self._file.attrs["source"] = self.source
        self._file.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        succeeded = exc_type is None
        try:
            if succeeded:
                self._finish()
        except BaseException:
            succeeded = False
            raise
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            if not succeeded:
                self._remove_tmp()
        if succeeded:
            self._publish()

    def _check_out_path(self) -> None:
        check_out_path(self.out_path, self.force)

    def _remove_tmp(self) -> None:
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()

    def _publish(self) -> None:
        assert self._tmp_path is not None
        try:
            self._check_out_path()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp_path, 0o666 & ~umask)
            os.replace(self._tmp_path, self.out_path)
        finally:
            self._remove_tmp()

    # -- public API ------------------------------------------------------------------------
    def set_classes(self, names: Sequence[str]) -> None:
        """Set the class names: label k (k >= 1) is ``names[k-1]``; 0 is unlabeled."""
        if self._counts and any("semseg" in keys for keys in self._keys.values()):
            raise MmtkError("set the class names before the first frame with labels")
        self.classes = list(names)

    @property
    def frame_counts(self) -> dict[str, int]:
        """Frames written so far, per split."""
        return dict(self._counts)

    def add_frame(self, split: str, rgb: np.ndarray, depth: np.ndarray, depth_raw: np.ndarray | None = None,
                  semseg: np.ndarray | None = None, intrinsics: np.ndarray | None = None,
                  timestamp: float | None = None, frame_id: str | None = None) -> None:
        """Append one frame to ``split``.

        Args:
            split: "train", "test" or "all".
            rgb: uint8 [H, W, 3].
            depth: float32 [H, W] metres, 0 = invalid (NaN/inf are turned into 0).
            depth_raw: optional float32 [H, W] metres (unfilled sensor depth), same convention.
            semseg: optional uint8/uint16 [H, W], 0 = unlabeled, values <= len(classes).
            intrinsics: optional [3, 3] pixels, 0-based principal point.
            timestamp: optional seconds.
            frame_id: optional name of the frame (provenance).
        Every frame of a split must provide the same set of fields with the same image size.
        """
        if self._file is None:
            raise RuntimeError("H5Writer.add_frame called outside its `with` block")
        if split not in SPLIT_NAMES:
            raise MmtkError(f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
        frame = self._validated(rgb=rgb, depth=depth, depth_raw=depth_raw, semseg=semseg,
                                intrinsics=intrinsics, timestamp=timestamp, frame_id=frame_id)
        keys = tuple(sorted(frame))
        if split not in self._counts:
            self._create_split(split, frame)
        elif keys != self._keys[split]:
            missing = sorted(set(self._keys[split]) ^ set(keys))
            name = frame_id or f"#{self._counts[split]}"
            raise MmtkError(f"frame {name} in split {split!r} differs from the split's first frame in "
                            f"{', '.join(missing)}; every frame of a split needs the same modalities")
        group = self._file[split]
        index = self._counts[split]
        expected = group["rgb"].shape[1:3]
        for key in keys:
            value = frame[key]
            if key in IMAGE_DATASETS and value.shape[:2] != expected:
                raise MmtkError(f"frame {frame_id or index}: {key} is {value.shape[0]}x{value.shape[1]} but the "
                                f"split's images are {expected[0]}x{expected[1]}; convert with --size HxW")
        for key in keys:
            dataset = group[key]
            dataset.resize(index + 1, axis=0)
            dataset[index] = frame[key]
        self._update_stats(split, frame)
        self._counts[split] = index + 1

    # -- internals -------------------------------------------------------------------------
    def _validated(self, **fields: object) -> dict[str, np.ndarray | float | str]:
        frame: dict[str, np.ndarray | float | str] = {}
        rgb = np.asarray(fields["rgb"])
        _check_image("rgb", rgb, (np.uint8,), 3)
        if rgb.shape[2] != 3:
            raise MmtkError(f"rgb has {rgb.shape[2]} channels, expected 3")
        frame["rgb"] = rgb
        for key in ("depth", "depth_raw"):
            if fields[key] is None:
                continue
            depth = np.asarray(fields[key])
            _check_image(key, depth, (np.float32, np.float64), 2)
            depth = np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            depth[depth < 0] = 0.0
            _check_plausible_metres(key, depth, fields["frame_id"])
            frame[key] = depth
        if fields["semseg"] is not None:
            frame["semseg"] = self._validated_labels(np.asarray(fields["semseg"]), fields["frame_id"])
        if fields["intrinsics"] is not None:
            k = np.asarray(fields["intrinsics"], dtype=np.float32)
            if k.shape != (3, 3):
                raise MmtkError(f"intrinsics have shape {k.shape}, expected 3x3")
            frame["intrinsics"] = k
        if fields["timestamp"] is not None:
            frame["timestamp"] = float(fields["timestamp"])  # type: ignore[arg-type]
        if fields["frame_id"] is not None:
            frame["frame_id"] = str(fields["frame_id"])
        return frame

    def _validated_labels(self, labels: np.ndarray, frame_id: object) -> np.ndarray:
        _check_image("semseg", labels, (np.uint8, np.uint16, np.int32, np.int64, np.uint32), 2)
        if self.classes is None:
            raise MmtkError("semseg given but no class names; call set_classes(names) first")
        top = int(labels.max(initial=0))
        if labels.min(initial=0) < 0 or top > len(self.classes):
            raise MmtkError(f"frame {frame_id}: label {top} is beyond the {len(self.classes)}-class map "
                            f"(labels must be 0..{len(self.classes)}); pick the matching --classes")
        return labels.astype(self._label_dtype())

    def _label_dtype(self) -> type:
        return np.uint8 if self.classes is not None and len(self.classes) < 256 else np.uint16

    def _create_split(self, split: str, frame: dict) -> None:
        assert self._file is not None
        group = self._file.create_group(split)
        height, width = frame["rgb"].shape[:2]
        for key, value in frame.items():
            if key == "frame_id":
                dataset = group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                               chunks=(1024,))
            elif key == "timestamp":
                dataset = group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=np.float64,
                                               chunks=(1024,))
            else:
                shape = value.shape
                dataset = group.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape),
                                               dtype=value.dtype, chunks=(1, *shape), compression=self.compression)
            if key in UNITS:
                dataset.attrs["units"] = UNITS[key]
        if "semseg" in frame:
            group["semseg"].attrs["classes"] = json.dumps(self.classes)
        group.attrs["image_size"] = (height, width)
        self._counts[split] = 0
        self._keys[split] = tuple(sorted(frame))
        stats = _SplitStats()
        if "semseg" in frame:
            stats.histogram = np.zeros(len(self.classes) + 1, dtype=np.int64)  # type: ignore[arg-type]
        self._stats[split] = stats

    def depth_summary(self) -> tuple[tuple[float, float], float]:
        """((min, max) metres over valid pixels, valid fraction) of ``depth`` over every frame written so far."""
        stats = [s for s in self._stats.values() if "depth" in s.depth_total]
        valid = sum(s.depth_valid["depth"] for s in stats)
        total = sum(s.depth_total["depth"] for s in stats)
        low = min((s.depth_min["depth"] for s in stats if "depth" in s.depth_min), default=0.0)
        high = max((s.depth_max["depth"] for s in stats if "depth" in s.depth_max), default=0.0)
        return (low, high), valid / max(total, 1)

    def _update_stats(self, split: str, frame: dict) -> None:
        stats = self._stats[split]
        for key in ("depth", "depth_raw"):
            if key not in frame:
                continue
            depth = frame[key]
            valid = depth[depth > 0]
            stats.depth_valid[key] = stats.depth_valid.get(key, 0) + valid.size
            stats.depth_total[key] = stats.depth_total.get(key, 0) + depth.size
            if valid.size:
                stats.depth_min[key] = min(stats.depth_min.get(key, np.inf), float(valid.min()))
                stats.depth_max[key] = max(stats.depth_max.get(key, 0.0), float(valid.max()))
        if stats.histogram is not None:
            stats.histogram += np.bincount(frame["semseg"].ravel(), minlength=stats.histogram.size)

    def _finish(self) -> None:
        assert self._file is not None
        if not self._counts:
            raise MmtkError(f"no frames were written for {self.out_path}; the source holds no usable RGB-D pairs")
        for split, stats in self._stats.items():
            group = self._file[split]
            for key, total in stats.depth_total.items():
                group[key].attrs["valid_fraction"] = stats.depth_valid[key] / max(total, 1)
                group[key].attrs["min_m"] = stats.depth_min.get(key, 0.0)
                group[key].attrs["max_m"] = stats.depth_max.get(key, 0.0)
            if stats.histogram is not None:
                group["semseg"].attrs["histogram"] = stats.histogram


def _check_plausible_metres(key: str, depth: np.ndarray, frame_id: object) -> None:
    valid = depth[depth > 0]
    if valid.size == 0:
        return
    median = float(np.median(valid[:: max(1, valid.size // 20000)]))
    if median > MAX_PLAUSIBLE_MEDIAN_DEPTH_M:
        raise MmtkError(f"frame {frame_id}: {key} median is {median:.0f} m, which looks like millimetres given as "
                        f"metres; pass --depth-scale 1000 (units per metre)")

