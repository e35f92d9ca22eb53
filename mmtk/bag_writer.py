"""Predictions as ROS messages, next to the recording they were made from (``mmtk predict --rosbag ... --out X.mcap``).

Each output becomes a ``sensor_msgs/Image`` topic ``/mmtk/<name>``: labels ``mono8`` (``mono16`` beyond 255
classes; class k as k + 1, 0 = unlabeled) with their colour picture on ``/mmtk/<name>/color`` (``rgb8``), values
``32FC1`` in the adapter's units (depth: metres), images ``rgb8``. Where depth in metres and the intrinsics are
known, ``/mmtk/points`` is a ``sensor_msgs/PointCloud2`` (x, y, z float32 metres; rgb packed; ``label`` uint16 when
labels are predicted). Every message carries the header stamp and frame_id of the colour image it was predicted
from, as recorded (:attr:`Frame.header <mmtk.data.sources.frame.Frame.header>`; a stamp never set stays 0), and is
logged at that image's log time, so Foxglove or RViz show it beside the recording. A ``.bag`` output is a ROS1
bag, a ``.mcap`` output a ROS 2 MCAP file; both are written with ``rosbags`` and appear only once complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mmtk.data.sources.frame import Frame, MessageHeader
from mmtk.errors import MmtkError
from mmtk.io import atomic_path, temp_prefix
from mmtk.predict import Output, Prediction, cloud_source, palette_of

BAG_SUFFIXES = (".bag", ".mcap")
TOPIC_PREFIX = "/mmtk"
IMAGE_TYPE = "sensor_msgs/msg/Image"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"


class PredictionBag:
    """A ROS1 bag or MCAP file of prediction messages, published atomically when the ``with`` block ends."""

    def __init__(self, out: str | os.PathLike) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.out = Path(out)
        if self.out.suffix not in BAG_SUFFIXES:
            raise MmtkError(f"--out {self.out}: a bag output ends in .bag (ROS1) or .mcap (ROS 2)")
        self.ros1 = self.out.suffix == ".bag"
        self.store = get_typestore(Stores.ROS1_NOETIC if self.ros1 else Stores.ROS2_HUMBLE)
        self.connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> "PredictionBag":
        self._publishing = atomic_path(self.out, suffix=self.out.suffix)
        self._tmp = self._publishing.__enter__()
        self._folder = tempfile.TemporaryDirectory(prefix=temp_prefix(self.out), dir=self.out.parent)
        if self.ros1:
            from rosbags.rosbag1 import Writer

            self.writer = Writer(Path(self._folder.name) / "pred.bag")
        else:
            from rosbags.rosbag2 import StoragePlugin, Writer

            self.writer = Writer(Path(self._folder.name) / "pred", version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        return self

    def __exit__(self, kind, error, trace) -> bool:
        try:
            self.writer.close()
            if error is None:
                written = Path(self._folder.name) / ("pred.bag" if self.ros1 else "pred/pred.mcap")
                os.replace(written, self._tmp)
        finally:
            self._folder.cleanup()
        self._publishing.__exit__(kind, error, trace)
        return False

    def write(self, frame: Frame, prediction: Prediction) -> None:
        """The messages of one frame, stamped, framed and logged like the colour message it came from."""
        header = frame.header
        if header is None:
            raise MmtkError(f"frame {frame.frame_id} was not read from a bag message, so a bag output cannot be "
                            f"stamped like it; give --rosbag BAG, or an output folder")
        for output in prediction.outputs.values():
            for topic, encoding, pixels in _images(output):
                self._send(topic, IMAGE_TYPE, header, _image_msg(self.store, header, encoding, pixels, self.ros1))
        source = cloud_source(frame, prediction)
        if source is not None and frame.intrinsics is not None:
            cloud = _cloud_msg(self.store, header, source, frame.intrinsics, self.ros1)
            self._send(f"{TOPIC_PREFIX}/points", CLOUD_TYPE, header, cloud)

    def _send(self, topic: str, msgtype: str, header: MessageHeader, message: Any) -> None:
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.store)
        data = self.store.serialize_ros1(message, msgtype) if self.ros1 else self.store.serialize_cdr(message, msgtype)
        self.writer.write(self.connections[topic], header.log_time_ns, data)
        self.counts[topic] = self.counts.get(topic, 0) + 1


def _images(output: Output) -> list[tuple[str, str, np.ndarray]]:
    """(topic, encoding, pixels) of the Image messages of one output."""
    topic = f"{TOPIC_PREFIX}/{output.name}"
    if output.stored.kind == "labels":
        palette = palette_of(output)
        labels = output.values.astype(np.uint8 if len(palette) <= 256 else np.uint16)
        return [(topic, "mono8" if labels.dtype == np.uint8 else "mono16", labels),
                (f"{topic}/color", "rgb8", palette[output.values])]
    if output.stored.kind == "metric":
        return [(topic, "32FC1", output.values.astype(np.float32))]
    return [(topic, "rgb8", output.values)]


def _header_msg(store: Any, header: MessageHeader, ros1: bool) -> Any:
    sec, nanosec = divmod(header.stamp_ns, 1_000_000_000)
    stamp = store.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
    fields = dict(stamp=stamp, frame_id=header.frame_id)
    return store.types["std_msgs/msg/Header"](seq=0, **fields) if ros1 else store.types["std_msgs/msg/Header"](**fields)


def _image_msg(store: Any, header: MessageHeader, encoding: str, pixels: np.ndarray, ros1: bool) -> Any:
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    data = pixels.astype(pixels.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
    return store.types[IMAGE_TYPE](header=_header_msg(store, header, ros1), height=height, width=width,
                                   encoding=encoding, is_bigendian=0, step=data.size // height, data=data)


def _cloud_msg(store: Any, header: MessageHeader, source: Any, intrinsics: np.ndarray, ros1: bool) -> Any:
    """An unorganized PointCloud2 of the valid pixels: x, y, z (float32 m), rgb (packed), label (uint16) if any."""
    from mmtk.pointcloud import depth_to_xyz

    xyz = depth_to_xyz(source.depth_m, intrinsics)
    valid = np.isfinite(xyz).all(axis=-1)
    layout = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")]
    layout += [("label", "<u2")] if source.labels is not None else []
    points = np.zeros(int(valid.sum()), dtype=np.dtype(layout))
    for axis, name in enumerate("xyz"):
        points[name] = xyz[valid][:, axis]
    if source.colours is not None:
        colours = source.colours[valid].astype(np.uint32)
        points["rgb"] = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    if source.labels is not None:
        points["label"] = source.labels[valid]
    field_type = store.types["sensor_msgs/msg/PointField"]
    codes = {"<f4": 7, "<u4": 7, "<u2": 4}  # FLOAT32, rgb packed in a FLOAT32 slot as ROS does, UINT16
    fields = [field_type(name=name, offset=points.dtype.fields[name][1], datatype=codes[code], count=1)
              for name, code in layout]
    data = points.view(np.uint8).reshape(-1)
    return store.types[CLOUD_TYPE](header=_header_msg(store, header, ros1), height=1, width=len(points), fields=fields,
                                   is_bigendian=False, point_step=points.dtype.itemsize,
                                   row_step=points.dtype.itemsize * len(points), data=data, is_dense=True)
