"""A bag as a source of frames (what `mmtk convert --rosbag` and `mmtk predict --rosbag` read).

Colour comes from an Image/CompressedImage topic; depth, when asked for, from an Image/CompressedImage topic or from
a PointCloud2 topic (moved into the colour camera's frame with the bag's /tf_static and /tf when it is given in
another frame, then turned into depth aligned with the colour image); further image topics are stored by their
adapters. The streams are paired by header stamp with a slop ``max_dt`` (:class:`StreamPairer`: one-to-one, closest
pairs first, in one pass); stamps never set (0) make the pairing use log times; unpaired messages are counted and
reported. Every frame carries the header of its colour message as recorded (:class:`MessageHeader`), so that what
is predicted from it can be stamped and framed like it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from mmtk.data.sources.frame import Frame, MessageHeader, RgbdSource
from mmtk.data.sources.ros.bag import (CLOUD_TYPE, IMAGE_TYPES, TopicInfo, check_type, deserialize, first_stamp,
                                       is_ros2, message_name, open_reader, pairing_time, topic_connections,
                                       topic_infos)
from mmtk.data.sources.ros.camera_info import (CameraInfos, camera_info_beside, camera_info_connections,
                                               first_usable_camera)
from mmtk.data.sources.ros.clouds import CloudAlignment, cloud_alignment, cloud_depth, pointcloud2_to_cloud
from mmtk.data.sources.ros.images import decode_image
from mmtk.data.sources.ros.pairer import StreamPairer
from mmtk.errors import MmtkError
from mmtk.progress import counted


class BagMessage(NamedTuple):
    """A message waiting to be paired, undecoded: where it is (topic index) and its times."""

    conn: Any
    raw: bytes
    stamp: float  # the time it is paired by (s)
    log_time_ns: int
    index: int  # among its topic's messages


@dataclass
class BagPlan:
    """What reading a bag needs, found before any frame: topics by role, how depth is made, the first usable camera
    and how messages are timed."""

    topics: dict[str, str]  # role ("rgb", "depth", a stored array name) -> topic
    counts: dict[str, int]  # role -> messages
    camera_info_topic: str | None
    cameras: CameraInfos  # the first usable CameraInfo, so that frames before it take its K
    by_log_time: bool
    from_cloud: bool
    alignment: CloudAlignment | None
    notes: list[str] = field(default_factory=list)

    def label(self, role: str) -> str:
        """How the user calls a role's messages."""
        return {"rgb": "colour", "depth": "cloud" if self.from_cloud else "depth"}.get(role, role)


def check_depth_topics(depth_topic: str | None, cloud_topic: str | None, depth_scale: float | None) -> None:
    """Refuse depth options that contradict each other, before a bag is read."""
    if depth_topic is not None and cloud_topic is not None:
        raise MmtkError("give exactly one depth source: --depth-topic (depth images) or --cloud-topic (PointCloud2), "
                        "not both (neither: colour alone)")
    if cloud_topic is not None and depth_scale is not None:
        raise MmtkError("--depth-scale applies to depth images; PointCloud2 points are already in metres")


