"""RGB-D frames from ROS1 ``.bag`` and ROS2 (sqlite3, mcap) bags via ``rosbags`` (no ROS install needed).

Depth comes from an Image/CompressedImage topic or from a PointCloud2 topic; a cloud is moved into the colour
camera's frame with the bag's /tf_static and /tf when it is given in another frame, then turned into depth
aligned with the colour image (see :func:`mmtk.pointcloud.cloud_to_image_depth`).
Colour and depth are paired by header time stamps with a slop ``max_dt`` (one-to-one, closest pairs
first, like message_filters' approximate policy, in whatever order the stamps run; repeated stamps in log order;
stamps never set (0) make the pairing use log times); unpaired messages are counted and reported.
The bag is read in one pass (:class:`StreamPairer`): memory holds only the messages logged in the last 2 s
that wait for a partner, and only paired messages are decoded.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmtk.data.format import MAX_IMAGE_SIDE
from mmtk.data.codecs import Encoded, Quantized, plain
from mmtk.data.sources.depth_encoding import DepthEncoding, keep_depth, to_metres
from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.data.sources.pairing import associate_by_time
from mmtk.data.sources.image_files import check_image_size, encoded_colour
from mmtk.data.values import intrinsics_problem
from mmtk.data.sources.tf import TransformTree, read_transforms
from mmtk.errors import MmtkError
from mmtk.progress import counted
from mmtk.pointcloud import PointCloud, cloud_to_image_depth

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = {"16UC1": 1000.0, "mono16": 1000.0, "32FC1": None}  # units per metre (None = metres)


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
        return _topic_infos(reader)
    finally:
        reader.close()


def _topic_infos(reader: Any) -> list[TopicInfo]:
    counts: dict[str, TopicInfo] = {}
    for conn in reader.connections:
        info = counts.setdefault(conn.topic, TopicInfo(conn.topic, conn.msgtype, 0))
        info.count += conn.msgcount
    return sorted(counts.values(), key=lambda t: t.topic)


def image_topics(bag: str | Path) -> list[TopicInfo]:
    """The bag's Image, CompressedImage, PointCloud2 and CameraInfo topics (what `mmtk convert` can use)."""
    return [t for t in list_topics(bag) if t.msgtype in IMAGE_TYPES + (CLOUD_TYPE, CAMERA_INFO_TYPE)]


def _header_stamp(raw: bytes, is_ros2: bool) -> float:
    """Header stamp in seconds from raw message bytes (Image/CompressedImage/CameraInfo/PointCloud2 start with a
    Header)."""
    if len(raw) < 12:
        raise MmtkError(f"a message of {len(raw)} bytes is shorter than its header; the bag is corrupt")
    if is_ros2:  # CDR: 4-byte encapsulation (byte 1: 1 = little endian), then int32 sec, uint32 nanosec
        order = "<" if raw[1] == 1 else ">"
        sec, nsec = struct.unpack_from(order + "iI", raw, 4)
    else:  # ROS1: uint32 seq, then uint32 sec, uint32 nsec
        sec, nsec = struct.unpack_from("<II", raw, 4)
    return sec + nsec * 1e-9


def deserialize(reader: Any, raw: bytes, connection: Any) -> Any:
    """One message of ``connection``; a corrupt one (e.g. declaring a 4 GB array in a few bytes) is one line."""
    try:
        return reader.deserialize(raw, connection.msgtype)
    except Exception as err:  # rosbags raises SerdeError, struct.error, ValueError... for corrupt bytes
        raise MmtkError(f"a {connection.msgtype} message on {connection.topic} cannot be decoded ({err}); "
                        f"the bag is corrupt") from None


def _connections(reader: Any, topic: str, available: list[TopicInfo], role: str) -> list[Any]:
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        listing = ", ".join(f"{t.topic} ({t.msgtype.split('/')[-1]}, {t.count})" for t in available)
        raise MmtkError(f"{role} topic {topic!r} is not in the bag; its topics are: {listing}")
    return conns


