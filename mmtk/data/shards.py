"""Shard folders: building their index (:func:`write_index`) and loading one as a dataset (:class:`ShardedDataset`).

The folder layout and the reader's side of the index are in :mod:`mmtk.data.shard_index`; :func:`dataset_files`
is re-exported here.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mmtk.data.check import CheckReport, check_file
from mmtk.data.dataset import H5Dataset
from mmtk.data.info import read_info
from mmtk.data.shard_index import (INDEX_NAME, INDEX_VERSION, dataset_files, finished_inputs, read_index, read_plan,
                                   shard_names)
from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text
from mmtk.modality import get_modality, list_modalities

__all__ = ["write_index", "dataset_files", "ShardedDataset", "MAX_OPEN_SHARDS", "check_files"]

MAX_OPEN_SHARDS = 16  # shard files one loader process keeps open (least recently used ones are closed)


def write_index(folder: str | os.PathLike, partial: bool = False, log: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Read every shard of ``folder`` once and write its ``index.json`` atomically; returns the index.

    The shards are the files that `mmtk convert` recorded as finished when the folder has its conversion plan,
    else every ``*.h5``/``*.hdf5`` file in it. Inputs of the plan that are not finished (a machine's part not run
    yet, a failed input) are refused in one line, unless ``partial``: then the finished shards are indexed and
    the rest left out (listed under ``ignored``, so they do not make the index stale).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MmtkError(f"{folder} is not a folder; `mmtk index` takes a folder of mmtk .h5 shards")
    names, ignored = _indexed_names(folder, partial, log)
    if not names:
        raise MmtkError(f"{folder} has no finished .h5 shards to index; convert into it with `mmtk convert`")
    index = _folder_index(folder, [_shard_summary(folder / name) for name in names])
    index["ignored"] = ignored
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return index


def _indexed_names(folder: Path, partial: bool, log: Callable[[str], None] | None) -> tuple[list[str], list[str]]:
    """(shards to index, shard files present but left out) of ``folder``."""
    present = shard_names(folder)
    plan = read_plan(folder)
    if plan is None:  # a folder of shards made by hand
        return present, []
    planned = plan["inputs"]
    finished = finished_inputs(folder)
    missing = [key for key in planned if key not in finished]
    if missing and not partial:
        raise MmtkError(f"{folder}: {len(missing)} of {len(planned)} inputs have no finished shards (first: "
                        f"{missing[0]}): run the `mmtk convert` part that holds them again (it keeps finished "
                        f"shards), or index what is there with `mmtk index {folder} --partial`")
    if missing and log:
        log(f"note: {len(missing)} of {len(planned)} inputs left out (not converted yet), first: {missing[0]}")
    names = [name for key in sorted(planned) if key in finished for name in finished[key]]  # all present
    kept = set(names)
    return names, [name for name in present if name not in kept]


def _shard_summary(path: Path) -> dict[str, Any]:
    """``read_info`` of one shard, with its size and time taken before reading (so a write races safely)."""
    stat = os.stat(path)
    return {**read_info(path), "file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _folder_index(folder: Path, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The index: one slim entry per shard, and the folder's splits (frames, arrays, modalities, depth ranges,
    class histogram), classes and bytes merged from the shards' summaries."""
    labelled = [info for info in infos if info["classes"]]
    for info in labelled[1:]:
        if info["classes"] != labelled[0]["classes"]:
            raise MmtkError(f"{folder}: shards {labelled[0]['file']} and {info['file']} have different classes "
                            f"({len(labelled[0]['classes'])} and {len(info['classes'])}); convert them with the "
                            f"same --classes, or keep them in separate folders")
    splits = {split: _merged_split([info for info in infos if split in info["splits"]], split)
              for split in dict.fromkeys(split for info in infos for split in info["splits"])}
    sources = list(dict.fromkeys(info["source"] for info in infos))
    return {"mmtk_shard_index": INDEX_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "format": max(info["format"] for info in infos),
            "source": sources[0] + (f" (and {len(sources) - 1} other sources)" if len(sources) > 1 else ""),
            "bytes": sum(info["bytes"] for info in infos), "classes": labelled[0]["classes"] if labelled else None,
            "splits": splits,
            "shards": [{"file": info["file"], "bytes": info["bytes"], "mtime_ns": info["mtime_ns"],
                        "splits": {split: {"frames": part["frames"], "image_size": part["image_size"]}
                                   for split, part in info["splits"].items()}} for info in infos]}