def open_rosbag_source(bag: str | Path, rgb_topic: str, depth_topic: str | None = None,
                       camera_info_topic: str | None = None, max_dt: float = 0.02, depth_scale: float | None = None,
                       cloud_topic: str | None = None, extra_topics: dict[str, str] | None = None) -> RgbdSource:
    """Plan the reading of a bag: pair colour with depth (and any extra image topics) by stamp, read intrinsics.

    Depth comes from at most one of ``depth_topic`` (Image/CompressedImage) and ``cloud_topic`` (PointCloud2,
    metres); without either the frames hold colour (and the extra topics) alone. A cloud in another frame than the
    colour image (a lidar, the depth camera) is moved into the colour camera's frame with the bag's /tf_static and
    /tf, then projected with the colour camera's intrinsics (the CameraInfo topic); a cloud in the colour frame and
    organized at the colour image's size is read as is. ``extra_topics`` maps a stored array name to an
    Image/CompressedImage topic (``--topic ir=/camera/ir/image``): it is paired with colour like depth and stored as
    decoded (e.g. uint16 for mono16), by that name's adapter. Intrinsics come from the CameraInfo nearest in time
    whose K is usable; frames before the first usable one take its K.
    """
    check_depth_topics(depth_topic, cloud_topic, depth_scale)
    for name in extra_topics or {}:
        if name in ("rgb", "depth"):
            raise MmtkError(f"--topic {name}=... : {name} has its own option (--rgb-topic, --depth-topic)")
    bag = Path(bag)
    depth_source = depth_topic if depth_topic is not None else cloud_topic
    topics = {"rgb": rgb_topic, **({"depth": depth_source} if depth_source else {}), **(extra_topics or {})}
    reader = open_reader(bag)
    try:
        plan = _plan(reader, topics, camera_info_topic, max_dt, from_cloud=cloud_topic is not None)
    finally:
        reader.close()

    def frames() -> Iterator[Frame]:
        yield from _stream_frames(bag, plan, max_dt, depth_scale)

    def summary(written: int) -> str:  # each frame took one message of every stream
        if len(topics) == 1:
            return f"read {counted(written, 'frame')} of colour alone (no depth topic)"
        dropped = " and ".join(f"{plan.counts[role] - written} {plan.label(role)}" for role in topics)
        return (f"paired {counted(written, 'frame')} within {max_dt * 1000:g} ms; dropped {dropped} messages without "
                f"a partner")

    description = f"ROS bag {bag.name}: " + " + ".join(topics.values())
    return RgbdSource("rosbag", description, min(plan.counts.values()), frames, None, plan.notes, summary)


def _plan(reader: Any, topics: dict[str, str], camera_info_topic: str | None, max_dt: float,
          from_cloud: bool) -> BagPlan:
    """Check the topics and their types, find how clouds align, how messages are timed and the first camera."""
    available = topic_infos(reader)
    conns = {role: topic_connections(reader, topic, available, "colour" if role == "rgb" else role)
             for role, topic in topics.items()}
    for role, role_conns in conns.items():
        if role == "depth" and from_cloud:
            check_type(role_conns[0], "cloud", (CLOUD_TYPE,), "PointCloud2")
        else:
            check_type(role_conns[0], "colour" if role == "rgb" else role, IMAGE_TYPES, "Image or CompressedImage")
    notes: list[str] = []
    alignment = None
    if from_cloud:
        alignment, note = cloud_alignment(reader, conns["rgb"][0], conns["depth"][0], max_dt)
        notes.extend(note)
    unstamped = [topics[role] for role, role_conns in conns.items() if first_stamp(reader, role_conns) == 0]
    if unstamped:
        notes.append(f"header stamps are 0 (never set) on {', '.join(unstamped)}: every topic is paired by the "
                     f"time the recorder logged its messages instead")
    camera_info_topic, cameras = _camera(reader, topics["rgb"], camera_info_topic, available, bool(unstamped), notes)
    counts = {role: sum(c.msgcount for c in role_conns) for role, role_conns in conns.items()}
    return BagPlan(topics, counts, camera_info_topic, cameras, bool(unstamped), from_cloud, alignment, notes)


def _camera(reader: Any, rgb_topic: str, topic: str | None, available: list[TopicInfo], by_log_time: bool,
            notes: list[str]) -> tuple[str | None, CameraInfos]:
    """The CameraInfo topic to read (None: frames get no intrinsics) and its first usable camera; notes say which."""
    if topic is None:
        topic = camera_info_beside(rgb_topic, available)
        notes.append(f"intrinsics from {topic} (pass --camera-info-topic to change)" if topic else
                     "no CameraInfo topic beside the colour topic: frames get no intrinsics")
    info_conns = camera_info_connections(reader, topic, available)  # type checked before any frame
    cameras, problem = first_usable_camera(reader, info_conns, by_log_time)
    if problem is not None and not cameras.times:
        notes.append(f"NO intrinsics: the first CameraInfo on {topic} is unusable ({problem}) and so is every later "
                     f"one, so the frames are written without intrinsics (calibrate the camera, or pass "
                     f"--camera-info-topic)")
        return None, cameras
    if problem is not None:
        notes.append(f"the first CameraInfo on {topic} is unusable ({problem}): intrinsics from the first usable one "
                     f"({cameras.times[0]:.6f} s) on, for the frames before it too")
    return topic, cameras


