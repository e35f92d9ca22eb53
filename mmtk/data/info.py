"""Summaries of mmtk HDF5 files (``mmtk info`` and the engine use :func:`read_info`)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import h5py
import numpy as np

from mmtk.data.codecs import CODEC_ATTR, SCALE_ATTR, frame_dtype, frame_shape, read_frame, stored_bytes
from mmtk.data.format import PREDICTED_ATTR, MetricStats, is_image, open_mmtk_file
from mmtk.errors import MmtkError
from mmtk.io import format_bytes
from mmtk.modality import stored_array

STATS_SAMPLE_FRAMES = 32  # frames scanned when a file lacks the writer's stored statistics


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe an mmtk HDF5 file without reading its images.

    Returns a JSON-serialisable dict::

        {"path", "format", "source", "created",
         "splits": {split: {"frames", "image_size": [H, W],
                            "datasets": {name: {"shape", "dtype", "units", "bytes_per_frame",
                                                "stored_bytes_per_frame", "codec", "scale",
                                                "classes": [names] (label arrays, pseudo-labels too)}},
                            "depth": {name: {"min_m", "p01_m", "median_m", "p99_m", "max_m", "valid_fraction"}},
                            "class_histogram": {name: pixels} | None,
                            "intrinsics": [[3x3] of the first frame] | None}},
         "classes": [names] | None, "units": {dataset: unit}}

    ``classes`` are the sensor labels' (not a network's); each label array's own are in its ``datasets`` entry.
    A shard folder is summarised from its index alone (:func:`mmtk.data.shard_index.folder_info`), with "shards"
    and "bytes" added.
    """
    if os.path.isdir(path):
        from mmtk.data.shard_index import folder_info

        return folder_info(path)
    with open_mmtk_file(path) as handle:
        info: dict[str, Any] = {
            "path": str(path),
            "format": int(handle.attrs["mmtk_format"]),
            "source": str(handle.attrs.get("source", "")),
            "created": str(handle.attrs.get("created", "")),
            "splits": {},
            "classes": None,
            "units": {},
        }
        for split, group in handle.items():
            if isinstance(group, h5py.Group):
                try:
                    info["splits"][split] = _split_info(group, info)
                except (KeyError, ValueError, TypeError, IndexError, OSError) as err:  # summaries forged or damaged
                    raise MmtkError(f"{path}:/{split} has malformed summary attributes ({type(err).__name__}: "
                                    f"{err}); re-create the file with `mmtk convert`") from None
    return info


def _split_info(group: h5py.Group, info: dict[str, Any]) -> dict[str, Any]:
    datasets = {}
    for name, dataset in group.items():
        units = dataset.attrs.get("units")
        shape, dtype = [dataset.shape[0], *frame_shape(dataset)], frame_dtype(dataset)
        scale = dataset.attrs.get(SCALE_ATTR)
        datasets[name] = {"shape": shape, "dtype": str(dtype), "units": None if units is None else str(units),
                          "bytes_per_frame": int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize,
                          "stored_bytes_per_frame": stored_bytes(dataset) // max(shape[0], 1),
                          "codec": str(dataset.attrs.get(CODEC_ATTR, "none")),
                          "scale": None if scale is None else float(scale)}
        if units is not None:
            info["units"][name] = str(units)
        if "classes" in dataset.attrs:  # a label array's (sensor or pseudo-label): its classes, in id order
            datasets[name]["classes"] = json.loads(dataset.attrs["classes"])
    images = [d for name, d in group.items() if is_image(name, d)]  # per-frame images
    frames = int(images[0].shape[0]) if images else 0
    labels = next((d for d in images if _is_labels(d.name.rsplit("/", 1)[1]) and PREDICTED_ATTR not in d.attrs), None)
    split: dict[str, Any] = {
        "frames": frames,
        "image_size": [int(v) for v in frame_shape(images[0])[:2]] if images else None,
        "datasets": datasets,
        "depth": {d.name.rsplit("/", 1)[1]: _depth_stats(d) for d in images
                  if str(d.attrs.get("units", "")) == "m" or "valid_fraction" in d.attrs},
        "class_histogram": None,
        "intrinsics": group["intrinsics"][0].tolist() if "intrinsics" in group and frames else None,
    }
    if labels is not None:
        classes = json.loads(labels.attrs.get("classes", "[]"))
        info["classes"] = classes
        histogram = labels.attrs.get("histogram")
        if histogram is None:
            histogram = _scan_histogram(labels, len(classes))
        names = ["unlabeled", *classes]
        split["class_histogram"] = {names[k] if k < len(names) else str(k): int(v)
                                    for k, v in enumerate(histogram) if v}
    return split