def decode_image(msg: Any, msgtype: str, role: str,
                 depth_scale: float | None) -> np.ndarray | Encoded | Quantized:
    """Decode an Image/CompressedImage to uint8 RGB [H, W, 3] (role 'rgb'; a JPEG's own bytes as Encoded),
    depth [H, W] (role 'depth': integers with their scale as Quantized, float as metres), or its own samples (any
    other role, an extra stream: uint8/uint16/float32 [H, W] or uint8 [H, W, 3])."""
    if msgtype.endswith("CompressedImage"):
        return _decode_compressed(msg, role, depth_scale)
    encoding = str(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if role not in ("rgb", "depth"):
        if encoding not in SAMPLE_ENCODINGS:
            raise MmtkError(f"{role} topic encoding {encoding!r} is not supported; use one of "
                            f"{', '.join(SAMPLE_ENCODINGS)}")
        code, channels = SAMPLE_ENCODINGS[encoding]
        row_bytes = width * channels * np.dtype(code).itemsize
    elif role == "rgb":
        channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding)
        if channels is None:
            raise MmtkError(f"colour encoding {encoding!r} is not supported; use one of {', '.join(COLOR_ENCODINGS)}")
        row_bytes = width * channels
    elif encoding not in DEPTH_ENCODINGS:
        raise MmtkError(f"depth encoding {encoding!r} is not supported; use 16UC1 (mm) or 32FC1 (m)")
    else:
        row_bytes = width * (4 if encoding == "32FC1" else 2)
    _check_image_fields(role, encoding, height, width, step, row_bytes, len(msg.data))
    data = np.asarray(msg.data, dtype=np.uint8)
    rows = data[: height * step].reshape(height, step)
    if role not in ("rgb", "depth"):
        return _decode_samples(rows, encoding, width, bool(msg.is_bigendian))
    if role == "rgb":
        pixels = rows[:, :row_bytes].reshape(height, width, channels)
        if encoding == "mono8":
            return np.repeat(pixels, 3, axis=2)
        if encoding.startswith("bgr"):
            return np.ascontiguousarray(pixels[:, :, 2::-1])
        return np.ascontiguousarray(pixels[:, :, :3])
    dtype = np.dtype(np.uint16 if encoding != "32FC1" else np.float32).newbyteorder(">" if msg.is_bigendian else "<")
    values = rows[:, : width * dtype.itemsize].copy().view(dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    scale = depth_scale if depth_scale is not None else DEPTH_ENCODINGS[encoding]
    return keep_depth(values, DepthEncoding(None, scale), "depth image")


SAMPLE_ENCODINGS = {"mono8": ("u1", 1), "8UC1": ("u1", 1), "mono16": ("u2", 1), "16UC1": ("u2", 1),
                    "32FC1": ("f4", 1), "rgb8": ("u1", 3), "bgr8": ("u1", 3)}


def _decode_samples(rows: np.ndarray, encoding: str, width: int, big_endian: bool) -> np.ndarray:
    """An extra stream's image as stored samples: [H, W] for one channel, [H, W, 3] RGB for colour."""
    code, channels = SAMPLE_ENCODINGS[encoding]
    dtype = np.dtype(code).newbyteorder(">" if big_endian else "<")
    values = rows[:, : width * channels * dtype.itemsize].copy().view(dtype).astype(dtype.newbyteorder("="))
    values = values.reshape(rows.shape[0], width, channels)
    if encoding == "bgr8":
        values = values[:, :, ::-1]
    return np.ascontiguousarray(values[:, :, 0] if channels == 1 else values)


def _check_image_fields(role: str, encoding: str, height: int, width: int, step: int, row_bytes: int,
                        length: int) -> None:
    """An Image message's declared size must be plausible and match its data, before anything is allocated."""
    what = f"{role} image ({encoding}, {height}x{width} px, step {step} B)"
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise MmtkError(f"{what}: height and width must be 1..{MAX_IMAGE_SIDE} px; the bag is corrupt")
    if step < row_bytes:
        raise MmtkError(f"{what}: step is shorter than a row of {width} px ({row_bytes} B); the bag is corrupt")
    if length < height * step:
        raise MmtkError(f"{what} is truncated ({length} bytes for {height} rows of {step})")
    if length != height * step:
        raise MmtkError(f"{what}: data has {length} bytes, expected height x step = {height * step}; the bag is "
                        f"corrupt")


def _decode_compressed(msg: Any, role: str, depth_scale: float | None) -> np.ndarray:
    fmt = str(msg.format)
    payload = bytes(np.asarray(msg.data, dtype=np.uint8))
    if "compressedDepth" in fmt:
        if role != "depth":
            raise MmtkError(f"compressedDepth ({fmt!r}) given as the colour topic")
        # image_transport's compressedDepth: 12-byte header (int32 format, float32 quant A, B), then PNG
        if len(payload) < 12:
            raise MmtkError(f"compressedDepth image of {len(payload)} bytes is shorter than its 12-byte header")
        _, quant_a, quant_b = struct.unpack_from("<iff", payload, 0)
        values = _decode_bytes(payload[12:], fmt)
        if "32FC1" in fmt:  # stored as quantised inverse depth
            depth = np.zeros(values.shape, np.float32)
            valid = values > 0
            depth[valid] = quant_a / (values[valid].astype(np.float32) - quant_b)
            return to_metres(depth, depth_scale)
        return keep_depth(values, DepthEncoding(None, depth_scale if depth_scale is not None else 1000.0), f"compressed depth ({fmt!r})")
    if role == "rgb" and (encoded := encoded_colour(payload, f"compressed image ({fmt!r})")) is not None:
        return encoded  # the JPEG as the camera sent it; decoded (and so checked) when written
    array = _decode_bytes(payload, fmt)
    if role not in ("rgb", "depth"):
        return array
    if role == "rgb":
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.dtype != np.uint8:
            raise MmtkError(f"compressed colour image has dtype {array.dtype}; expected 8-bit")
        # PIL decodes to RGB; a "bgr8; jpeg compressed bgr8" message was encoded from BGR by cv2, which
        # writes a standard RGB JPEG/PNG, so no swap is needed.
        return np.ascontiguousarray(array[:, :, :3])
    if array.ndim != 2 or array.dtype != np.uint16:
        raise MmtkError(f"compressed depth image has dtype {array.dtype} {array.shape}; expected 16-bit mono PNG")
    return keep_depth(array, DepthEncoding(None, depth_scale if depth_scale is not None else 1000.0), f"compressed depth ({fmt!r})")


def _decode_bytes(payload: bytes, fmt: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload)) as image:
            check_image_size(image, f"compressed image ({fmt!r})")
            array = np.array(image)
    except UnidentifiedImageError:  # its message names an in-memory file object, of no use to anyone
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): its {len(payload)} bytes are not an image "
                        f"PIL can identify (corrupt or truncated)") from None
    except Image.DecompressionBombError as err:
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise MmtkError(f"cannot decode a compressed image ({fmt!r}): corrupt or truncated ({err})") from None
    if array.dtype == np.int32:
        array = array.astype(np.uint16)
    return array


