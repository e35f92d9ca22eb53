"""The shard index: what a reader of a shard folder needs, read from ``index.json`` alone.

A shard folder holds shard files (``*.h5``/``*.hdf5``, each an ordinary mmtk file that ``mmtk info`` reads
alone) and ``index.json``, written last and atomically by :func:`mmtk.data.shards.write_index` (``mmtk index
FOLDER``, and ``mmtk convert`` when every input is done). The index lists each shard's name, bytes, modification
time and frames per split, and the folder's splits, arrays, modalities, classes and bytes (docs/dataset-format.md).
Readers (:func:`dataset_files`, ``H5Dataset``, ``read_info``) read the index, never every shard.

An index is stale when a listed shard's size or modification time differs from what it records, or shard files
were added or removed; readers detect that with one ``stat`` per shard and refuse in one line naming the fix
(``mmtk index FOLDER``): a reader never rewrites the folder (it may be read-only, or read by many ranks).

``mmtk convert`` keeps its own state in ``FOLDER/.convert/``: ``plan.json`` (source, options, inputs) and
``done/KEY.json`` per finished input (its shards), which reruns, other machines' parts and ``mmtk index`` go by.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mmtk.errors import MmtkError
from mmtk.io import is_temp_name

INDEX_NAME = "index.json"
INDEX_VERSION = 2  # 2: each array says how it is stored (codec, scale, stored bytes) and its classes
SHARD_SUFFIXES = (".h5", ".hdf5")
CONVERT_STATE = ".convert"  # `mmtk convert`'s plan and per-input done markers
PLAN_FILE = "plan.json"
DONE_FOLDER = "done"


def dataset_files(path: str | os.PathLike, check_fresh: bool = True) -> list[Path]:
    """The mmtk files of a dataset: a file -> [file]; a shard folder -> its shards in index order.

    A folder's index must exist and be fresh (one ``stat`` per shard; ``check_fresh=False`` for a writer that
    changes its shards, such as `mmtk pseudo-label`); otherwise one-line :class:`MmtkError`.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [path / shard["file"] for shard in read_index(path, check_fresh)["shards"]]


