"""Coordinate frames as a bag's /tf_static and /tf record them: the rigid transform between any two frames.

A read-only version of tf2's frame tree. Each recorded transform (parent, child) maps points given in
the child frame into the parent frame; a lookup walks the tree between two frames, using a transform
forwards or inverted along the way. Static transforms hold at all times; a dynamic one (from /tf) is
taken from the sample nearest in time, which must lie within a tolerance (no interpolation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmtk.errors import MmtkError

TF_TYPE = "tf2_msgs/msg/TFMessage"
STATIC_TOPIC, DYNAMIC_TOPIC = "/tf_static", "/tf"


def rigid_matrix(translation: Any, rotation_xyzw: Any) -> np.ndarray:
    """4x4 float64 matrix of a translation (x, y, z) in metres and a rotation quaternion (x, y, z, w)."""
    q = np.asarray(rotation_xyzw, dtype=np.float64)
    x, y, z, w = q / np.linalg.norm(q)
    matrix = np.eye(4)
    matrix[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    matrix[:3, 3] = np.asarray(translation, dtype=np.float64)
    return matrix


def invert_rigid(matrix: np.ndarray) -> np.ndarray:
    inverse = np.eye(4)
    inverse[:3, :3] = matrix[:3, :3].T
    inverse[:3, 3] = -matrix[:3, :3].T @ matrix[:3, 3]
    return inverse


def _frame(name: str) -> str:
    return name.lstrip("/")  # ROS1 bags often write "/camera_link" for "camera_link"


@dataclass
class TransformTree:
    """Rigid transforms between named frames, keyed by (parent, child)."""

    static: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    dynamic: dict[tuple[str, str], list[tuple[float, np.ndarray]]] = field(default_factory=dict)
    # Derived on the first lookup (a cloud per frame asks for the same chain thousands of times):
    _paths: dict[tuple[str, str], list[str] | None] = field(default_factory=dict, init=False, repr=False)
    _stamps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def add(self, parent: str, child: str, matrix: np.ndarray, stamp: float | None = None) -> None:
        """Record ``matrix`` (child -> parent coordinates); ``stamp`` in seconds, None for a static transform."""
        key = (_frame(parent), _frame(child))
        if stamp is None:
            self.static[key] = matrix
        else:
            self.dynamic.setdefault(key, []).append((stamp, matrix))
        self._paths.clear()
        self._stamps.pop(key, None)

    def lookup(self, target: str, source: str, stamp: float, max_dt: float) -> np.ndarray | None:
        """4x4 matrix taking points given in ``source`` into ``target`` at time ``stamp`` (s).

        None when no chain of recorded transforms connects the two frames. A dynamic transform on the
        chain without a sample within ``max_dt`` seconds of ``stamp`` is an MmtkError.
        """
        ends = (_frame(source), _frame(target))
        if ends not in self._paths:
            self._paths[ends] = self._path(*ends)
        path = self._paths[ends]
        if path is None:
            return None
        matrix = np.eye(4)
        for here, there in zip(path, path[1:]):
            matrix = self._step(here, there, stamp, max_dt) @ matrix
        return matrix

    def _neighbours(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {}
        for parent, child in [*self.static, *self.dynamic]:
            graph.setdefault(parent, set()).add(child)
            graph.setdefault(child, set()).add(parent)
        return graph

    def _path(self, source: str, target: str) -> list[str] | None:
        """Frames from ``source`` to ``target`` along the tree (breadth-first), or None."""
        if source == target:
            return [source]
        graph, previous = self._neighbours(), {source: source}
        queue = deque([source])
        while queue:
            frame = queue.popleft()
            for neighbour in graph.get(frame, ()):
                if neighbour not in previous:
                    previous[neighbour] = frame
                    queue.append(neighbour)
        if target not in previous:
            return None
        path = [target]
        while path[-1] != source:
            path.append(previous[path[-1]])
        return path[::-1]

    def _step(self, here: str, there: str, stamp: float, max_dt: float) -> np.ndarray:
        """Points in frame ``here`` -> frame ``there`` (adjacent frames)."""
        if (there, here) in self.static or (there, here) in self.dynamic:
            return self._edge(there, here, stamp, max_dt)  # here is the child: the recorded direction
        return invert_rigid(self._edge(here, there, stamp, max_dt))

    def _edge(self, parent: str, child: str, stamp: float, max_dt: float) -> np.ndarray:
        if (parent, child) in self.static:
            return self.static[(parent, child)]
        samples = self.dynamic[(parent, child)]
        if (parent, child) not in self._stamps:
            samples.sort(key=lambda sample: sample[0])
            self._stamps[(parent, child)] = np.array([t for t, _ in samples])
        stamps = self._stamps[(parent, child)]
        after = int(np.searchsorted(stamps, stamp))  # the nearest sample is this one or the one before
        nearest = min((i for i in (after - 1, after) if 0 <= i < len(stamps)), key=lambda i: abs(stamps[i] - stamp))
        nearest_stamp, matrix = samples[nearest]
        if abs(nearest_stamp - stamp) > max_dt:
            raise MmtkError(f"/tf has no {parent} -> {child} transform within {max_dt} s of {stamp:.3f} s (nearest "
                            f"{nearest_stamp - stamp:+.3f} s); raise --max-dt or record /tf at a higher rate")
        return matrix


def read_transforms(reader: Any) -> TransformTree:
    """Every transform on the /tf_static and /tf topics of an open rosbags reader."""
    tree = TransformTree()
    conns = [c for c in reader.connections if c.topic in (STATIC_TOPIC, DYNAMIC_TOPIC) and c.msgtype == TF_TYPE]
    if not conns:
        return tree  # (no connections would mean every message to rosbags)
    for conn, _, raw in reader.messages(connections=conns):
        for transform in reader.deserialize(raw, conn.msgtype).transforms:
            t, q = transform.transform.translation, transform.transform.rotation
            stamp = transform.header.stamp.sec + transform.header.stamp.nanosec * 1e-9
            tree.add(transform.header.frame_id, transform.child_frame_id,
                     rigid_matrix((t.x, t.y, t.z), (q.x, q.y, q.z, q.w)), None if conn.topic == STATIC_TOPIC else stamp)
    return tree
