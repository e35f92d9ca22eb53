"""PyTorch Dataset over one split of an mmtk HDF5 file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from mmtk.data.codecs import (ARRAY_CODECS, CODEC_ATTR, DTYPE_ATTR, SCALE_ATTR, SHAPE_ATTR, FrameReader, frame_dtype,
                               frame_reader, frame_shape, is_bytes)
from mmtk.modality import Modality, get_modality, list_modalities, stored_array
from mmtk.data.format import FORMAT_VERSION, PARTIAL_SUFFIX
from mmtk.data.transforms import CropWindow, full_window, random_resized_crop
from mmtk.errors import MmtkError
from mmtk.io import format_bytes


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


class H5Dataset(Dataset):
    """Samples of one split of an mmtk HDF5 file, prepared as the model expects.

    Each item is a dict of tensors, each modality prepared by its adapter (:meth:`Modality.load`), e.g.
    ``rgb`` [3, H, W] ImageNet-normalised; ``depth`` [1, H, W] robustly standardised, with ``depth_valid``
    (bool) and ``depth_m`` (metres, 0 = invalid); ``semseg`` [H/4, W/4] and ``semseg_full`` [H, W] int64,
    0-based classes with 255 = unlabeled. Only the requested modalities appear.

    Args:
        path: the .h5 file.
        split: group name ("train", "test", "all").
        modalities: registered modality names ("rgb", "depth", "semseg", "xyz", a plugin's ...); None: every
            registered modality the split stores under its own name.
        image_size: output (H, W); None keeps the file's size.
        augment: random resized crop + horizontal flip (or ``augmentation``), identical for every modality.
        crop_scale: area fraction range of the random crop.
        hflip: allow horizontal flips when augmenting.
        dataset_map: modality -> stored dataset name, e.g. {"depth": "depth_raw"}.
        window: one crop window for every frame (an evaluation protocol's); None: the full frame (or a random
            crop when augmenting).
        augmentation: when augmenting, "random-resized-crop" (the window above, chosen before reading) or a
            whole-frame augmentation of :data:`mmtk.data.augment.AUGMENTATIONS` (e.g. "multimae-depth"), whose
            output is ``image_size``.

    Safe with DataLoader workers: every process opens its own file handle on first use. A folder ``path`` (a
    shard folder, :mod:`mmtk.data.shards`) gives a :class:`~mmtk.data.shards.ShardedDataset` over its shards.
    """

    folder_dataset: type["H5Dataset"] | None = None  # set by mmtk.data.shards (imported with mmtk.data)

    def __new__(cls, path: str | os.PathLike | None = None, *args: object, **kwargs: object) -> "H5Dataset":
        if cls is H5Dataset and path is not None and cls.folder_dataset is not None and Path(path).is_dir():
            return super().__new__(cls.folder_dataset)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 modalities: Sequence[str] | None = None,
                 image_size: tuple[int, int] | None = (224, 224), augment: bool = False,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 dataset_map: Mapping[str, str] | None = None, window: CropWindow | None = None,
                 augmentation: str = "random-resized-crop") -> None:
        self.path = Path(path)
        self.fixed_window = window
        self.split = split
        self.modalities = tuple(modalities) if modalities is not None else self._stored_modalities()
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.dataset_map = {m: m for m in self.modalities}
        self.dataset_map.update(dataset_map or {})
        if not self.modalities:
            raise MmtkError("no modality requested; name at least one registered modality (e.g. rgb)")
        self.adapters: dict[str, Modality] = {m: get_modality(m)() for m in self.modalities}
        with open_mmtk_file(self.path) as handle:
            self._check(handle)
            group = handle[split]
            first = group[next(name for _, name in self._stored_names() if name != "intrinsics")]
            self.length = int(first.shape[0])
            self.file_size = tuple(int(v) for v in frame_shape(first)[:2])
            self.classes: list[str] | None = None
            labelled = [name for _, name in self._stored_names() if "classes" in group[name].attrs]
            if labelled:
                self.classes = json.loads(group[labelled[0]].attrs["classes"])
                for adapter in self.adapters.values():  # lets label adapters refuse ids beyond the file's classes
                    adapter.num_classes = adapter.num_classes or len(self.classes)
            for modality, name in self._stored_names():
                self.adapters[modality].bind_stored(name, dict(group[name].attrs))
        self.image_size = tuple(image_size) if image_size is not None else self.file_size
        self.frame_augmentation = self._frame_augmentation(augmentation) if augment else None
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._open: dict[str, h5py.Dataset] = {}
        self._readers: dict[str, FrameReader] = {}

    def _frame_augmentation(self, name: str):
        """The whole-frame augmentation ``name`` bound to this dataset's arrays; None for the crop window."""
        if name == "random-resized-crop":
            return None
        from mmtk.data.augment import bind_augmentation

        sources = {source: (self.dataset_map.get(source, source), type(adapter).colour)
                   for adapter in self.adapters.values() for source in adapter.reads()}
        return bind_augmentation(name, tuple(self.image_size), sources)

    def _stored_modalities(self) -> tuple[str, ...]:
        """The registered modalities this split stores under their own name, in registry order."""
        with open_mmtk_file(self.path) as handle:
            self._check_split(handle)
            stored = set(handle[self.split])
        return tuple(name for name in list_modalities() if name in stored)

    def _check_split(self, handle: h5py.File) -> None:
        if self.split not in handle:
            raise MmtkError(f"{self.path} has no split {self.split!r}; it has {', '.join(handle.keys())}")

    def _check(self, handle: h5py.File) -> None:
        self._check_split(handle)
        group = handle[self.split]
        sizes = set()
        for modality, name in self._stored_names():
            if name not in group:
                raise MmtkError(f"{self.path}:{self.split} has no dataset {name!r} for {modality}; it has "
                                f"{', '.join(group.keys())}")
            if is_image(name, group[name]):
                sizes.add((group[name].shape[0], *frame_shape(group[name])[:2]))
        if len(sizes) != 1:
            raise MmtkError(f"{self.path}:{self.split}: datasets {list(self.dataset_map.values())} differ in "
                            f"frame count or size {sorted(sizes)}")
        if next(iter(sizes))[0] == 0:
            raise MmtkError(f"{self.path}: split {self.split!r} is empty")

    def _stored_names(self) -> list[tuple[str, str]]:
        """(modality, stored dataset name) for everything this dataset reads."""
        return [(m, self.dataset_map.get(source, source)) for m, adapter in self.adapters.items()
                for source in adapter.reads()]

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None  # h5py handles cannot cross processes; each worker reopens
        state["_pid"] = None
        state["_open"] = {}
        state["_readers"] = {}
        return state

    def _datasets(self) -> dict[str, h5py.Dataset]:
        """This process's open datasets, modality -> h5py.Dataset (opened lazily, once per worker)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open_mmtk_file(self.path)
            self._pid = os.getpid()
            group = self._handle[self.split]
            self._open = {name: group[name] for _, name in self._stored_names()}
            self._readers = {name: frame_reader(d) for name, d in self._open.items() if is_image(name, d)}
        return self._open

    def window(self) -> CropWindow:
        """Crop window for the next sample (random when augmenting, else the full frame)."""
        height, width = self.file_size
        if self.fixed_window is not None:
            return self.fixed_window
        if self.frame_augmentation is not None:  # reads whole frames
            return full_window(height, width)
        if self.augment:
            return random_resized_crop(height, width, scale=self.crop_scale, hflip=self.hflip)
        return full_window(height, width)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        datasets = self._datasets()
        win = self.window()

        def read(name: str) -> np.ndarray:
            """The frame's stored array `name`: per-frame matrices whole, images cropped to the window."""
            key = self.dataset_map.get(name, name)
            reader = self._readers.get(key)
            return reader(index, win.rows, win.cols) if reader is not None else datasets[key][index]

        sample: dict[str, torch.Tensor] = {}
        try:
            if self.frame_augmentation is not None:
                read, win = self.frame_augmentation.read(read), full_window(*self.image_size)
            for adapter in self.adapters.values():
                sample.update(adapter.load(read, win, self.image_size))
        except MmtkError as err:
            raise MmtkError(f"{self.path}:{self.split} frame {index}: {err}") from None
        except OSError as err:  # e.g. a chunk whose checksum no longer matches (flipped bytes)
            raise MmtkError(f"{self.path}:{self.split} frame {index} cannot be read: damaged data or checksum "
                            f"mismatch ({str(err).split(';')[0]}); re-create the file with `mmtk convert`") from None
        return sample

    def close(self) -> None:
        """Close this process's file handle (reopened on next access)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._open = {}
            self._readers = {}


def is_image(name: str, dataset: h5py.Dataset) -> bool:
    """Whether a split's dataset holds a per-frame image (read with :func:`mmtk.data.codecs.read_frame`), not
    per-frame metadata (intrinsics, timestamp, frame_id)."""
    return is_bytes(dataset) or (dataset.ndim >= 3 and name != "intrinsics")