def _stream_frames(bag: Path, plan: BagPlan, max_dt: float, depth_scale: float | None) -> Iterator[Frame]:
    """Read the bag once: CameraInfo kept as it comes, every stream paired on the fly, paired messages decoded."""
    reader = open_reader(bag)
    try:
        role_of = {topic: role for role, topic in plan.topics.items()}
        info_conns = camera_info_connections(reader, plan.camera_info_topic, topic_infos(reader))
        conns = [c for c in reader.connections if c.topic in role_of] + info_conns
        ros2 = is_ros2(reader)
        pairer = StreamPairer(list(plan.topics), max_dt)
        infos = CameraInfos(list(plan.cameras.times), list(plan.cameras.cameras))
        written = 0
        for conn, log_time, raw in reader.messages(connections=conns):
            stamp = pairing_time(raw, log_time, ros2, plan.by_log_time)
            if conn in info_conns:
                infos.add_message(reader, conn, raw, stamp)  # a later unusable one is skipped: the nearest usable K
                continue
            role = role_of[conn.topic]
            message = BagMessage(conn, raw, stamp, log_time, pairer.seen[role])
            for frame_stamp, parts in pairer.add(role, stamp, message, log_time * 1e-9):
                written += 1
                yield _decoded_frame(reader, parts, frame_stamp, plan, infos, depth_scale)
        for frame_stamp, parts in pairer.finish():
            written += 1
            yield _decoded_frame(reader, parts, frame_stamp, plan, infos, depth_scale)
    finally:
        reader.close()
    if not written:
        seen = ", ".join(f"{n} {plan.label(role)}" for role, n in pairer.seen.items())
        if len(plan.topics) == 1:
            raise MmtkError(f"no colour message on {plan.topics['rgb']} ({seen} messages)")
        others = ("a " + plan.label("depth") if list(plan.topics) == ["rgb", "depth"]
                  else "a partner on every other topic")
        raise MmtkError(f"no colour message has {others} message within --max-dt {max_dt} s ({seen} messages)")


def _decoded_frame(reader: Any, parts: dict[str, BagMessage], stamp: float, plan: BagPlan, infos: CameraInfos,
                   depth_scale: float | None) -> Frame:
    """One frame of paired messages, decoded, with the colour message's header and the nearest usable K."""
    arrays: dict[str, Any] = {}
    for role, message in parts.items():
        try:
            msg = deserialize(reader, message.raw, message.conn)
            if role == "depth" and plan.from_cloud:
                cloud = pointcloud2_to_cloud(msg)
                arrays[role] = cloud if plan.alignment is None else plan.alignment.to_camera(cloud, message.stamp)
            else:
                arrays[role] = decode_image(msg, message.conn.msgtype, role, depth_scale if role == "depth" else None)
        except MmtkError as err:
            raise MmtkError(f"{message_name(message.conn.topic, message.index, message.stamp)}: {err}") from None
        if role == "rgb":
            header = _header(msg, message.log_time_ns)
    size = arrays["rgb"].shape[:2]
    k = infos.nearest(stamp, size)
    if plan.from_cloud:
        arrays["depth"] = cloud_depth(arrays["depth"], size, k, plan.topics["depth"])
    colour = parts["rgb"]
    return Frame("all", arrays, intrinsics=k, timestamp=stamp, frame_id=f"{colour.conn.topic}#{colour.index}",
                 header=header)


def _header(msg: Any, log_time_ns: int) -> MessageHeader:
    """A message's header as recorded (a stamp never set stays 0) and the time it was logged."""
    stamp = msg.header.stamp
    return MessageHeader(int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec), str(msg.header.frame_id), log_time_ns)