def _camera_matrix(msg: Any) -> tuple[np.ndarray, tuple[int, int]]:
    k = np.asarray(getattr(msg, "k", None) if hasattr(msg, "k") else msg.K, dtype=np.float32).reshape(3, 3)
    return k, (int(msg.height), int(msg.width))


def open_rosbag_source(bag: str | Path, rgb_topic: str, depth_topic: str | None = None,
                       camera_info_topic: str | None = None, max_dt: float = 0.02, depth_scale: float | None = None,
                       cloud_topic: str | None = None, extra_topics: dict[str, str] | None = None) -> RgbdSource:
    """Plan the conversion of a bag: pair colour with depth (and any extra image topics) by stamp, read intrinsics.

    Depth comes from exactly one of ``depth_topic`` (Image/CompressedImage) and ``cloud_topic`` (PointCloud2,
    metres). A cloud in another frame than the colour image (a lidar, the depth camera) is moved into the colour
    camera's frame with the bag's /tf_static and /tf, then projected with the colour camera's intrinsics (the
    CameraInfo topic); a cloud in the colour frame and organized at the colour image's size is read as is.
    ``extra_topics`` maps a stored array name to an Image/CompressedImage topic (``--topic ir=/camera/ir/image``):
    it is paired with colour like depth and stored as decoded (e.g. uint16 for mono16), by that name's adapter.
    """
    if (depth_topic is None) == (cloud_topic is None):
        raise MmtkError("give exactly one depth source: --depth-topic (depth images) or --cloud-topic (PointCloud2)")
    if cloud_topic is not None and depth_scale is not None:
        raise MmtkError("--depth-scale applies to depth images; PointCloud2 points are already in metres")
    extra_topics = dict(extra_topics or {})
    for name in extra_topics:
        if name in ("rgb", "depth"):
            raise MmtkError(f"--topic {name}=... : {name} has its own option (--rgb-topic, --depth-topic)")
    bag = Path(bag)
    depth_source = depth_topic if depth_topic is not None else cloud_topic
    assert depth_source is not None
    topics = {"rgb": rgb_topic, "depth": depth_source, **extra_topics}  # role -> topic
    reader = open_reader(bag)
    available = _topic_infos(reader)
    notes: list[str] = []
    alignment: CloudAlignment | None = None
    try:
        conns = {role: _connections(reader, topic, available, "colour" if role == "rgb" else role)
                 for role, topic in topics.items()}
        for role, role_conns in conns.items():
            if role == "depth" and cloud_topic is not None:
                _check_type(role_conns[0], "cloud", (CLOUD_TYPE,), "PointCloud2")
            else:
                _check_type(role_conns[0], "colour" if role == "rgb" else role, IMAGE_TYPES, "Image or CompressedImage")
        if cloud_topic is not None:
            alignment, note = _cloud_alignment(reader, conns["rgb"][0], conns["depth"][0], max_dt)
            notes.extend(note)
        if camera_info_topic is None:
            camera_info_topic = _camera_info_beside(rgb_topic, available)
            if camera_info_topic:
                notes.append(f"intrinsics from {camera_info_topic} (pass --camera-info-topic to change)")
            else:
                notes.append("no CameraInfo topic beside the colour topic: frames get no intrinsics")
        info_conns = _camera_info_connections(reader, camera_info_topic, available)  # type checked before any frame
        if (problem := _first_camera_problem(reader, info_conns)) is not None:
            notes.append(f"NO intrinsics: the first CameraInfo on {camera_info_topic} is unusable ({problem}), so the "
                         f"frames are written without intrinsics (calibrate the camera, or pass --camera-info-topic)")
            camera_info_topic = None
        counts = {role: sum(c.msgcount for c in role_conns) for role, role_conns in conns.items()}
        unstamped = [topics[role] for role, role_conns in conns.items() if _first_stamp(reader, role_conns) == 0]
        by_log_time = bool(unstamped)
        if by_log_time:
            notes.append(f"header stamps are 0 (never set) on {', '.join(unstamped)}: every topic is paired by the "
                         f"time the recorder logged its messages instead")
    finally:
        reader.close()
    label = {"rgb": "colour", "depth": "depth" if cloud_topic is None else "cloud"}

    def frames() -> Iterator[Frame]:
        yield from _stream_frames(bag, topics, max_dt, depth_scale, camera_info_topic, label,
                                  from_cloud=cloud_topic is not None, alignment=alignment, by_log_time=by_log_time)

    def summary(written: int) -> str:  # each frame took one message of every stream
        dropped = " and ".join(f"{counts[role] - written} {label.get(role, role)}" for role in topics)
        return (f"paired {counted(written, 'frame')} within {max_dt * 1000:g} ms; dropped {dropped} messages without "
                f"a partner")

    description = f"ROS bag {bag.name}: " + " + ".join(topics.values())
    return RgbdSource("rosbag", description, min(counts.values()), frames, None, notes, summary)


