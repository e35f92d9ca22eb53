"""Pairing two streams by their timestamps."""

from __future__ import annotations

import numpy as np


def associate_by_time(a: list[float], b: list[float], max_dt: float, a_order: list[float] | None = None,
                      b_order: list[float] | None = None) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two timestamp lists, closest pairs first, |dt| <= max_dt.

    Every b within max_dt of an a is a candidate, so repeated stamps all find partners. Equally close pairs
    (repeated stamps) go first to the pair closest in ``a_order``/``b_order`` (e.g. the times a recorder logged
    the messages), then in list order. Returns (index in a, index in b) pairs sorted by a's time.
    """
    b_sorted = np.argsort(b, kind="stable")
    b_times = np.asarray(b, dtype=np.float64)[b_sorted]
    candidates = []
    for i, t in enumerate(a):
        low, high = int(np.searchsorted(b_times, t - max_dt)), int(np.searchsorted(b_times, t + max_dt, "right"))
        for pos in range(max(0, low - 1), min(len(b_times), high + 1)):  # +-1: float rounding at the edges
            j = int(b_sorted[pos])
            if abs(b_times[pos] - t) <= max_dt:
                tie = abs(a_order[i] - b_order[j]) if a_order is not None and b_order is not None else 0.0
                candidates.append((abs(b_times[pos] - t), tie, i, j))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for _, _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs, key=lambda p: a[p[0]])

