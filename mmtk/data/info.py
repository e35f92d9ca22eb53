"""Summaries of mmtk HDF5 files (``mmtk info`` and the engine use :func:`read_info`)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import h5py
import numpy as np

from mmtk.data.dataset import open_mmtk_file

STATS_SAMPLE_FRAMES = 32  # frames scanned when a file lacks the writer's stored statistics


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe an mmtk HDF5 file without reading its images.

    Returns a JSON-serialisable dict::

        {"path", "format", "source", "created",
         "splits": {split: {"frames", "image_size": [H, W],
                            "datasets": {name: {"shape", "dtype", "units"}},
                            "depth": {name: {"min_m", "max_m", "valid_fraction"}},
                            "class_histogram": {name: pixels} | None,
                            "intrinsics": [[3x3] of the first frame] | None}},
         "classes": [names] | None, "units": {dataset: unit}}
    """
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
                info["splits"][split] = _split_info(group, info)
    return info


def _split_info(group: h5py.Group, info: dict[str, Any]) -> dict[str, Any]:
    datasets = {}
    for name, dataset in group.items():
        units = dataset.attrs.get("units")
        datasets[name] = {"shape": list(dataset.shape), "dtype": str(dataset.dtype),
                          "units": None if units is None else str(units)}
        if units is not None:
            info["units"][name] = str(units)
    frames = int(group["rgb"].shape[0]) if "rgb" in group else 0
    split: dict[str, Any] = {
        "frames": frames,
        "image_size": [int(v) for v in group["rgb"].shape[1:3]] if "rgb" in group else None,
        "datasets": datasets,
        "depth": {name: _depth_stats(group[name]) for name in ("depth", "depth_raw", "depth_pseudo")
                  if name in group},
        "class_histogram": None,
        "intrinsics": group["intrinsics"][0].tolist() if "intrinsics" in group and frames else None,
    }
    if "semseg" in group:
        classes = json.loads(group["semseg"].attrs.get("classes", "[]"))
        info["classes"] = classes
        histogram = group["semseg"].attrs.get("histogram")
        if histogram is None:
            histogram = _scan_histogram(group["semseg"], len(classes))
        names = ["unlabeled", *classes]
        split["class_histogram"] = {names[k] if k < len(names) else str(k): int(v)
                                    for k, v in enumerate(histogram) if v}
    return split


def _sample_indices(count: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(count - 1, 0), num=min(count, STATS_SAMPLE_FRAMES)).astype(int))


def _depth_stats(dataset: h5py.Dataset) -> dict[str, float | bool]:
    if "valid_fraction" in dataset.attrs:
        return {"min_m": float(dataset.attrs["min_m"]), "max_m": float(dataset.attrs["max_m"]),
                "valid_fraction": float(dataset.attrs["valid_fraction"]), "sampled": False}
    valid_count = total = 0
    low, high = np.inf, 0.0
    for index in _sample_indices(dataset.shape[0]) if dataset.shape[0] else []:
        frame = dataset[index]
        valid = frame[frame > 0]
        valid_count += valid.size
        total += frame.size
        if valid.size:
            low, high = min(low, float(valid.min())), max(high, float(valid.max()))
    return {"min_m": 0.0 if valid_count == 0 else low, "max_m": high,
            "valid_fraction": valid_count / max(total, 1), "sampled": True}


def _scan_histogram(dataset: h5py.Dataset, num_classes: int) -> np.ndarray:
    histogram = np.zeros(num_classes + 1, dtype=np.int64)
    for index in _sample_indices(dataset.shape[0]) if dataset.shape[0] else []:
        counts = np.bincount(dataset[index].ravel())
        if counts.size > histogram.size:
            histogram = np.pad(histogram, (0, counts.size - histogram.size))
        histogram[: counts.size] += counts
    return histogram


def format_info(info: dict[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`read_info`'s result."""
    lines = [f"{info['path']}: mmtk format {info['format']}, created {info['created']}",
             f"source: {info['source']}"]
    for split, data in info["splits"].items():
        size = data["image_size"]
        size_text = f"{size[0]}x{size[1]} px (HxW)" if size else "?"
        lines.append(f"[{split}] {data['frames']} frames, {size_text}")
        for name, ds in data["datasets"].items():
            unit = f", units: {ds['units']}" if ds["units"] else ""
            lines.append(f"  {name:<11} {ds['dtype']:<8} {tuple(ds['shape'])}{unit}")
        for name, stats in data["depth"].items():
            note = f" (from {STATS_SAMPLE_FRAMES} sampled frames)" if stats["sampled"] else ""
            lines.append(f"  {name} range {stats['min_m']:.3f}-{stats['max_m']:.3f} m, "
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