def read_colour_frames(bag: str | Path, rgb_topic: str, camera_info_topic: str | None = None) -> Iterator[Frame]:
    """Every colour message of a bag as a frame without depth (for prediction from RGB alone)."""
    reader = open_reader(Path(bag))
    try:
        available = _topic_infos(reader)
        if camera_info_topic is None:
            camera_info_topic = _camera_info_beside(rgb_topic, available)
        rgb_conns = _connections(reader, rgb_topic, available, "colour")
        _check_type(rgb_conns[0], "colour", IMAGE_TYPES, "Image or CompressedImage")
        info_conns = _camera_info_connections(reader, camera_info_topic, available)
        intrinsics = _first_valid_camera(reader, info_conns)  # a camera's intrinsics do not change within a bag
        for index, (conn, log_time, raw) in enumerate(reader.messages(connections=rgb_conns)):
            stamp = _header_stamp(raw, bool(getattr(reader, "is2", False))) or log_time * 1e-9
            try:
                rgb = plain(decode_image(deserialize(reader, raw, conn), conn.msgtype, "rgb", None))
            except MmtkError as err:
                raise MmtkError(f"{message_name(conn.topic, index, stamp)}: {err}") from None
            yield Frame("all", {"rgb": rgb}, intrinsics=intrinsics, timestamp=stamp)
    finally:
        reader.close()