def _merged_split(infos: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """One split over the shards that have it: arrays every shard has (and in how many the others are)."""
    parts = [info["splits"][split] for info in infos]
    counts: dict[str, int] = {}
    for part in parts:
        for name in part["datasets"]:
            counts[name] = counts.get(name, 0) + 1
    arrays = {name: _merged_array([part["datasets"][name] for part in parts], f"{split}/{name}")
              for name in parts[0]["datasets"] if counts[name] == len(parts)}
    histogram: dict[str, int] | None = None
    for part in parts:
        for name, count in (part["class_histogram"] or {}).items():
            histogram = histogram or {}
            histogram[name] = histogram.get(name, 0) + count
    return {"frames": sum(part["frames"] for part in parts), "shards": len(parts),
            "image_size": parts[0]["image_size"], "arrays": arrays,
            "in_some_shards": {name: count for name, count in counts.items() if count < len(parts)},
            "modalities": [name for name in list_modalities()
                           if all(source in arrays for source in get_modality(name).reads())],
            "depth": {name: _merged_depth([part["depth"][name] for part in parts], [part["frames"] for part in parts])
                      for name in parts[0]["depth"] if name in arrays and all(name in part["depth"] for part in parts)},
            "class_histogram": histogram, "intrinsics": parts[0]["intrinsics"]}


def _merged_array(datasets: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """One array over the shards: its frame shape, dtype, units, how it is kept (codec and scale, or "mixed" /
    None where shards differ), its stored bytes, and a label array's classes (which every shard must share)."""
    first = datasets[0]
    units = sorted({str(d["units"]) for d in datasets})
    if len(units) > 1:
        raise MmtkError(f"{where}: shards hold it in different units ({', '.join(units)}), e.g. pseudo-labels of "
                        f"different depth networks; label every shard alike, or keep them in separate folders")
    classes = {json.dumps(d["classes"]) for d in datasets if "classes" in d}
    if len(classes) > 1:
        raise MmtkError(f"{where}: shards label it with different classes; pseudo-label every shard with the same "
                        f"network, or keep them in separate folders")
    merged = {"dtype": first["dtype"], "units": first["units"], "shape": first["shape"][1:],
              "codec": first["codec"] if all(d["codec"] == first["codec"] for d in datasets) else "mixed",
              "scale": first["scale"] if all(d["scale"] == first["scale"] for d in datasets) else None,
              "stored_bytes": sum(d["stored_bytes_per_frame"] * d["shape"][0] for d in datasets)}
    if classes:
        merged["classes"] = json.loads(classes.pop())
    return merged


def _merged_depth(stats: list[dict[str, Any]], frames: list[int]) -> dict[str, Any]:
    """Depth ranges of shards merged: min, max and valid fraction exact; 1 % and 99 % the lowest and highest of
    the shards'; the median the frame-weighted median of the shards' medians."""
    weights = np.asarray(frames, dtype=np.float64)
    medians = np.asarray([s["median_m"] for s in stats])
    order = np.argsort(medians)
    cumulative = np.cumsum(weights[order])
    median = float(medians[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
    valid = [s for s in stats if s["max_m"] > 0]
    return {"valid_fraction": float(np.average([s["valid_fraction"] for s in stats], weights=weights)),
            "min_m": min((s["min_m"] for s in valid), default=0.0), "max_m": max(s["max_m"] for s in stats),
            "p01_m": min(s["p01_m"] for s in stats), "median_m": median, "p99_m": max(s["p99_m"] for s in stats),
            "sampled": any(s["sampled"] for s in stats), "shards": len(stats)}


class ShardedDataset(H5Dataset):
    """One split of a shard folder as one dataset: ``H5Dataset(folder, ...)`` returns one of these.

    It takes everything it needs to know from the index; a shard is opened (as an :class:`H5Dataset`) when one
    of its frames is first read. Each process keeps at most ``max_open`` shards open, closing the least recently
    used one beyond that, so a loader worker's open files stay bounded however many shards the folder has.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", modalities: Sequence[str] | None = None,
                 image_size: tuple[int, int] | None = (224, 224), augment: bool = False,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 dataset_map: Mapping[str, str] | None = None, window: Any = None,
                 augmentation: str = "random-resized-crop", max_open: int = MAX_OPEN_SHARDS) -> None:
        self.path, self.split = Path(path), split
        self.fixed_window, self.augmentation = window, augmentation  # handed to each shard's H5Dataset
        index = read_index(self.path)
        if split not in index["splits"]:
            raise MmtkError(f"{self.path} has no split {split!r}; it has {', '.join(index['splits'])}")
        total = index["splits"][split]
        self.modalities = tuple(modalities) if modalities is not None else \
            tuple(name for name in list_modalities() if name in total["arrays"])  # as H5Dataset: stored by name
        if not self.modalities:
            raise MmtkError("no modality requested; name at least one registered modality (e.g. rgb)")
        self.augment, self.crop_scale, self.hflip = augment, tuple(crop_scale), hflip
        self.dataset_map = {m: m for m in self.modalities}
        self.dataset_map.update(dataset_map or {})
        self.adapters = {m: get_modality(m)() for m in self.modalities}
        parts = [(shard["file"], shard["splits"][split]) for shard in index["shards"]
                 if shard["splits"].get(split, {}).get("frames")]
        self._check_parts(parts, total)
        self.file_size = tuple(total["image_size"])
        self.image_size = tuple(image_size) if image_size is not None else self.file_size
        read = [total["arrays"][self.dataset_map.get(source, source)] for adapter in self.adapters.values()
                for source in adapter.reads()]  # as H5Dataset: the classes of the label arrays it reads
        self.classes = next((array["classes"] for array in read if "classes" in array), None)
        self.shard_names = [name for name, _ in parts]  # names, not Paths: 10,000 Paths take 0.5 s
        self._starts = np.cumsum([0] + [part["frames"] for _, part in parts]).tolist()
        self.length = self._starts[-1]
        self.max_open = max(1, int(max_open))
        self._shards: OrderedDict[int, H5Dataset] = OrderedDict()
        self._pid: int | None = None

    def _check_parts(self, parts: list[tuple[str, dict[str, Any]]], total: dict[str, Any]) -> None:
        if not parts:
            raise MmtkError(f"{self.path}: split {self.split!r} is empty")
        needed = [(m, self.dataset_map.get(source, source)) for m, adapter in self.adapters.items()
                  for source in adapter.reads()]
        for modality, array in needed:
            if array not in total["arrays"]:
                some = total["in_some_shards"].get(array, 0)
                raise MmtkError(f"{self.path}:{self.split}: {some} of {total['shards']} shards have a dataset "
                                f"{array!r} for {modality} (every shard has {', '.join(total['arrays'])}); add it to "
                                f"every shard, or drop {modality}")
        sizes = {tuple(part["image_size"]) for _, part in parts}
        if len(sizes) > 1:
            raise MmtkError(f"{self.path}:{self.split}: shards differ in image size {sorted(sizes)}; convert them "
                            f"with the same --size")

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()  # h5py handles cannot cross processes; each worker reopens
        state["_pid"] = None
        return state

    def shard(self, number: int) -> H5Dataset:
        """Shard ``number``'s dataset, opened in this process if needed (least recently used beyond
        ``max_open`` closed)."""
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not this process's
            self._shards, self._pid = OrderedDict(), os.getpid()
        if number in self._shards:
            self._shards.move_to_end(number)
            return self._shards[number]
        while len(self._shards) >= self.max_open:
            self._shards.popitem(last=False)[1].close()
        dataset = H5Dataset(self.path / self.shard_names[number], split=self.split, modalities=self.modalities,
                            image_size=self.image_size, augment=self.augment, crop_scale=self.crop_scale,
                            hflip=self.hflip, dataset_map=self.dataset_map, window=self.fixed_window,
                            augmentation=self.augmentation)
        self._shards[number] = dataset
        return dataset

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} frames")
        index %= self.length
        number = bisect.bisect_right(self._starts, index) - 1
        return self.shard(number)[index - self._starts[number]]

    def close(self) -> None:
        """Close every shard this process has open (reopened on next access)."""
        for dataset in self._shards.values():
            dataset.close()
        self._shards.clear()


def check_files(path: str | os.PathLike) -> Iterator[tuple[Path, CheckReport | MmtkError]]:
    """``mmtk check`` of a dataset: (file, :func:`~mmtk.data.check.check_file`'s report) for each of its files.

    A shard of a folder that cannot be opened gives its one-line error instead of a report, and the other
    shards are still checked; a single file's error is raised."""
    for file in dataset_files(path):
        try:
            yield file, check_file(file)
        except MmtkError as err:
            if not Path(path).is_dir():
                raise
            yield file, err


H5Dataset.folder_dataset = ShardedDataset  # H5Dataset(folder) gives one
