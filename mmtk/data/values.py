"""Value rules of stored arrays by kind (mmtk.modality.StoredArray): metres and class ids.

Used where values enter or leave mmtk files: the sources (units guessed or read), the depth adapter (before a
frame is written, and when one is loaded), `mmtk check`.
"""

from __future__ import annotations

import numpy as np

from mmtk.errors import MmtkError

# A median beyond this is millimetres given as metres; below MIN it is metres read as millimetres (or worse).
MAX_PLAUSIBLE_MEDIAN_M = 80.0
MIN_PLAUSIBLE_MEDIAN_M = 0.05
MAX_DEPTH_M = 1000.0  # beyond any depth sensor: corrupt values or wrong units
UNITS_FIX = "pass --depth-scale (units per metre, e.g. 1 for metres, 1000 for millimetres) or --depth-format"
Percentiles = tuple[float, float, float]  # 1st percentile, median, 99th percentile of the valid depth, metres


def check_metric_values(name: str, depth: np.ndarray) -> None:
    """Refuse values an mmtk file never holds: non-finite, negative, or beyond MAX_DEPTH_M metres."""
    finite = np.isfinite(depth)
    if not finite.all():
        raise MmtkError(f"{name} has {int((~finite).sum())} non-finite values (NaN/inf); mmtk stores invalid "
                        f"depth as 0: the file is corrupt, re-create it with `mmtk convert`")
    low, high = float(depth.min(initial=0.0)), float(depth.max(initial=0.0))
    if low < 0 or high > MAX_DEPTH_M:
        raise MmtkError(f"{name} holds {low if low < 0 else high:.4g} m, outside 0-{MAX_DEPTH_M:g} m; the file is "
                        f"corrupt or not in metres: re-create it with `mmtk convert`")


def depth_percentiles(depth: np.ndarray) -> Percentiles | None:
    """(1st percentile, median, 99th percentile) of the valid (> 0) depth in metres, on a sample of
    at most ~20000 pixels; None when no pixel is valid."""
    valid = depth[depth > 0]
    if valid.size == 0:
        return None
    p01, median, p99 = np.percentile(valid[:: max(1, valid.size // 20000)], [1, 50, 99])
    return float(p01), float(median), float(p99)


def check_plausible_metres(name: str, depth: np.ndarray, frame_id: object,
                           plausible: tuple[float, float] | None = None, fix: str = UNITS_FIX,
                           stats: Percentiles | None = None) -> None:
    """Refuse depth that cannot be metres, in one line ending with ``fix``.

    Always: any value beyond 1000 m, a median beyond 80 m (millimetres given as metres) or below 0.05 m
    (metres read as millimetres). With ``plausible`` (MIN, MAX metres, the sensor's range; used where units
    were guessed): the 1st percentile, median and 99th percentile must lie inside it. ``stats``: the
    :func:`depth_percentiles` of ``depth`` when the caller has them already (None: computed here), so that a
    frame's are computed once.
    """
    stats = stats if stats is not None else depth_percentiles(depth)
    if stats is None:
        return
    p01, median, p99 = stats
    if median > MAX_PLAUSIBLE_MEDIAN_M:
        raise MmtkError(f"frame {frame_id}: {name} median is {median:.0f} m, which looks like millimetres given as "
                        f"metres; {fix}")
    if median < MIN_PLAUSIBLE_MEDIAN_M:
        raise MmtkError(f"frame {frame_id}: {name} median is {median:.4f} m, implausibly close for a depth sensor; "
                        f"the depth units are probably wrong: {fix}")
    high = float(depth.max(initial=0.0))
    if high > MAX_DEPTH_M:
        raise MmtkError(f"frame {frame_id}: {name} reaches {high:.4g} m, beyond any depth sensor (> {MAX_DEPTH_M:g} m);"
                        f" the values are corrupt or not metres: {fix}")
    if plausible is not None and not (plausible[0] <= p01 and p99 <= plausible[1]):
        raise MmtkError(f"frame {frame_id}: {name} has median {median:.2f} m and 1st-99th percentiles "
                        f"{p01:.2f}-{p99:.2f} m, outside the sensor range {plausible[0]:g}-{plausible[1]:g} m; {fix}")


def intrinsics_problem(k: np.ndarray) -> str | None:
    """What makes a camera matrix K [3, 3] (pixels) unusable, or None: NaN/inf, or focal lengths that are not
    positive (ROS drivers publish K = 0 for an uncalibrated camera)."""
    k = np.asarray(k, dtype=np.float64)
    if not np.all(np.isfinite(k)):
        return f"camera matrix K has {int((~np.isfinite(k)).sum())} non-finite values (NaN/inf)"
    if not np.any(k):
        return "camera matrix K is all zeros, as an uncalibrated camera publishes it"
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        return f"camera matrix K has focal lengths fx = {k[0, 0]:g}, fy = {k[1, 1]:g} px; both must be positive"
    return None


def check_label_ids(name: str, labels: np.ndarray, num_classes: int) -> None:
    """Refuse stored ids outside 0..num_classes (0 = unlabeled); num_classes 0 means unknown (not checked)."""
    if num_classes <= 0 or labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > num_classes:
        raise MmtkError(f"{name} holds class id {low if low < 0 else high}, beyond the file's {num_classes} "
                        f"classes (ids 0..{num_classes}); the file is corrupt: re-create it with `mmtk convert`")