def _camera_info_beside(rgb_topic: str, available: list[TopicInfo]) -> str | None:
    """The camera_info topic of the colour topic's camera (/cam/rgb/image -> /cam/rgb/camera_info), if recorded."""
    guess = rgb_topic.rsplit("/", 1)[0] + "/camera_info"
    return guess if any(t.topic == guess for t in available) else None


def _camera_info_connections(reader: Any, topic: str | None, available: list[TopicInfo]) -> list[Any]:
    if topic is None:
        return []
    conns = _connections(reader, topic, available, "camera info")
    _check_type(conns[0], "camera info", (CAMERA_INFO_TYPE,), "CameraInfo")
    return conns


def _check_type(conn: Any, role: str, types: tuple[str, ...], expected: str) -> None:
    if conn.msgtype not in types:
        raise MmtkError(f"{role} topic {conn.topic!r} has type {conn.msgtype}, expected {expected}")


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


def _cloud_alignment(reader: Any, rgb_conn: Any, cloud_conn: Any,
                     max_dt: float) -> tuple[CloudAlignment | None, list[str]]:
    """How to bring the clouds into the colour camera's frame (None: they are in it already), and a note."""
    camera_frame, _ = _first_header(reader, rgb_conn)
    cloud_frame, cloud_stamp = _first_header(reader, cloud_conn)
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


def _first_camera_problem(reader: Any, info_conns: list[Any]) -> str | None:
    """What makes the first CameraInfo's K unusable (all zeros from an uncalibrated camera, NaN), or None."""
    first = next(iter(reader.messages(connections=info_conns)), None) if info_conns else None
    return None if first is None else intrinsics_problem(_camera_matrix(deserialize(reader, first[2], first[0]))[0])


def _first_valid_camera(reader: Any, info_conns: list[Any]) -> np.ndarray | None:
    """K of the first CameraInfo whose K is usable (see :func:`intrinsics_problem`), or None."""
    for conn, _, raw in reader.messages(connections=info_conns) if info_conns else ():
        k = _camera_matrix(deserialize(reader, raw, conn))[0]
        if intrinsics_problem(k) is None:
            return k
    return None


def _first_stamp(reader: Any, conns: list[Any]) -> float | None:
    """Header stamp (s) of the first message of ``conns`` (None when there is none)."""
    first = next(iter(reader.messages(connections=conns)), None)
    return None if first is None else _header_stamp(first[2], bool(getattr(reader, "is2", False)))


def _first_header(reader: Any, conn: Any) -> tuple[str, float]:
    """frame_id and stamp (s) of a topic's first message ("" and 0 when it has none)."""
    first = next(iter(reader.messages(connections=[conn])), None)
    if first is None:
        return "", 0.0
    header = deserialize(reader, first[2], conn).header
    return str(header.frame_id).lstrip("/"), header.stamp.sec + header.stamp.nanosec * 1e-9


MAX_FRAMES_BEFORE_INFO = 64  # frames held back while no CameraInfo has arrived yet (then written without K)
# A message is waited for while the bag's log time is within this of it: a partner logged later than this (a
# stream that stopped, or stamps running this far against the log order) is not waited for, so memory stays bounded.
MAX_STREAM_LAG_S = 2.0


