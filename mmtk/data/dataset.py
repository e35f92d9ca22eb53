"""PyTorch Dataset over one split of an mmtk HDF5 file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from mmtk.modality import Modality, get_modality
from mmtk.data.format import FORMAT_VERSION
from mmtk.data.transforms import CropWindow, full_window, random_resized_crop
from mmtk.errors import MmtkError


def open_mmtk_file(path: str | os.PathLike) -> h5py.File:
    """Open an mmtk HDF5 file read-only, with a clear error if it is missing, corrupt or not mmtk."""
    path = Path(path)
    if not path.is_file():
        raise MmtkError(f"{path} does not exist; create it with `mmtk convert`")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
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
    return handle


class H5Dataset(Dataset):
    """Samples of one split of an mmtk HDF5 file, prepared as the model expects.

    Each item is a dict of tensors, each modality prepared by its adapter (:meth:`Modality.load`), e.g.
    ``rgb`` [3, H, W] ImageNet-normalised; ``depth`` [1, H, W] robustly standardised, with ``depth_valid``
    (bool) and ``depth_m`` (metres, 0 = invalid); ``semseg`` [H/4, W/4] and ``semseg_full`` [H, W] int64,
    0-based classes with 255 = unlabeled. Only the requested modalities appear.

    Args:
        path: the .h5 file.
        split: group name ("train", "test", "all").
        modalities: registered modality names ("rgb", "depth", "semseg", "xyz", a plugin's ...).
        image_size: output (H, W); None keeps the file's size.
        augment: random resized crop + horizontal flip, identical for every modality.
        crop_scale: area fraction range of the random crop.
        hflip: allow horizontal flips when augmenting.
        dataset_map: modality -> stored dataset name, e.g. {"depth": "depth_raw"}.

    Safe with DataLoader workers: every process opens its own file handle on first use.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 modalities: Sequence[str] = ("rgb", "depth", "semseg"),
                 image_size: tuple[int, int] | None = (224, 224), augment: bool = False,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 dataset_map: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.split = split
        self.modalities = tuple(modalities)
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
            self.file_size = tuple(int(v) for v in first.shape[1:3])
            self.classes: list[str] | None = None
            labelled = [name for _, name in self._stored_names() if "classes" in group[name].attrs]
            if labelled:
                import json

                self.classes = json.loads(group[labelled[0]].attrs["classes"])
        self.image_size = tuple(image_size) if image_size is not None else self.file_size
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._open: dict[str, h5py.Dataset] = {}

    def _check(self, handle: h5py.File) -> None:
        if self.split not in handle:
            raise MmtkError(f"{self.path} has no split {self.split!r}; it has {', '.join(handle.keys())}")
        group = handle[self.split]
        sizes = set()
        for modality, name in self._stored_names():
            if name not in group:
                raise MmtkError(f"{self.path}:{self.split} has no dataset {name!r} for {modality}; it has "
                                f"{', '.join(group.keys())}")
            if group[name].ndim >= 3 and name != "intrinsics":
                sizes.add((group[name].shape[0], *group[name].shape[1:3]))
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
        return state

    def _datasets(self) -> dict[str, h5py.Dataset]:
        """This process's open datasets, modality -> h5py.Dataset (opened lazily, once per worker)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open_mmtk_file(self.path)
            self._pid = os.getpid()
            group = self._handle[self.split]
            self._open = {name: group[name] for _, name in self._stored_names()}
        return self._open

    def window(self) -> CropWindow:
        """Crop window for the next sample (random when augmenting, else the full frame)."""
        height, width = self.file_size
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
            stored = datasets[self.dataset_map.get(name, name)]
            return stored[index] if stored.ndim < 3 or name == "intrinsics" else _read_window(stored, index, win)

        sample: dict[str, torch.Tensor] = {}
        for adapter in self.adapters.values():
            sample.update(adapter.load(read, win, self.image_size))
        return sample

    def close(self) -> None:
        """Close this process's file handle (reopened on next access)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._open = {}


def _read_window(dataset: h5py.Dataset, index: int, win: CropWindow) -> np.ndarray:
    out = np.empty((win.height, win.width, *dataset.shape[3:]), dtype=dataset.dtype)
    dataset.read_direct(out, np.s_[index, win.rows, win.cols])
    return out
