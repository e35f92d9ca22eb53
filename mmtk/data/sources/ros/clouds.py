"""PointCloud2 messages: decoded with numpy, moved into the colour camera's frame with the bag's transforms, and
projected to depth aligned with the colour image (:func:`mmtk.pointcloud.cloud_to_image_depth`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmtk.data.sources.ros.bag import CLOUD_TYPE, deserialize, first_header, open_reader
from mmtk.data.sources.ros.tf import TransformTree, read_transforms
from mmtk.errors import MmtkError
from mmtk.pointcloud import PointCloud, cloud_to_image_depth

@dataclass
class CloudAlignment:
    """Moves clouds from their own frame into the colour camera's, with the bag's transforms."""

    tree: TransformTree
    camera_frame: str
    max_dt: float

    def to_camera(self, cloud: PointCloud, stamp: float) -> PointCloud:
        matrix = self.tree.lookup(self.camera_frame, cloud.frame_id, stamp, self.max_dt)
        if matrix is None:
            raise MmtkError(f"a cloud at {stamp:.3f} s is in frame {cloud.frame_id!r}, which /tf_static and /tf do "
                            f"not connect to the colour frame {self.camera_frame!r}")
        return cloud.transformed(matrix, self.camera_frame)


def cloud_alignment(reader: Any, rgb_conn: Any, cloud_conn: Any,
                     max_dt: float) -> tuple[CloudAlignment | None, list[str]]:
    """How to bring the clouds into the colour camera's frame (None: they are in it already), and a note."""
    camera_frame, _ = first_header(reader, rgb_conn)
    cloud_frame, cloud_stamp = first_header(reader, cloud_conn)
    if not camera_frame or not cloud_frame or camera_frame == cloud_frame:
        return None, []
    tree = read_transforms(reader)
    matrix = tree.lookup(camera_frame, cloud_frame, cloud_stamp, max_dt)
    if matrix is None:
        return None, [f"cloud frame {cloud_frame!r} differs from colour frame {camera_frame!r} and /tf_static and /tf "
                      f"do not connect them: the points are taken as given in the colour camera's optical frame"]
    return CloudAlignment(tree, camera_frame, max_dt), [
        f"cloud points moved from frame {cloud_frame!r} to the colour frame {camera_frame!r} with the bag's "
        f"transforms (origins {np.linalg.norm(matrix[:3, 3]):.3f} m apart)"]


def cloud_depth(cloud: PointCloud, size: tuple[int, int], k: np.ndarray | None, topic: str) -> np.ndarray:
    """Depth [H, W] metres (0 = invalid) aligned with the colour image, from a decoded PointCloud2."""
    if k is None and not (cloud.organized and cloud.points.shape[:2] == tuple(size)):
        layout = (f"organized {cloud.points.shape[1]}x{cloud.points.shape[0]}" if cloud.organized
                  else f"unorganized ({cloud.points.shape[0]} points)")
        raise MmtkError(f"cloud topic {topic!r} is {layout}, not the {size[1]}x{size[0]} colour image's layout, so "
                        f"it must be projected with the colour camera's intrinsics; pass its CameraInfo topic "
                        f"with --camera-info-topic")
    return cloud_to_image_depth(cloud, size, k)


# sensor_msgs/PointField datatype codes -> numpy dtypes (little-endian; byte order is set per message).
_POINTFIELD_DTYPES: dict[int, str] = {
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8",
}


def pointcloud2_to_cloud(msg: Any) -> PointCloud:
    """Decode a ``sensor_msgs/PointCloud2`` message (rosbags, rospy or rclpy object) with numpy.

    Reads ``fields`` (name, offset, datatype, count), ``point_step``, ``row_step`` (row padding allowed),
    ``is_bigendian``, ``height`` and ``width``. Needs float fields x, y, z; colour comes from a packed
    ``rgb``/``rgba`` field (0x00RRGGBB in a 4-byte slot, whatever its declared type) or from separate
    ``r``, ``g``, ``b`` fields. A cloud with height > 1 stays organized [H, W, 3].
    """
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    byte_order = ">" if msg.is_bigendian else "<"
    fields = {f.name: f for f in msg.fields}
    missing = [name for name in ("x", "y", "z") if name not in fields]
    if missing:
        raise MmtkError(f"PointCloud2 has no field(s) {missing}; fields are {sorted(fields)}")
    data = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data, dtype=np.uint8)
    if row_step < width * point_step or len(data) < height * row_step:
        raise MmtkError(f"PointCloud2 data is {len(data)} bytes, too short for {height} rows of "
                        f"row_step {row_step} with {width} points of {point_step} bytes")
    rows = data[: height * row_step].reshape(height, row_step)[:, : width * point_step]
    records = np.ascontiguousarray(rows).reshape(height * width, point_step)

    def column(name: str, dtype: str | None = None) -> np.ndarray:
        spec = fields[name]
        code = dtype or _POINTFIELD_DTYPES.get(int(spec.datatype))
        if code is None:
            raise MmtkError(f"PointCloud2 field {name!r} has unknown datatype {spec.datatype}")
        size = np.dtype(code).itemsize
        raw = records[:, int(spec.offset): int(spec.offset) + size]
        return np.ascontiguousarray(raw).view(byte_order + code)[:, 0]

    points = np.stack([column(axis).astype(np.float32) for axis in ("x", "y", "z")], axis=-1)
    colors = None
    packed = "rgb" if "rgb" in fields else ("rgba" if "rgba" in fields else None)
    if packed is not None:
        value = column(packed, "u4")
        colors = np.stack([(value >> 16) & 255, (value >> 8) & 255, value & 255], axis=-1).astype(np.uint8)
    elif all(name in fields for name in ("r", "g", "b")):
        colors = np.stack([column(c).astype(np.uint8) for c in ("r", "g", "b")], axis=-1)
    if height > 1:
        points = points.reshape(height, width, 3)
        colors = None if colors is None else colors.reshape(height, width, 3)
    frame_id = str(getattr(getattr(msg, "header", None), "frame_id", "") or "")
    return PointCloud(points, colors, frame_id)


@dataclass
class BagCloud:
    """One PointCloud2 message read from a bag: time stamp (s, header), topic and decoded cloud."""

    timestamp: float
    topic: str
    cloud: PointCloud = field(repr=False)


def read_bag_clouds(path: str | os.PathLike, topic: str | None = None) -> Iterator[BagCloud]:
    """Yield the PointCloud2 messages of a ROS1 ``.bag`` or ROS2 bag folder (rosbags), in time order.

    ``topic`` picks one topic; without it the bag must hold exactly one PointCloud2 topic.
    """
    path = Path(path)
    reader = open_reader(path)
    try:
        clouds = [c for c in reader.connections if c.msgtype == CLOUD_TYPE]
        topics = sorted({c.topic for c in clouds})
        if topic is not None:
            clouds = [c for c in clouds if c.topic == topic]
            if not clouds:
                raise MmtkError(f"{path}: no PointCloud2 topic {topic!r}; PointCloud2 topics: {topics or 'none'}")
        elif len(topics) != 1:
            raise MmtkError(f"{path}: {len(topics)} PointCloud2 topics ({topics}); pick one with --cloud-topic")
        for connection, _, raw in reader.messages(connections=clouds):
            msg = deserialize(reader, raw, connection)
            stamp = msg.header.stamp
            yield BagCloud(stamp.sec + stamp.nanosec * 1e-9, connection.topic, pointcloud2_to_cloud(msg))
    finally:
        reader.close()