def _is_labels(name: str) -> bool:
    """Whether the adapter that stores ``name`` declares it class ids (an array no loaded adapter stores is not)."""
    try:
        return stored_array(name)[1].kind == "labels"
    except MmtkError:
        return False


def _sample_indices(count: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(count - 1, 0), num=min(count, STATS_SAMPLE_FRAMES)).astype(int))


def _depth_stats(dataset: h5py.Dataset) -> dict[str, float | bool]:
    keys = ("valid_fraction", "min_m", "p01_m", "median_m", "p99_m", "max_m")
    if all(key in dataset.attrs for key in keys):
        return {**{key: float(dataset.attrs[key]) for key in keys}, "sampled": False}
    stats = MetricStats()  # files of older writers (no percentiles) or of other tools: sample frames
    for index in _sample_indices(dataset.shape[0]) if dataset.shape[0] else []:
        stats.update(read_frame(dataset, index))
    return {**stats.attrs(), "sampled": True}


def _scan_histogram(dataset: h5py.Dataset, num_classes: int) -> np.ndarray:
    histogram = np.zeros(num_classes + 1, dtype=np.int64)
    for index in _sample_indices(dataset.shape[0]) if dataset.shape[0] else []:
        counts = np.bincount(read_frame(dataset, index).ravel())
        if counts.size > histogram.size:
            histogram = np.pad(histogram, (0, counts.size - histogram.size))
        histogram[: counts.size] += counts
    return histogram


def format_info(info: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`read_info`'s result."""
    lines = [f"{info['path']}: mmtk format {info['format']}, created {info['created']}",
             f"source: {info['source']}"]
    if "shards" in info:
        lines.append(f"shard folder: {info['shards']} shards, {format_bytes(info['bytes'])}")
    for split, data in info["splits"].items():
        size = data["image_size"]
        size_text = f"{size[0]}x{size[1]} px (HxW)" if size else "?"
        lines.append(f"[{split}] {data['frames']} frames, {size_text}")
        for name, ds in data["datasets"].items():
            unit = f", units: {ds['units']}" if ds["units"] else ""
            per_frame = ""
            if len(ds["shape"]) >= 3:
                kept = f" as {ds['codec']}" if ds["codec"] != "none" else ""
                kept += f" integers at {ds['scale']:g}/unit" if ds["scale"] else ""
                per_frame = (f", {ds['bytes_per_frame'] / 1e6:.2f} MB/frame decoded, "
                             f"{ds['stored_bytes_per_frame'] / 1e6:.3f} MB/frame stored{kept}")
            lines.append(f"  {name:<11} {ds['dtype']:<8} {tuple(ds['shape'])}{unit}{per_frame}")
        for name, stats in data["depth"].items():
            note = f" (from {STATS_SAMPLE_FRAMES} sampled frames)" if stats["sampled"] else ""
            if "shards" in stats:
                note += f" (1-99 % are bounds and the median a median of medians over {stats['shards']} shards)"
            lines.append(f"  {name}: median {stats['median_m']:.3f} m, 1-99 % {stats['p01_m']:.3f}-"
                         f"{stats['p99_m']:.3f} m, range {stats['min_m']:.3f}-{stats['max_m']:.3f} m, "
                         f"valid {100 * stats['valid_fraction']:.1f} % of pixels{note}")
        if data["intrinsics"] is not None:
            k = data["intrinsics"]
            lines.append(f"  intrinsics (frame 0): fx {k[0][0]:.2f} px, fy {k[1][1]:.2f} px, "
                         f"cx {k[0][2]:.2f} px, cy {k[1][2]:.2f} px")
        if data["class_histogram"]:
            total = sum(data["class_histogram"].values())
            top = sorted(data["class_histogram"].items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{name} {100 * count / total:.1f} %" for name, count in top[:12])
            more = f" (+{len(top) - 12} more classes)" if len(top) > 12 else ""
            lines.append(f"  classes by pixel share: {shown}{more}")
    if info["classes"]:
        lines.append(f"classes ({len(info['classes'])}): {', '.join(info['classes'])}")
    predicted = {name: ds["classes"] for data in info["splits"].values() for name, ds in data["datasets"].items()
                 if ds.get("classes") and ds["classes"] != info["classes"]}
    for name, classes in predicted.items():
        lines.append(f"classes of {name} ({len(classes)}): {', '.join(classes)}")
    return "\n".join(lines)


def info_json(info: dict[str, Any]) -> str:
    """:func:`read_info`'s result as indented JSON."""
    return strict_json(info)


def strict_json(value: Any) -> str:
    """Indented JSON that strict parsers accept: NaN and infinities (a metric or statistic that does not exist)
    are written as null."""
    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False)