class StreamPairer:
    """Pairs colour messages with a message of every other stream as they arrive, in one pass over a bag.

    Pairing is one-to-one by header stamp within ``max_dt``, closest pairs first (:func:`associate_by_time`, like
    message_filters' approximate policy; repeated stamps are paired in log order), whatever order the stamps run
    in. A colour message is decided once it has a partner on every stream and every stream has reached 2 x max_dt
    past its stamp (no closer partner can follow), or once the bag's log time is :data:`MAX_STREAM_LAG_S` past the
    time it was logged (a partner still missing then is not waited for: the message is dropped). Messages of other
    streams are kept until taken or until as old. So only the messages of that window wait in memory, whatever the
    bag's length. Payloads are opaque (raw messages): only the paired ones are ever decoded.
    """

    def __init__(self, roles: list[str], max_dt: float) -> None:
        self.roles, self.max_dt = roles, max_dt
        self.pending: dict[str, list[tuple[float, float, Any]]] = {role: [] for role in roles}  # stamp, log time
        self.latest = {role: -np.inf for role in roles}
        self.logged = -np.inf  # the bag's newest log time so far (s)
        self.seen = {role: 0 for role in roles}

    def add(self, role: str, stamp: float, payload: Any, log_time: float | None = None) -> list[tuple[float, dict]]:
        """Take one message (``log_time``: when the recorder logged it, s; default its stamp); return the frames
        (colour stamp, role -> payload) this decides."""
        log_time = stamp if log_time is None else log_time
        self.pending[role].append((stamp, log_time, payload))
        self.latest[role] = max(self.latest[role], stamp)
        self.logged = max(self.logged, log_time)
        self.seen[role] += 1
        return self._decide(min(self.latest.values()) - 2 * self.max_dt, self.logged - MAX_STREAM_LAG_S)

    def finish(self) -> list[tuple[float, dict[str, Any]]]:
        """The frames left once the bag has ended."""
        return self._decide(np.inf, np.inf)

    def _decide(self, horizon: float, expired: float) -> list[tuple[float, dict[str, Any]]]:
        """Decide the colour messages stamped up to ``horizon`` that have partners, and those logged up to
        ``expired``; forget other messages logged up to ``expired``."""
        if not (any(item[0] <= horizon for item in self.pending["rgb"])
                or any(item[1] <= expired for items in self.pending.values() for item in items)):
            return []
        colour = sorted(self.pending["rgb"], key=lambda item: item[:2])
        others = {role: sorted(self.pending[role], key=lambda item: item[:2]) for role in self.roles if role != "rgb"}
        stamps, logs = [item[0] for item in colour], [item[1] for item in colour]
        partners = {role: dict(associate_by_time(stamps, [item[0] for item in items], self.max_dt, logs,
                                                 [item[1] for item in items])) for role, items in others.items()}
        decided, waiting, taken = [], [], {role: set() for role in others}
        for index, item in enumerate(colour):
            paired = all(index in pairs for pairs in partners.values())
            if not ((paired and item[0] <= horizon) or item[1] <= expired):
                waiting.append(item)
            elif paired:
                parts = {"rgb": item[2]}
                for role, pairs in partners.items():
                    parts[role] = others[role][pairs[index]][2]
                    taken[role].add(pairs[index])
                decided.append((item[0], parts))
        self.pending["rgb"] = waiting
        for role, items in others.items():
            self.pending[role] = [item for k, item in enumerate(items) if k not in taken[role] and item[1] > expired]
        return decided


def _stream_frames(bag: Path, topics: dict[str, str], max_dt: float, depth_scale: float | None,
                   camera_info_topic: str | None, label: dict[str, str], from_cloud: bool,
                   alignment: CloudAlignment | None, by_log_time: bool = False) -> Iterator[Frame]:
    """Read the bag once: CameraInfo kept as it comes, every stream paired on the fly, paired messages decoded.
    ``by_log_time``: pair by the time the recorder logged each message instead of its header stamp."""
    reader = open_reader(bag)
    try:
        available = _topic_infos(reader)
        role_of = {topic: role for role, topic in topics.items()}
        info_conns = _camera_info_connections(reader, camera_info_topic, available)
        conns = [c for c in reader.connections if c.topic in role_of] + info_conns
        is_ros2 = bool(getattr(reader, "is2", False))
        pairer = StreamPairer(list(topics), max_dt)
        infos = CameraInfos()
        waiting: list[tuple[float, dict]] = []  # frames decided before the first CameraInfo arrived
        written = 0
        for conn, log_time, raw in reader.messages(connections=conns):
            stamp = log_time * 1e-9 if by_log_time else _header_stamp(raw, is_ros2) or log_time * 1e-9
            if conn in info_conns:
                k, size = _camera_matrix(deserialize(reader, raw, conn))
                if intrinsics_problem(k) is None:  # a later invalid one is skipped: frames keep the nearest valid K
                    infos.add(stamp, k, size)
            else:
                role = role_of[conn.topic]
                waiting += pairer.add(role, stamp, (conn, raw, stamp, pairer.seen[role]), log_time * 1e-9)
            if infos.times or not info_conns or len(waiting) > MAX_FRAMES_BEFORE_INFO:
                for frame_stamp, parts in waiting:
                    written += 1
                    yield _decoded_frame(reader, parts, frame_stamp, topics, infos, depth_scale, from_cloud, alignment)
                waiting = []
        for frame_stamp, parts in waiting + pairer.finish():
            written += 1
            yield _decoded_frame(reader, parts, frame_stamp, topics, infos, depth_scale, from_cloud, alignment)
    finally:
        reader.close()
    if not written:
        seen = ", ".join(f"{n} {label.get(role, role)}" for role, n in pairer.seen.items())
        others = "a " + label["depth"] if len(topics) == 2 else "a partner on every other topic"
        raise MmtkError(f"no colour message has {others} message within --max-dt {max_dt} s ({seen} messages)")


