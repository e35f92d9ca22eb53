"""`mmtk check`: scan every frame of an mmtk HDF5 file and report each bad one.

A frame is bad when a chunk fails its checksum (files written since checksums were added: flipped bytes),
or a value breaks what the loader refuses: non-finite, negative or > 1000 m depth, depth whose median is
not plausible metres, class ids beyond the file's classes, non-finite timestamps, intrinsics that are NaN, all
zeros or without positive focal lengths; and a split whose metric array (depth) has no valid value in any frame.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from mmtk.modality import stored_array
from mmtk.data.values import check_label_ids, check_metric_values, check_plausible_metres, intrinsics_problem
from mmtk.data.codecs import frame_reader
from mmtk.data.format import PARTIAL_SUFFIX, is_image, open_mmtk_file
from mmtk.errors import MmtkError
from mmtk.progress import counted

META_ARRAYS = ("intrinsics", "timestamp", "frame_id")


@dataclass
class BadFrame:
    """One problem in one frame."""

    split: str
    index: int | None  # None: a problem of the whole split (e.g. no frame has valid depth)
    array: str
    problem: str
    frame_id: str | None = None

    def line(self, path: Path) -> str:
        if self.index is None:
            return f"{path}:{self.split}: {self.array}: {self.problem}"
        name = f" ({self.frame_id})" if self.frame_id else ""
        return f"{path}:{self.split} frame {self.index}{name}: {self.array}: {self.problem}"


@dataclass
class CheckReport:
    """What a scan found: frames per split, the bad ones, and whether the file carries checksums."""

    path: Path
    frames: dict[str, int] = field(default_factory=dict)
    bad: list[BadFrame] = field(default_factory=list)
    checksummed: bool = True

    @property
    def bad_frames(self) -> int:
        """Frames with a problem; a problem of a whole split makes each of its frames bad."""
        whole = {b.split for b in self.bad if b.index is None}
        return (sum(self.frames.get(split, 0) for split in whole)
                + len({(b.split, b.index) for b in self.bad if b.index is not None and b.split not in whole}))


def check_file(path: str | os.PathLike) -> CheckReport:
    """Read every frame of every array of every split of ``path`` and collect what is wrong."""
    report = CheckReport(Path(path))
    with open_mmtk_file(path) as handle:
        for split, group in handle.items():
            if not isinstance(group, h5py.Group):
                continue
            ids = _frame_ids(group)
            report.frames[split] = 0
            for name, dataset in group.items():
                if not isinstance(dataset, h5py.Dataset) or name == "frame_id" or name.endswith(PARTIAL_SUFFIX):
                    continue  # (a .partial array is a pseudo-label run in progress, resumed by rerunning it)
                if dataset.ndim >= 3:  # images; timestamps are written in blocks without checksums
                    report.checksummed &= dataset.fletcher32  # (encoded images carry a CRC-32 each)
                check, counter = _counting_valid(name, _value_check(name, dataset))
                scanned = _frames_to_scan(split, name, dataset, report)
                report.frames[split] = max(report.frames[split], scanned)
                read = frame_reader(dataset) if is_image(name, dataset) else dataset.__getitem__  # once per array
                for index in range(scanned):
                    problem = _frame_problem(read, index, check)
                    if problem:
                        report.bad.append(BadFrame(split, index, name, problem,
                                                   ids[index] if ids and index < len(ids) else None))
                if counter is not None and scanned and not counter["valid"]:
                    report.bad.append(BadFrame(split, None, name, f"none of its {counted(scanned, 'frame')} has a valid value "
                                               f"(all 0 = no measurement); the source's {name} was unusable: "
                                               f"re-convert from a source with {name}"))
    return report


def _frames_to_scan(split: str, name: str, dataset: h5py.Dataset, report: CheckReport) -> int:
    """How many frames of ``dataset`` to read: no more than the file holds chunks for (a declared count beyond
    that is reported, not allocated). Absurd frame sizes never get here: opening the file refuses them
    (:func:`mmtk.data.format.check_declared_sizes`)."""
    frames = dataset.shape[0]
    if dataset.chunks is not None and dataset.chunks[0] == 1:
        held = dataset.id.get_num_chunks()
        if held < frames:
            report.bad.append(BadFrame(split, held, name, f"declares {frames} frames but the file holds {held}; "
                                       f"the rest were never written"))
            return held
    return frames


def _frame_ids(group: h5py.Group) -> list[str] | None:
    if "frame_id" not in group:
        return None
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in group["frame_id"][()]]
    except OSError:
        return None


def _counting_valid(name: str, check: Callable[[np.ndarray], None]) -> tuple[Callable[[np.ndarray], None],
                                                                              dict[str, int] | None]:
    """For a metric array (depth...): ``check`` that also counts the valid (> 0) values it sees, and the count."""
    try:
        metric = stored_array(name)[1].kind == "metric"
    except MmtkError:
        metric = False
    if not metric:
        return check, None
    counter = {"valid": 0}

    def counted(value: np.ndarray) -> None:
        counter["valid"] += int(np.count_nonzero(value > 0))
        check(value)
    return counted, counter


def _value_check(name: str, dataset: h5py.Dataset) -> Callable[[np.ndarray], None]:
    """The value rule for one stored array, raising MmtkError on a bad frame."""
    if name == "intrinsics":
        def camera(value: np.ndarray) -> None:
            if (problem := intrinsics_problem(value)) is not None:
                raise MmtkError(problem)
        return camera
    if name in META_ARRAYS:
        def finite(value: np.ndarray) -> None:
            if not np.all(np.isfinite(value)):
                raise MmtkError("non-finite values")
        return finite
    try:
        _, stored = stored_array(name)
        kind, units = stored.kind, stored.units
    except MmtkError:  # no loaded adapter stores it (a pseudo-label such as semseg_pseudo, a plugin's array)
        kind, units = ("labels" if "classes" in dataset.attrs else None), None  # classes name what it labels
    if kind == "metric":
        def metric(value: np.ndarray) -> None:
            check_metric_values(name, value)
            if units == "m":  # (depth_pseudo may be relative)
                check_plausible_metres(name, value, "", fix="re-create the file with the right --depth-scale")
        return metric
    if kind == "labels":
        classes = len(json.loads(dataset.attrs["classes"])) if "classes" in dataset.attrs else 0

        def labels(value: np.ndarray) -> None:
            if not classes:
                raise MmtkError("labels without a classes attribute; re-create the file with `mmtk convert`")
            check_label_ids(name, value, classes)
        return labels
    return lambda value: None  # images (any value of their dtype), unknown arrays: only readability is checked


def _frame_problem(read: Callable[[int], Any], index: int, check: Callable[[np.ndarray], None]) -> str | None:
    try:
        value = read(index)
    except OSError as err:
        return f"cannot be read: damaged data or checksum mismatch ({str(err).split(';')[0]})"
    except MmtkError as err:  # an encoded image that fails its CRC-32 or does not decode
        return f"cannot be read: {err}"
    try:
        check(np.asarray(value))
    except MmtkError as err:
        return str(err).removeprefix("frame : ")
    return None
