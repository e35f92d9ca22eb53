"""The mmtk HDF5 dataset format (version :data:`FORMAT_VERSION`): its atomic writer, and opening a file to read it.

Every reader (the loader, sources, ``mmtk info``/``check``/``index``) opens a file with :func:`open_mmtk_file`,
which refuses, in one line, a file that is not mmtk's, is newer, or declares more than it stores
(:func:`check_declared_sizes`); :func:`check_dataset_size` bounds any HDF5 dataset, an input's too (NYUv2's .mat).

Layout (documented in ``docs/dataset-format.md``)::

    /                 attrs: mmtk_format (int), source (str), created (ISO 8601 str)
    /<split>/         one group per split: "train", "test", or "all"; attr image_size (H, W)
        <array>       one dataset per stored array of a modality adapter, kept by its codec
                      (:mod:`mmtk.data.codecs`): rgb as one JPEG (as received) or QOI image per frame; depth
                      as the source's integers with attr scale (integers per metre) or float32 metres, 0 =
                      invalid; semseg uint8|uint16, 0 = unlabeled, attr classes (JSON list); a plugin's arrays
        intrinsics    float32 [N, 3, 3]   pixels, 0-based principal point (optional)
        timestamp     float64 [N]         seconds                        (optional)
        frame_id      str     [N]                                        (optional)

What each array holds is declared by the adapter that stores it (:class:`mmtk.modality.StoredArray`):
its dtype, units (the ``units`` attr), kind and codec. Arrays are chunked one frame per chunk with a fletcher32
checksum per chunk, encoded images carry a CRC-32 each (a flipped byte fails the read). Metric arrays
(depth) carry summary statistics (``valid_fraction``, ``min_m``, ``max_m``, ``p01_m``, ``median_m``,
``p99_m``) and label arrays a ``histogram``, so that ``mmtk info`` never has to scan the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Mapping, Sequence

import h5py
import numpy as np

from mmtk.data.codecs import (ARRAY_CODECS, CODEC_ATTR, DTYPE_ATTR, SCALE_ATTR, SHAPE_ATTR, FrameArray, Storage,
                              frame_dtype, frame_shape, is_bytes, plain, record_element, storage_for)
from mmtk.modality import StoredArray, stored_array
from mmtk.errors import MmtkError
from mmtk.data.values import intrinsics_problem
from mmtk.io import check_writable, discard, disk_error, disk_errors, format_bytes, make_temp, publish

FORMAT_VERSION = 2
"""Integer written to the root attr ``mmtk_format``; bumped on incompatible changes. Version 2 keeps arrays by
their codec (:mod:`mmtk.data.codecs`); readers read version 1 files (plain arrays) unchanged."""

SPLIT_NAMES = ("train", "test", "all")
PARTIAL_SUFFIX = ".partial"  # a dataset `mmtk pseudo-label` is still writing (resumable), renamed when complete
PREDICTED_ATTR = "model"  # on an array a network predicted: that network (`mmtk pseudo-label` sets it)
META_UNITS = {"intrinsics": "px", "timestamp": "s"}
# Per-frame metadata (intrinsics, timestamp, frame_id) is buffered and written this many frames at a time: a write of
# a few bytes costs as much HDF5 work (resize, selection, chunk lookup) as a frame of pixels, about 0.5 ms each
# (benchmarks/bench_convert.py). It is also the chunk length of timestamp and frame_id, so a block fills whole chunks.
META_BLOCK = 1024
SAMPLES_PER_FRAME = 2000  # valid values kept per frame and metric array for the stored percentiles
MAX_SAMPLES = 400_000


@dataclass
class MetricStats:
    """Running statistics of one metric array in one split, stored as attrs at close."""

    valid: int = 0
    total: int = 0
    low: float = np.inf
    high: float = 0.0
    samples: list[np.ndarray] = field(default_factory=list)
    kept: int = 0

    def update(self, values: np.ndarray) -> None:
        valid = values[values > 0]
        self.valid += valid.size
        self.total += values.size
        if valid.size:
            self.low, self.high = min(self.low, float(valid.min())), max(self.high, float(valid.max()))
            if self.kept < MAX_SAMPLES:
                sample = valid[:: max(1, valid.size // SAMPLES_PER_FRAME)].copy()  # not a view keeping the frame
                self.samples.append(sample)
                self.kept += sample.size

    def merge(self, other: "MetricStats") -> None:
        """Add another split's statistics to these."""
        self.valid, self.total = self.valid + other.valid, self.total + other.total
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.samples += other.samples
        self.kept += other.kept

    def attrs(self) -> dict[str, float]:
        values = np.concatenate(self.samples) if self.samples else np.zeros(1, np.float32)
        p01, median, p99 = (float(v) for v in np.percentile(values, [1, 50, 99]))
        return {"valid_fraction": self.valid / max(self.total, 1), "min_m": self.low if self.valid else 0.0,
                "max_m": self.high, "p01_m": p01, "median_m": median, "p99_m": p99}