def _decoded_frame(reader: Any, parts: dict[str, tuple[Any, bytes, float, int]], stamp: float, topics: dict[str, str],
                   infos: CameraInfos, depth_scale: float | None,
                   from_cloud: bool, alignment: CloudAlignment | None) -> Frame:
    arrays: dict[str, Any] = {}
    for role, (conn, raw, message_stamp, index) in parts.items():
        try:
            msg = deserialize(reader, raw, conn)
            if role == "depth" and from_cloud:
                cloud = pointcloud2_to_cloud(msg)
                arrays[role] = cloud if alignment is None else alignment.to_camera(cloud, message_stamp)
            else:
                arrays[role] = decode_image(msg, conn.msgtype, role, depth_scale if role == "depth" else None)
        except MmtkError as err:
            raise MmtkError(f"{message_name(conn.topic, index, message_stamp)}: {err}") from None
    size = arrays["rgb"].shape[:2]
    k = infos.nearest(stamp, size)
    if from_cloud:
        arrays["depth"] = _cloud_depth(arrays["depth"], size, k, topics["depth"])
    return Frame("all", arrays, intrinsics=k, timestamp=stamp, frame_id=f"{topics['rgb']}#{parts['rgb'][3]}")


def message_name(topic: str, index: int, stamp: float) -> str:
    """Where a message sits in a bag, for an error about it: topic, index among the topic's messages, stamp."""
    return f"{topic} message #{index} (stamp {stamp:.6f} s)"


def _cloud_depth(cloud: PointCloud, size: tuple[int, int], k: np.ndarray | None, topic: str) -> np.ndarray:
    """Depth [H, W] metres (0 = invalid) aligned with the colour image, from a decoded PointCloud2."""
    if k is None and not (cloud.organized and cloud.points.shape[:2] == tuple(size)):
        layout = (f"organized {cloud.points.shape[1]}x{cloud.points.shape[0]}" if cloud.organized
                  else f"unorganized ({cloud.points.shape[0]} points)")
        raise MmtkError(f"cloud topic {topic!r} is {layout}, not the {size[1]}x{size[0]} colour image's layout, so "
                        f"it must be projected with the colour camera's intrinsics; pass its CameraInfo topic "
                        f"with --camera-info-topic")
    return cloud_to_image_depth(cloud, size, k)


@dataclass
class CameraInfos:
    """The CameraInfo messages of a bag so far, kept sorted by stamp: the nearest to a frame is a bisection, not a
    scan (a bag has a CameraInfo per frame, so a scan per frame grew quadratically with the bag's length)."""

    times: list[float] = field(default_factory=list)  # seconds, ascending
    cameras: list[tuple[np.ndarray, tuple[int, int]]] = field(default_factory=list)  # K [3, 3] px, (H, W)

    def add(self, stamp: float, k: np.ndarray, size: tuple[int, int]) -> None:
        index = bisect.bisect_right(self.times, stamp)
        self.times.insert(index, stamp)
        self.cameras.insert(index, (k, size))

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


# sensor_msgs/PointField datatype codes -> numpy dtypes (little-endian; byte order is set per message).
_POINTFIELD_DTYPES: dict[int, str] = {
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8",
}


# ------------------------------------------------------------------------------ ROS PointCloud2

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
        clouds = [c for c in reader.connections if c.msgtype == "sensor_msgs/msg/PointCloud2"]
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
