"""CameraInfo messages: the colour camera's intrinsics K [3, 3] (pixels), the nearest usable one for each frame."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmtk.data.sources.ros.bag import (CAMERA_INFO_TYPE, TopicInfo, check_type, deserialize, is_ros2, pairing_time,
                                       topic_connections)
from mmtk.data.values import intrinsics_problem
from mmtk.errors import MmtkError


def camera_matrix(msg: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """K [3, 3] (pixels) and the image size (H, W) of a CameraInfo message (ROS2 ``k``, ROS1 ``K``)."""
    k = np.asarray(getattr(msg, "k", None) if hasattr(msg, "k") else msg.K, dtype=np.float32).reshape(3, 3)
    return k, (int(msg.height), int(msg.width))


def camera_info_beside(rgb_topic: str, available: list[TopicInfo]) -> str | None:
    """The camera_info topic of the colour topic's camera (/cam/rgb/image -> /cam/rgb/camera_info), if recorded."""
    guess = rgb_topic.rsplit("/", 1)[0] + "/camera_info"
    return guess if any(t.topic == guess for t in available) else None


def camera_info_connections(reader: Any, topic: str | None, available: list[TopicInfo]) -> list[Any]:
    """The connections of a CameraInfo topic (none without a topic); MmtkError when it is missing or of another type."""
    if topic is None:
        return []
    conns = topic_connections(reader, topic, available, "camera info")
    check_type(conns[0], "camera info", (CAMERA_INFO_TYPE,), "CameraInfo")
    return conns


@dataclass
class CameraInfos:
    """The usable CameraInfo messages of a bag so far, kept sorted by stamp: the nearest to a frame is a bisection,
    not a scan (a bag has a CameraInfo per frame, so a scan per frame grew quadratically with the bag's length)."""

    times: list[float] = field(default_factory=list)  # seconds, ascending
    cameras: list[tuple[np.ndarray, tuple[int, int]]] = field(default_factory=list)  # K [3, 3] px, (H, W)

    def add(self, stamp: float, k: np.ndarray, size: tuple[int, int]) -> None:
        index = bisect.bisect_right(self.times, stamp)
        self.times.insert(index, stamp)
        self.cameras.insert(index, (k, size))

    def add_message(self, reader: Any, conn: Any, raw: bytes, stamp: float) -> str | None:
        """Keep a CameraInfo message when its K is usable; otherwise return what is wrong with it (all zeros from an
        uncalibrated camera, NaN): frames then take the nearest usable K."""
        k, size = camera_matrix(deserialize(reader, raw, conn))
        problem = intrinsics_problem(k)
        if problem is None:
            self.add(stamp, k, size)
        return problem

    def nearest(self, stamp: float, size: tuple[int, int]) -> np.ndarray | None:
        """K of the CameraInfo nearest in time (the earlier on a tie), refused when it is for another image size;
        None before any CameraInfo."""
        if not self.times:
            return None
        after = bisect.bisect_left(self.times, stamp)
        index = min((i for i in (after - 1, after) if 0 <= i < len(self.times)),
                    key=lambda i: abs(self.times[i] - stamp))
        k, info_size = self.cameras[index]
        if info_size != tuple(size):
            raise MmtkError(f"CameraInfo is {info_size[1]}x{info_size[0]} but the colour image is {size[1]}x{size[0]}; "
                            f"pass the camera info topic of the colour camera (--camera-info-topic)")
        return k


def first_usable_camera(reader: Any, info_conns: list[Any], by_log_time: bool) -> tuple[CameraInfos, str | None]:
    """The first CameraInfo whose K is usable (scanning no further), so that frames before it take its K, and what
    made the first CameraInfo unusable (None when it is usable, or there is none)."""
    infos, first_problem = CameraInfos(), None
    for index, (conn, log_time, raw) in enumerate(reader.messages(connections=info_conns) if info_conns else ()):
        problem = infos.add_message(reader, conn, raw, pairing_time(raw, log_time, is_ros2(reader), by_log_time))
        first_problem = problem if index == 0 else first_problem
        if problem is None:
            break
    return infos, first_problem