def check_out_path(path: str | os.PathLike, force: bool) -> None:
    """An output file must end in .h5/.hdf5 and may replace an existing file only with ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise MmtkError(f"{path} already exists; add --force to overwrite it")
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise MmtkError(f"output {path} should end in .h5 or .hdf5")
    check_writable(path)


class H5Writer:
    """Write an mmtk HDF5 dataset atomically, one frame at a time (memory stays bounded).

    Use it as a context manager. Frames go to a temporary file beside ``out_path``, which is
    renamed to ``out_path`` only when the ``with`` block ends without an exception; on error the
    temporary file is deleted, so a partial file never sits under the final name. An existing
    ``out_path`` is refused unless ``force=True``. Image arrays are written in :meth:`add_frame`; per-frame
    metadata (intrinsics, timestamp, frame_id) :data:`META_BLOCK` frames at a time and at the end, so the
    temporary file's metadata lags its images until then (it is never published before).

    Each array is kept by the codec its adapter declares (:mod:`mmtk.data.codecs`), losslessly; an array given
    as :class:`~mmtk.data.codecs.Encoded` bytes (a JPEG) is stored as those bytes, one given as
    :class:`~mmtk.data.codecs.Quantized` integers as those integers with their scale. ``jpeg_quality`` (1-100)
    stores raw 8-bit colour as JPEG instead: smaller, lossy, never the default.

    Example::

        with H5Writer("out.h5", source="my camera") as w:
            w.set_classes(["wall", "floor"])
            w.add_frame("train", {"rgb": rgb, "depth": depth_m, "semseg": labels}, frame_id="0001")
    """

    def __init__(self, out_path: str | os.PathLike, source: str, force: bool = False,
                 classes: Sequence[str] | None = None, jpeg_quality: int | None = None) -> None:
        if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
            raise MmtkError(f"--jpeg-quality {jpeg_quality} is not 1..100; omit it to store colour losslessly")
        self.out_path = Path(out_path)
        self.jpeg_quality = jpeg_quality
        self.source = source
        self.force = force
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self._file: h5py.File | None = None
        self._tmp_path: Path | None = None
        self._counts: dict[str, int] = {}
        self._metric: dict[str, dict[str, MetricStats]] = {}
        self._histograms: dict[str, dict[str, np.ndarray]] = {}
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}  # split -> field -> its dataset
        self._storage: dict[str, dict[str, Storage]] = {}  # split -> array -> how it is kept
        self._image_size: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, dict[str, list]] = {}  # split -> metadata field -> values not yet written

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "H5Writer":
        self._check_out_path()
        self._tmp_path = make_temp(self.out_path)
        try:
            with disk_errors(self.out_path):
                # No chunk cache: each frame (one chunk) is written in add_frame, so a full disk raises
                # there instead of in a destructor, where HDF5 cannot report it and may crash the process.
                self._file = h5py.File(self._tmp_path, "w", rdcc_nbytes=0)
                self._file.attrs["mmtk_format"] = FORMAT_VERSION
                self._file.attrs["source"] = self.source
                self._file.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        except BaseException:
            self._close()
            self._remove_tmp()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        succeeded = exc_type is None
        try:
            with disk_errors(self.out_path):
                if succeeded:
                    self._finish()
                self._close(raise_errors=succeeded)
        except BaseException:
            succeeded = False
            raise
        finally:
            if not succeeded:
                self._close()
                self._remove_tmp()
        if succeeded:
            self._publish()
        elif exc is not None and (translated := disk_error(exc, self.out_path)) is not None:
            raise translated from exc

    def _close(self, raise_errors: bool = False) -> None:
        """Close the HDF5 file; a close that fails (e.g. a full disk) leaves nothing open behind."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except Exception:
            if raise_errors:
                raise

    def _check_out_path(self) -> None:
        check_out_path(self.out_path, self.force)

    def _remove_tmp(self) -> None:
        discard(self._tmp_path)

    def _publish(self) -> None:
        assert self._tmp_path is not None
        try:
            self._check_out_path()
            publish(self._tmp_path, self.out_path)
        finally:
            self._remove_tmp()

    # -- public API ------------------------------------------------------------------------
    def set_classes(self, names: Sequence[str]) -> None:
        """Set the class names of label arrays: label k (k >= 1) is ``names[k-1]``; 0 is unlabeled."""
        if any(self._histograms.values()):  # a split has a label array
            raise MmtkError("set the class names before the first frame with labels")
        self.classes = list(names)

    @property
    def frame_counts(self) -> dict[str, int]:
        """Frames written so far, per split."""
        return dict(self._counts)

    def add_frame(self, split: str, arrays: Mapping[str, FrameArray], intrinsics: np.ndarray | None = None,
                  timestamp: float | None = None, frame_id: str | None = None) -> None:
        """Append one frame to ``split``.

        Args:
            split: "train", "test" or "all".
            arrays: stored array name -> array, e.g. ``{"rgb": uint8 [H, W, 3], "depth": float32 [H, W] m}``,
                or :class:`~mmtk.data.codecs.Encoded` / :class:`~mmtk.data.codecs.Quantized` as the source got
                it. Each name must be stored by a registered modality adapter, which validates it
                (:meth:`mmtk.modality.Modality.check_stored`); all have the same H x W.
            intrinsics: optional [3, 3] pixels, 0-based principal point.
            timestamp: optional seconds.
            frame_id: optional name of the frame (provenance).
        Every frame of a split must provide the same set of fields with the same image size.
        """
        if self._file is None:
            raise RuntimeError("H5Writer.add_frame called outside its `with` block")
        if split not in SPLIT_NAMES:
            raise MmtkError(f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
        name = frame_id if frame_id is not None else f"#{self._counts.get(split, 0)} of {split}"
        frame, kinds = self._validated(arrays, intrinsics, timestamp, frame_id, name)
        if split not in self._counts:
            self._create_split(split, frame, kinds, arrays)
        elif set(frame) != set(self._datasets[split]):
            missing = sorted(set(self._datasets[split]) ^ set(frame))
            raise MmtkError(f"frame {name} in split {split!r} differs from the split's first frame in "
                            f"{', '.join(missing)}; every frame of a split needs the same modalities")
        index = self._counts[split]
        expected = self._image_size[split]
        for key in kinds:
            if frame[key].shape[:2] != expected:
                raise MmtkError(f"frame {name}: {key} is {frame[key].shape[0]}x{frame[key].shape[1]} but the "
                                f"split's images are {expected[0]}x{expected[1]}; convert with --size HxW")
        elements = {key: self._storage[split][key].element(arrays[key], frame[key], f"frame {name}: {key}")
                    for key in kinds}
        for key, (element, codec) in elements.items():
            dataset = self._datasets[split][key]
            dataset.resize(index + 1, axis=0)
            dataset[index] = element
            if self._storage[split][key].as_bytes:
                record_element(dataset, element, codec)
        pending = self._pending[split]
        for key, values in pending.items():
            values.append(frame[key])
        self._update_stats(split, frame, kinds)
        self._counts[split] = index + 1
        if len(next(iter(pending.values()), ())) >= META_BLOCK:
            self._write_pending(split)

    def metric_summary(self) -> dict[str, dict[str, float]]:
        """Per metric array (depth, ...) over every split written so far: valid fraction, min, median, max (m)."""
        merged: dict[str, MetricStats] = {}
        for stats in self._metric.values():
            for key, part in stats.items():
                merged.setdefault(key, MetricStats()).merge(part)
        return {key: stats.attrs() for key, stats in merged.items()}

    # -- internals -------------------------------------------------------------------------
    def _validated(self, arrays: Mapping[str, FrameArray], intrinsics: object, timestamp: object,
                   frame_id: object, name: str) -> tuple[dict[str, np.ndarray | float | str], dict[str, str]]:
        """The frame's fields as numbers (encoded images decoded, integers in units), each array checked by its
        adapter; and each array's kind."""
        if not arrays:
            raise MmtkError(f"frame {name} has no image arrays")
        frame: dict[str, np.ndarray | float | str] = {}
        kinds: dict[str, str] = {}
        for key, value in arrays.items():
            if key in ("intrinsics", "timestamp", "frame_id"):
                raise MmtkError(f"frame {name}: {key!r} is frame metadata, not an array; pass it as {key}=")
            owner, stored = stored_array(key)
            try:
                numbers = plain(value)  # encoded bytes a source handed over are decoded (and so checked) here
            except MmtkError as err:
                raise MmtkError(f"frame {name}: {key}: {err}") from None
            array = owner().check_stored(stored, numbers, name)
            if stored.kind == "labels":  # stored in the smallest dtype the class count needs
                frame[key] = self._validated_labels(stored, array, name)
            else:
                frame[key] = array.astype(stored.dtype, copy=False)
            kinds[key] = stored.kind
        first, (height, width) = next(iter(frame)), next(iter(frame.values())).shape[:2]  # type: ignore[union-attr]
        for key, value in frame.items():
            if value.shape[:2] != (height, width):  # type: ignore[union-attr]
                raise MmtkError(f"frame {name}: {first} is {height}x{width} but {key} is {value.shape[0]}x"  # type: ignore[union-attr]
                                f"{value.shape[1]}; the images of a frame must be registered at the same size")
        if intrinsics is not None:
            k = np.asarray(intrinsics, dtype=np.float32)
            if k.shape != (3, 3):
                raise MmtkError(f"frame {name}: intrinsics have shape {k.shape}, expected 3x3")
            if (problem := intrinsics_problem(k)) is not None:
                raise MmtkError(f"frame {name}: {problem}; give the camera's calibrated intrinsics or none")
            frame["intrinsics"] = k
        if timestamp is not None:
            frame["timestamp"] = float(timestamp)  # type: ignore[arg-type]
        if frame_id is not None:
            frame["frame_id"] = str(frame_id)
        return frame, kinds

    def _validated_labels(self, stored: StoredArray, labels: np.ndarray, name: str) -> np.ndarray:
        if self.classes is None:
            raise MmtkError(f"{stored.name} given but no class names; call set_classes(names) first")
        top = int(labels.max(initial=0))
        if labels.min(initial=0) < 0 or top > len(self.classes):
            raise MmtkError(f"frame {name}: label {top} is beyond the {len(self.classes)}-class map "
                            f"(labels must be 0..{len(self.classes)}); pick the matching --classes")
        return labels.astype(np.uint8 if len(self.classes) < 256 else np.uint16)

    def _create_split(self, split: str, frame: dict, kinds: dict[str, str], arrays: Mapping[str, FrameArray]) -> None:
        assert self._file is not None
        group = self._file.create_group(split)
        self._datasets[split] = {}
        self._storage[split] = {key: storage_for(stored_array(key)[1], arrays[key], frame[key], self.jpeg_quality)
                                for key in kinds}
        for key, value in frame.items():
            if key == "frame_id":
                dataset = group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                               chunks=(META_BLOCK,))
            elif key == "timestamp":
                dataset = group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=np.float64,
                                               chunks=(META_BLOCK,))
            elif key in kinds:
                dataset = self._storage[split][key].create(group, key)
            else:
                shape = value.shape
                dataset = group.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape),
                                               dtype=value.dtype, chunks=(1, *shape),
                                               fletcher32=True)  # checksums: flipped bytes fail to read
            dataset.attrs["units"] = stored_array(key)[1].units if key in kinds else META_UNITS.get(key, "")
            if kinds.get(key) == "labels":
                dataset.attrs["classes"] = json.dumps(self.classes)
            self._datasets[split][key] = dataset
        self._image_size[split] = next(frame[key].shape[:2] for key in kinds)
        group.attrs["image_size"] = self._image_size[split]
        self._pending[split] = {key: [] for key in frame if key not in kinds}
        self._counts[split] = 0
        self._metric[split] = {key: MetricStats() for key, kind in kinds.items() if kind == "metric"}
        self._histograms[split] = {key: np.zeros(len(self.classes) + 1, dtype=np.int64)  # type: ignore[arg-type]
                                   for key, kind in kinds.items() if kind == "labels"}

    def _update_stats(self, split: str, frame: dict, kinds: dict[str, str]) -> None:
        for key, stats in self._metric[split].items():
            stats.update(frame[key])
        for key, histogram in self._histograms[split].items():
            histogram += np.bincount(frame[key].ravel(), minlength=histogram.size)

    def _write_pending(self, split: str) -> None:
        """Append the buffered metadata of ``split`` to its datasets, which then hold every frame written."""
        for key, values in self._pending[split].items():
            if values:
                dataset = self._datasets[split][key]
                start = dataset.shape[0]
                dataset.resize(start + len(values), axis=0)
                dataset[start:] = np.array(values, dtype=dataset.dtype)
                values.clear()

    def _finish(self) -> None:
        assert self._file is not None
        if not self._counts:
            raise MmtkError(f"no frames were written for {self.out_path}; the source holds no usable frames")
        for split in self._counts:
            self._write_pending(split)
            group = self._file[split]
            for key, stats in self._metric[split].items():
                if not stats.valid:  # every value 0, NaN, negative or saturated: a file that looks complete but is not
                    raise MmtkError(f"no frame of split {split!r} has a valid {key} value ({self._counts[split]} "
                                    f"frames, each all 0, NaN, negative or saturated); {self.out_path} was not "
                                    f"written: check the source's {key} (its files, topic or units)")
                group[key].attrs.update(stats.attrs())
            for key, histogram in self._histograms[split].items():
                group[key].attrs["histogram"] = histogram


