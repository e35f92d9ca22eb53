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

from mmtk.data.codecs import FrameReader, frame_reader, frame_shape
from mmtk.modality import Modality, get_modality, list_modalities
from mmtk.data.format import is_image, open_mmtk_file
from mmtk.data.transforms import CropWindow, full_window, random_resized_crop
from mmtk.errors import MmtkError


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
