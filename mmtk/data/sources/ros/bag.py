"""Opening a ROS1 ``.bag`` or ROS2 (sqlite3, mcap) bag with ``rosbags`` (no ROS install needed): its topics, its
messages' header stamps, decoding one message, and where a message sits (for errors)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtk.errors import MmtkError

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"


@dataclass
class TopicInfo:
    """One topic of a bag."""

    topic: str
    msgtype: str
    count: int


def _bag_path(bag: Path) -> Path:
    if not bag.exists():
        raise MmtkError(f"{bag} does not exist")
    if bag.is_file() and bag.suffix in (".mcap", ".db3") and (bag.parent / "metadata.yaml").is_file():
        return bag.parent  # rosbag2 is read as its directory
    return bag


def open_reader(bag: Path) -> Any:
    """An open rosbags reader of a ROS1 bag or ROS2 bag (its folder, or a file in it); MmtkError when unreadable."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    try:  # AnyReader already reads the file to tell ROS1 from ROS2
        reader = AnyReader([_bag_path(bag)], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as err:  # rosbags raises several reader-specific error types
        raise MmtkError(f"{bag} is not a readable ROS1 bag or ROS2 bag directory ({err}); "
                        f"it may be truncated or corrupt") from None
    return reader


def list_topics(bag: str | Path) -> list[TopicInfo]:
    """All topics of a bag with message type and count."""
    reader = open_reader(Path(bag))
    try:
        return topic_infos(reader)
    finally:
        reader.close()


def topic_infos(reader: Any) -> list[TopicInfo]:
    counts: dict[str, TopicInfo] = {}
    for conn in reader.connections:
        info = counts.setdefault(conn.topic, TopicInfo(conn.topic, conn.msgtype, 0))
        info.count += conn.msgcount
    return sorted(counts.values(), key=lambda t: t.topic)


def image_topics(bag: str | Path) -> list[TopicInfo]:
    """The bag's Image, CompressedImage, PointCloud2 and CameraInfo topics (what `mmtk convert` can use)."""
    return [t for t in list_topics(bag) if t.msgtype in IMAGE_TYPES + (CLOUD_TYPE, CAMERA_INFO_TYPE)]


def header_stamp_ns(raw: bytes, ros2: bool) -> int:
    """Header stamp in nanoseconds from raw message bytes (Image/CompressedImage/CameraInfo/PointCloud2 start with a
    Header), as recorded: 0 when the publisher never set it."""
    if len(raw) < 12:
        raise MmtkError(f"a message of {len(raw)} bytes is shorter than its header; the bag is corrupt")
    if ros2:  # CDR: 4-byte encapsulation (byte 1: 1 = little endian), then int32 sec, uint32 nanosec
        order = "<" if raw[1] == 1 else ">"
        sec, nsec = struct.unpack_from(order + "iI", raw, 4)
    else:  # ROS1: uint32 seq, then uint32 sec, uint32 nsec
        sec, nsec = struct.unpack_from("<II", raw, 4)
    return sec * 1_000_000_000 + nsec


def ns_to_seconds(ns: int) -> float:
    """Seconds of a ROS time in nanoseconds, as ``sec + nanosec * 1e-9`` (the digits ROS tools print)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec + nsec * 1e-9


def pairing_time(raw: bytes, log_time_ns: int, ros2: bool, by_log_time: bool) -> float:
    """The time (s) a message is paired by: its header stamp, or when the recorder logged it (``by_log_time``, or
    a stamp never set)."""
    stamp = 0 if by_log_time else header_stamp_ns(raw, ros2)
    return ns_to_seconds(stamp or log_time_ns)


def is_ros2(reader: Any) -> bool:
    """Whether an open reader reads a ROS2 bag (CDR messages) rather than a ROS1 bag."""
    return bool(getattr(reader, "is2", False))


def deserialize(reader: Any, raw: bytes, connection: Any) -> Any:
    """One message of ``connection``; a corrupt one (e.g. declaring a 4 GB array in a few bytes) is one line."""
    try:
        return reader.deserialize(raw, connection.msgtype)
    except Exception as err:  # rosbags raises SerdeError, struct.error, ValueError... for corrupt bytes
        raise MmtkError(f"a {connection.msgtype} message on {connection.topic} cannot be decoded ({err}); "
                        f"the bag is corrupt") from None


def topic_connections(reader: Any, topic: str, available: list[TopicInfo], role: str) -> list[Any]:
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        listing = ", ".join(f"{t.topic} ({t.msgtype.split('/')[-1]}, {t.count})" for t in available)
        raise MmtkError(f"{role} topic {topic!r} is not in the bag; its topics are: {listing}")
    return conns


def check_type(conn: Any, role: str, types: tuple[str, ...], expected: str) -> None:
    if conn.msgtype not in types:
        raise MmtkError(f"{role} topic {conn.topic!r} has type {conn.msgtype}, expected {expected}")


def first_stamp(reader: Any, conns: list[Any]) -> float | None:
    """Header stamp (s) of the first message of ``conns`` (None when there is none)."""
    first = next(iter(reader.messages(connections=conns)), None)
    return None if first is None else ns_to_seconds(header_stamp_ns(first[2], is_ros2(reader)))


def first_header(reader: Any, conn: Any) -> tuple[str, float]:
    """frame_id and stamp (s) of a topic's first message ("" and 0 when it has none)."""
    first = next(iter(reader.messages(connections=[conn])), None)
    if first is None:
        return "", 0.0
    header = deserialize(reader, first[2], conn).header
    return str(header.frame_id).lstrip("/"), header.stamp.sec + header.stamp.nanosec * 1e-9


def message_name(topic: str, index: int, stamp: float) -> str:
    """Where a message sits in a bag, for an error about it: topic, index among the topic's messages, stamp."""
    return f"{topic} message #{index} (stamp {stamp:.6f} s)"