# -- opening a file: what a reader may trust before reading a frame -----------------------------------------

def open_mmtk_file(path: str | os.PathLike) -> h5py.File:
    """Open an mmtk HDF5 file read-only, with a clear error if it is missing, corrupt or not mmtk."""
    path = Path(path)
    if not path.is_file():
        raise MmtkError(f"{path} does not exist; create it with `mmtk convert`")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        if is_locked_error(err):
            raise MmtkError(f"{path} is in use: another process has it open for writing (HDF5 file lock); wait "
                            f"for that process to finish or close the file, then retry") from None
        raise MmtkError(f"{path} is not a readable HDF5 file ({str(err).split(';')[0]}); re-create it with "
                        f"`mmtk convert`") from None
    version = handle.attrs.get("mmtk_format")
    if version is None:
        handle.close()
        raise MmtkError(f"{path} is HDF5 but not an mmtk dataset (no mmtk_format attr); convert the source "
                        f"with `mmtk convert`")
    if int(version) > FORMAT_VERSION:
        handle.close()
        raise MmtkError(f"{path} has mmtk_format {int(version)}, newer than this mmtk ({FORMAT_VERSION}); "
                        f"upgrade mmtk")
    try:
        check_declared_sizes(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def is_locked_error(err: OSError) -> bool:
    """Whether opening an HDF5 file failed on HDF5's file lock (another process writes it), not on its bytes."""
    return isinstance(err, BlockingIOError) or "unable to lock file" in str(err)


MAX_IMAGE_SIDE = 16384  # px; also bounds every non-frame axis of a stored dataset
MAX_FRAME_BYTES = 2**30  # one frame of one dataset (a 16384x16384 float32 depth map)
MAX_COMPRESSION_RATIO = 2048  # gzip cannot exceed about 1032:1; declared bytes beyond this are not in the file
UNSTORED_SLACK_BYTES = 2**20  # small datasets HDF5 has not allocated yet (e.g. an empty contiguous one)
MAX_MEMBERS = 256  # groups and datasets per group: an mmtk file has a few splits of a few datasets


def check_declared_sizes(handle: h5py.File, path: str | os.PathLike) -> None:
    """Refuse, in one line and before anything is read, datasets whose declared size the file cannot back.

    HDF5 lets a file of a few KB declare any shape (unwritten chunks read as the fill value), so
    memory would follow the declaration. Every dataset of every split must: live inside the file (no
    external, virtual or linked storage), have a frame (one index along axis 0) of at most
    :data:`MAX_FRAME_BYTES` with axes up to :data:`MAX_IMAGE_SIDE`, and declare at most
    :data:`MAX_COMPRESSION_RATIO` times the bytes it stores (arrays behind a format-2 codec: a chunk for every
    frame it declares). Labels must be 8- or 16-bit unsigned. Only metadata is read.
    """
    fix = "re-create the file with `mmtk convert`"
    for group_name, group in _members(handle, path, "/"):
        if not isinstance(group, h5py.Group):
            continue
        for name, dataset in _members(group, path, f"/{group_name}/"):
            where = f"{path}:/{group_name}/{name}"
            if not isinstance(dataset, h5py.Dataset):
                raise MmtkError(f"{where} is a {type(dataset).__name__}, not a dataset; {fix}")
            check_dataset_size(dataset, where, fix, backed=not name.endswith(PARTIAL_SUFFIX))
            _check_layout(name.removesuffix(PARTIAL_SUFFIX), dataset, where, fix)
            _check_summaries(dataset, where, fix)


def check_dataset_size(dataset: h5py.Dataset, where: str, fix: str, backed: bool = True) -> None:
    """One HDF5 dataset (an mmtk file's or an input's, e.g. NYUv2's .mat) can be read frame by frame: its data
    lives in the file, a frame (one index along axis 0) is at most :data:`MAX_FRAME_BYTES` with axes up to
    :data:`MAX_IMAGE_SIDE`, and, when ``backed``, it declares at most :data:`MAX_COMPRESSION_RATIO` times the
    bytes it stores. Only metadata is read."""
    if dataset.is_virtual or dataset.id.get_create_plist().get_external_count():
        raise MmtkError(f"{where} keeps its data outside the file (virtual or external storage); "
                        f"mmtk reads data held inside; {fix}")
    shape, itemsize = dataset.shape or (), dataset.dtype.itemsize
    # a byte dataset (one encoded image per element) declares its images in attrs; its elements are references
    _check_frames(*(_declared_frames(dataset, where, fix) if is_bytes(dataset) else (shape, itemsize)), where, fix)
    if backed and str(dataset.attrs.get(CODEC_ATTR, "")) in ARRAY_CODECS and dataset.chunks and dataset.chunks[0] == 1:
        held = dataset.id.get_num_chunks()  # compressed frames have no bounded byte ratio: count their chunks
        if shape[0] > held * MAX_COMPRESSION_RATIO + 1:
            raise MmtkError(f"{where} declares {shape[0]} frames but the file stores {held}; the file is truncated "
                            f"or forged; {fix}")
        return
    declared = float(np.prod(shape, dtype=np.float64)) * itemsize
    stored = dataset.id.get_storage_size()
    if backed and declared > stored * MAX_COMPRESSION_RATIO + UNSTORED_SLACK_BYTES:
        raise MmtkError(f"{where} declares {format_bytes(declared)} (shape {shape}) but the file stores "
                        f"{format_bytes(stored)} of it; the file is truncated or forged; {fix}")


def _declared_frames(dataset: h5py.Dataset, where: str, fix: str) -> tuple[tuple[int, ...], int]:
    """(N, *frame shape) and the decoded itemsize a byte dataset declares in its attrs, or a one-line MmtkError."""
    try:
        shape = tuple(int(v) for v in np.asarray(dataset.attrs[SHAPE_ATTR]).ravel())
        itemsize = np.dtype(str(dataset.attrs[DTYPE_ATTR])).itemsize
    except (KeyError, TypeError, ValueError):
        raise MmtkError(f"{where} holds encoded images without valid {SHAPE_ATTR}/{DTYPE_ATTR} attrs; {fix}") from None
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise MmtkError(f"{where}: attr {SHAPE_ATTR} {list(shape)} is not [H, W] or [H, W, C]; {fix}")
    return (dataset.shape[0], *shape), itemsize


def _check_frames(shape: tuple[int, ...], itemsize: int, where: str, fix: str) -> None:
    """A frame (one index along axis 0) of at most MAX_IMAGE_SIDE a side and MAX_FRAME_BYTES."""
    if any(side > MAX_IMAGE_SIDE for side in shape[1:]):
        raise MmtkError(f"{where} declares shape {shape}: axes beyond {MAX_IMAGE_SIDE} px are implausible; {fix}")
    frame_bytes = int(np.prod(shape[1:], dtype=np.float64)) * itemsize
    if frame_bytes > MAX_FRAME_BYTES:
        raise MmtkError(f"{where} declares {format_bytes(frame_bytes)} per frame (shape {shape}), over "
                        f"the {format_bytes(MAX_FRAME_BYTES)} limit; {fix}")


def _check_summaries(dataset: h5py.Dataset, where: str, fix: str) -> None:
    """The writer's summary attrs, where present, have their documented types (``mmtk info`` shows them)."""
    attrs = dataset.attrs
    for key in ("valid_fraction", "min_m", "max_m", SCALE_ATTR):
        if key in attrs and not (np.ndim(attrs[key]) == 0 and np.issubdtype(np.asarray(attrs[key]).dtype, np.number)):
            raise MmtkError(f"{where}: attr {key} is {attrs[key]!r}, expected a number; {fix}")
    if SCALE_ATTR in attrs and not 0 < float(attrs[SCALE_ATTR]) < np.inf:
        raise MmtkError(f"{where}: attr {SCALE_ATTR} is {attrs[SCALE_ATTR]!r}, expected integers per unit > 0; {fix}")
    if "histogram" in attrs:
        histogram = np.asarray(attrs["histogram"])
        if histogram.ndim != 1 or not np.issubdtype(histogram.dtype, np.integer):
            raise MmtkError(f"{where}: attr histogram is not a list of pixel counts; {fix}")
    if "classes" in attrs:
        try:
            classes = json.loads(attrs["classes"])
        except (TypeError, ValueError):
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise MmtkError(f"{where}: attr classes is not a JSON list of class names; {fix}")


# (ndim, trailing axes, allowed dtype kinds or dtypes) of the per-frame metadata every mmtk file may hold.
_META_LAYOUTS: dict[str, tuple[int, tuple[int, ...], tuple]] = {
    "intrinsics": (3, (3, 3), ("f",)),
    "timestamp": (1, (), ("f",)),
}
_KIND_DTYPES = {"metric": ("f",), "labels": (np.uint8, np.uint16)}  # as the writer stores them
_QUANTIZED_DTYPES = (np.uint8, np.uint16, np.uint32)  # metric arrays kept as the source's integers (attr scale)


def _layout(name: str) -> tuple[int, tuple[int, ...], tuple] | None:
    """The documented layout of a dataset: metadata's, or what the adapter storing it declares (None: unknown)."""
    if name in _META_LAYOUTS:
        return _META_LAYOUTS[name]
    try:
        _, stored = stored_array(name)
    except MmtkError:
        return None  # an array of a plugin that is not loaded, or another tool's: not checked
    trailing = (stored.channels,) if stored.channels else ()
    return 3 + len(trailing), trailing, _KIND_DTYPES.get(stored.kind, tuple(np.dtype(d) for d in stored.dtypes))


def _check_layout(name: str, dataset: h5py.Dataset, where: str, fix: str) -> None:
    """A known dataset must have its documented number of axes and dtype (docs/dataset-format.md)."""
    layout = _layout(name)
    if layout is None:
        return
    ndim, trailing, dtypes = layout
    shape, dtype = dataset.shape or (), dataset.dtype
    if is_bytes(dataset):
        shape, dtype = (shape[0], *frame_shape(dataset)), frame_dtype(dataset)
    elif SCALE_ATTR in dataset.attrs:
        dtypes = tuple(np.dtype(d) for d in _QUANTIZED_DTYPES)
    if len(shape) != ndim or (trailing and tuple(shape[-len(trailing):]) != trailing):
        expected = f"{ndim} axes" + (f" ending in {'x'.join(map(str, trailing))}" if trailing else "")
        raise MmtkError(f"{where} has shape {shape}, expected {expected}; {fix}")
    if not any(dtype == d if not isinstance(d, str) else dtype.kind == d for d in dtypes):
        names = ", ".join(np.dtype(d).name if not isinstance(d, str) else "float" for d in dtypes)
        raise MmtkError(f"{where} has dtype {dtype}, expected {names}; {fix}")


def _members(group: h5py.Group, path: str | os.PathLike, prefix: str) -> list[tuple[str, object]]:
    """(name, object) of a group's members; links to other files and oversized groups are refused."""
    if len(group) > MAX_MEMBERS:
        raise MmtkError(f"{path}:{prefix} has {len(group)} members, over the {MAX_MEMBERS} an mmtk file can "
                        f"have; re-create the file with `mmtk convert`")
    members = []
    for name in group:
        if isinstance(group.get(name, getlink=True), h5py.ExternalLink):
            raise MmtkError(f"{path}:{prefix}{name} links to another file; mmtk files hold their data inside; "
                            f"re-create the file with `mmtk convert`")
        try:
            members.append((name, group[name]))
        except (KeyError, OSError) as err:  # e.g. a soft link to nothing
            raise MmtkError(f"{path}:{prefix}{name} cannot be opened ({err}); re-create the file with "
                            f"`mmtk convert`") from None
    return members


def is_image(name: str, dataset: h5py.Dataset) -> bool:
    """Whether a split's dataset holds a per-frame image (read with :func:`mmtk.data.codecs.read_frame`), not
    per-frame metadata (intrinsics, timestamp, frame_id)."""
    return is_bytes(dataset) or (dataset.ndim >= 3 and name != "intrinsics")