def shard_names(folder: Path) -> list[str]:
    """Names of the shard files directly in ``folder`` (sorted; mmtk's temporary files left out)."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.name.lower().endswith(SHARD_SUFFIXES)
                      and not entry.name.startswith(".") and not is_temp_name(entry.name) and entry.is_file())


def read_index(folder: str | os.PathLike, check_fresh: bool = True) -> dict[str, Any]:
    """The parsed ``index.json`` of a shard folder; refused in one line when missing, unreadable or stale."""
    folder = Path(folder)
    fix = f"run `mmtk index {folder}`"
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        state = " (a conversion into it has not finished: rerun it, it keeps finished shards)" \
            if (folder / CONVERT_STATE).is_dir() else ""
        raise MmtkError(f"{folder} is a folder without {INDEX_NAME}, so not a shard folder yet{state}; {fix}")
    try:
        index = json.loads(index_path.read_text())
        version = int(index["mmtk_shard_index"])
        index["shards"], index["splits"]  # noqa: B018  (the keys every reader uses)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MmtkError(f"{index_path} is not a readable shard index ({type(err).__name__}); {fix}") from None
    if version < INDEX_VERSION:
        raise MmtkError(f"{index_path} is stale (index version {version}, this mmtk writes {INDEX_VERSION}); {fix}")
    if version > INDEX_VERSION:
        raise MmtkError(f"{index_path} has index version {version}, newer than this mmtk ({INDEX_VERSION}); "
                        f"upgrade mmtk")
    if check_fresh and (reason := stale_reason(folder, index)):
        raise MmtkError(f"{index_path} is stale ({reason}); {fix}")
    return index


def stale_reason(folder: Path, index: Mapping[str, Any]) -> str | None:
    """Why ``index`` no longer describes ``folder`` (shards added, removed or changed), or None."""
    listed = {shard["file"]: shard for shard in index["shards"]}
    present = set(shard_names(folder))
    added = sorted(present - set(listed) - set(index.get("ignored", [])))
    removed = sorted(set(listed) - present)
    changed = []
    for name, shard in listed.items():
        if name in present:
            stat = os.stat(os.path.join(folder, name))
            if stat.st_size != shard["bytes"] or stat.st_mtime_ns != shard["mtime_ns"]:
                changed.append(name)
    parts = [f"{len(names)} shard(s) {what}, first {names[0]}" for what, names in
             (("added", added), ("removed", removed), ("changed size or modification time", changed)) if names]
    return "; ".join(parts) or None


def folder_info(folder: str | os.PathLike) -> dict[str, Any]:
    """``read_info``'s summary of a shard folder, from its index alone (no shard is opened), with "shards" and
    "bytes" added. Frames, bytes and class histograms are sums over shards; depth ranges as in the index."""
    folder = Path(folder)
    index = read_index(folder)
    info: dict[str, Any] = {"path": str(folder), "format": index["format"],
                            "source": f"{len(index['shards'])} shards: {index['source']}", "created": index["created"],
                            "splits": {}, "classes": index["classes"], "units": {}, "shards": len(index["shards"]),
                            "bytes": index["bytes"]}
    for split, part in index["splits"].items():
        datasets = {}
        for name, array in part["arrays"].items():
            datasets[name] = {"shape": [part["frames"], *array["shape"]], "dtype": array["dtype"],
                              "units": array["units"], "bytes_per_frame": int(np.prod(array["shape"], dtype=np.int64))
                              * np.dtype(array["dtype"]).itemsize,
                              "stored_bytes_per_frame": array["stored_bytes"] // max(part["frames"], 1),
                              "codec": array["codec"], "scale": array["scale"]}
            if "classes" in array:
                datasets[name]["classes"] = array["classes"]
            if array["units"] is not None:
                info["units"][name] = array["units"]
        info["splits"][split] = {"frames": part["frames"], "image_size": part["image_size"], "datasets": datasets,
                                 "depth": part["depth"], "class_histogram": part["class_histogram"],
                                 "intrinsics": part["intrinsics"]}
    return info


def locate_frame(folder: str | os.PathLike, split: str, index: int) -> tuple[Path, int]:
    """(shard file, frame index in it) of frame ``index`` of ``split`` of a shard folder (negative counts back)."""
    folder = Path(folder)
    parts = [(shard["file"], shard["splits"][split]["frames"]) for shard in read_index(folder)["shards"]
             if split in shard["splits"]]
    total = sum(frames for _, frames in parts)
    if not parts:
        raise MmtkError(f"{folder}: no shard has split {split!r}; `mmtk info {folder}` lists the splits")
    if not -total <= index < total:
        raise MmtkError(f"{folder}: split {split!r} has {total} frames; index {index} is out of range")
    index %= total
    for name, frames in parts:
        if index < frames:
            return folder / name, index
        index -= frames
    raise AssertionError("unreachable")


def finished_inputs(folder: Path) -> dict[str, list[str]]:
    """Input key -> its shard names, for every input whose shards are all published and still there (a shard
    deleted since, e.g. a corrupt one, makes its input unfinished: the next ``mmtk convert`` redoes it)."""
    done = folder / CONVERT_STATE / DONE_FOLDER
    if not done.is_dir():
        return {}
    present = set(shard_names(folder))
    finished = {}
    for marker in sorted(done.glob("*.json")):
        try:
            shards = [str(name) for name in json.loads(marker.read_text())["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a marker that cannot be read: the input is converted again
        if shards and present.issuperset(shards):
            finished[marker.stem] = shards
    return finished


def read_plan(folder: Path) -> dict[str, Any] | None:
    """``mmtk convert``'s plan of ``folder`` (source, options, inputs); None when it has none."""
    path = folder / CONVERT_STATE / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MmtkError(f"{path} cannot be read ({err}); add --force to convert the folder again") from None
