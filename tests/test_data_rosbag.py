"""`mmtk convert --rosbag`: ROS1 .bag and ROS2 (sqlite3, mcap) bags with real frames."""

from __future__ import annotations

import io
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_helpers import DecodedFile, BAG1, DEPTH_TOPIC, RGB_TOPIC, SAMPLES, kinect_intrinsics, run_cli, shared
from mmtk.data.codecs import Encoded, Quantized, plain
from mmtk.data.sources.ros.images import decode_image
from mmtk.errors import MmtkError


def sample_frames():
    """The two real frames of the sample ROS1 bag: [(stamp_ns, rgb [H,W,3], depth_mm [H,W] uint16)]."""
    from rosbags.highlevel import AnyReader

    frames: dict[int, dict] = {}
    with AnyReader([BAG1]) as reader:
        conns = [c for c in reader.connections if c.topic in (RGB_TOPIC, DEPTH_TOPIC)]
        for conn, _, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            entry = frames.setdefault(stamp, {})
            if conn.topic == RGB_TOPIC:
                entry["rgb"] = np.asarray(msg.data).reshape(480, 640, 3)
            else:
                entry["mm"] = np.asarray(msg.data).view("<u2").reshape(480, 640)
    return [(s, frames[s]["rgb"], frames[s]["mm"]) for s in sorted(frames)]


def convert_bag(bag, out, *extra):
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC,
                         "--no-progress", *extra)
    assert code == 0, text
    return text


def test_ros1_bag_values_intrinsics_timestamps(tmp_path):
    out = tmp_path / "bag.h5"
    text = convert_bag(BAG1, out)
    assert "paired 2 frames" in text and "intrinsics from /camera/rgb/camera_info" in text
    frames = sample_frames()
    with DecodedFile(out) as f:
        np.testing.assert_allclose(f["all/timestamp"][:], [1355494975.814212, 1355494976.068683], atol=1e-6)
        for i, (_, rgb, mm) in enumerate(frames):
            np.testing.assert_array_equal(f["all/rgb"][i], rgb)
            np.testing.assert_allclose(f["all/depth"][i], mm / 1000.0, rtol=1e-6)
        np.testing.assert_array_equal(f["all/intrinsics"][0], [[525, 0, 320], [0, 525, 240], [0, 0, 1]])
        assert 0.6 < f["all/depth"].attrs["min_m"] < f["all/depth"].attrs["max_m"] < 1.8


def test_bag_without_topics_lists_image_topics(tmp_path):
    code, text = run_cli("convert", "--rosbag", BAG1)
    assert code == 0
    assert "/camera/rgb/image_color" in text and "sensor_msgs/msg/Image" in text and "2 messages" in text


def test_missing_topic_lists_bag_topics(tmp_path):
    out = tmp_path / "o.h5"
    code, text = run_cli("convert", "--rosbag", BAG1, out, "--rgb-topic", "/camera/color", "--depth-topic",
                         DEPTH_TOPIC)
    assert code == 2 and "colour topic '/camera/color' is not in the bag" in text
    assert "/camera/rgb/image_color (Image, 2)" in text and not out.exists()


def test_truncated_bag(tmp_path):
    bad = tmp_path / "bad.bag"
    bad.write_bytes(BAG1.read_bytes()[:4000])
    code, text = run_cli("convert", "--rosbag", bad, tmp_path / "o.h5", "--rgb-topic", RGB_TOPIC, "--depth-topic",
                         DEPTH_TOPIC)
    assert code == 2 and "truncated or corrupt" in text and not (tmp_path / "o.h5").exists()


def write_ros2_bag(path, storage: str, depth_offset_ns: list[int]):
    """A ROS2 bag with the sample's real frames as bgr8 colour, 32FC1 depth (NaN holes) and CameraInfo."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Image_, Info, Header, Time = (store.types[t] for t in ("sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo",
                                                           "std_msgs/msg/Header", "builtin_interfaces/msg/Time"))
    Roi = store.types["sensor_msgs/msg/RegionOfInterest"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        c_rgb = writer.add_connection("/cam/color", "sensor_msgs/msg/Image", typestore=store)
        c_depth = writer.add_connection("/cam/depth", "sensor_msgs/msg/Image", typestore=store)
        c_info = writer.add_connection("/cam/camera_info", "sensor_msgs/msg/CameraInfo", typestore=store)
        for (stamp, rgb, mm), offset in zip(sample_frames(), depth_offset_ns):
            def header(ns):
                return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera")
            bgr = np.ascontiguousarray(rgb[:, :, ::-1]).reshape(-1)
            metres = np.where(mm > 0, mm / np.float32(1000), np.nan).astype("<f4")
            writer.write(c_rgb, stamp, store.serialize_cdr(Image_(header(stamp), 480, 640, "bgr8", 0, 1920, bgr),
                                                           c_rgb.msgtype))
            writer.write(c_depth, stamp + offset, store.serialize_cdr(
                Image_(header(stamp + offset), 480, 640, "32FC1", 0, 2560, metres.view(np.uint8).reshape(-1)),
                c_depth.msgtype))
            info = Info(header(stamp), 480, 640, "plumb_bob", np.zeros(5), np.array([520.0, 0, 319.5, 0, 521.0, 239.5, 0, 0, 1]),
                        np.eye(3).reshape(-1), np.zeros(12), 0, 0, Roi(0, 0, 0, 0, False))
            writer.write(c_info, stamp, store.serialize_cdr(info, c_info.msgtype))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_ros2_bags_bgr8_32fc1_and_time_sync(tmp_path, storage):
    bag = tmp_path / f"bag_{storage}"
    write_ros2_bag(bag, storage, depth_offset_ns=[5_000_000, 100_000_000])  # 5 ms: paired; 100 ms: dropped
    out = tmp_path / "o.h5"
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--depth-topic", "/cam/depth",
                         "--max-dt", "0.02", "--no-progress")
    assert code == 0, text
    assert "paired 1 frame within 20 ms; dropped 1 colour and 1 depth messages" in text
    stamp, rgb, mm = sample_frames()[0]
    with DecodedFile(out) as f:
        np.testing.assert_array_equal(f["all/rgb"][0], rgb)                      # bgr8 swapped back to RGB
        np.testing.assert_array_equal(f["all/depth"][0], np.where(mm > 0, mm / np.float32(1000), 0))
        assert f["all/intrinsics"][0][0, 2] == pytest.approx(319.5)
        assert f["all/timestamp"][0] == pytest.approx(stamp * 1e-9)


def test_shared_ros1_float_depth_topic_and_ros2_mcap(tmp_path):
    ros1 = shared("rosbag_pcl_kinect/pcl_kinect_3frames.bag")
    out16, out32, out2 = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    convert_bag(ros1, out16)
    code, text = run_cli("convert", "--rosbag", ros1, out32, "--rgb-topic", RGB_TOPIC, "--depth-topic",
                         "/camera/depth_registered/image", "--no-progress")
    assert code == 0, text
    convert_bag(shared("rosbag_pcl_kinect/pcl_kinect_3frames_ros2"), out2)
    tiff = np.array(Image.open(shared("pcl_kinect_grabber/tiff/frame_20121214T142256.332395_depth.tiff")))
    with DecodedFile(out16) as a, DecodedFile(out32) as b, DecodedFile(out2) as c:
        assert a["all/rgb"].shape[0] == b["all/rgb"].shape[0] == c["all/rgb"].shape[0] == 3
        np.testing.assert_allclose(b["all/depth"][:], a["all/depth"][:], atol=1e-6)   # 32FC1 m == 16UC1 mm / 1000
        np.testing.assert_array_equal(c["all/depth"][:], a["all/depth"][:])
        np.testing.assert_allclose(a["all/depth"][2], tiff / 1000.0, rtol=1e-6)        # bit-exact to the real frame


def _msg(**fields):
    return SimpleNamespace(**fields)


def test_decode_encodings_on_real_pixels():
    _, rgb, mm = sample_frames()[0]
    h, w = mm.shape
    for encoding, data in (("rgba8", np.dstack([rgb, np.full((h, w), 255, np.uint8)])),
                           ("bgra8", np.dstack([rgb[:, :, ::-1], np.zeros((h, w), np.uint8)]))):
        msg = _msg(encoding=encoding, height=h, width=w, step=w * 4, is_bigendian=0, data=data.reshape(-1))
        np.testing.assert_array_equal(decode_image(msg, "sensor_msgs/msg/Image", "rgb", None), rgb)
    grey = rgb[:, :, 1].copy()
    msg = _msg(encoding="mono8", height=h, width=w, step=w, is_bigendian=0, data=grey.reshape(-1))
    np.testing.assert_array_equal(decode_image(msg, "sensor_msgs/msg/Image", "rgb", None)[:, :, 2], grey)
    big = mm.astype(">u2").view(np.uint8).reshape(-1)
    msg = _msg(encoding="16UC1", height=h, width=w, step=w * 2, is_bigendian=1, data=big)
    kept = decode_image(msg, "sensor_msgs/msg/Image", "depth", None)  # the message's millimetres, kept with their scale
    assert isinstance(kept, Quantized) and kept.scale == 1000.0
    np.testing.assert_array_equal(kept.values, mm)
    np.testing.assert_allclose(plain(kept), mm / 1000.0, rtol=1e-6)


def test_decode_compressed_images():
    _, rgb, mm = sample_frames()[1]
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    msg = _msg(format="rgb8; png compressed rgb8", data=np.frombuffer(png.getvalue(), np.uint8))
    np.testing.assert_array_equal(decode_image(msg, "sensor_msgs/msg/CompressedImage", "rgb", None), rgb)
    jpg = io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG", quality=95)
    msg = _msg(format="jpeg", data=np.frombuffer(jpg.getvalue(), np.uint8))
    kept = decode_image(msg, "sensor_msgs/msg/CompressedImage", "rgb", None)
    assert isinstance(kept, Encoded) and kept.data == jpg.getvalue()  # the camera's JPEG, never re-encoded
    assert np.abs(plain(kept).astype(int) - rgb).mean() < 3
    depth_png = io.BytesIO()
    Image.fromarray(mm).save(depth_png, format="PNG")
    payload = struct.pack("<iff", 0, 0.0, 0.0) + depth_png.getvalue()
    msg = _msg(format="16UC1; compressedDepth png", data=np.frombuffer(payload, np.uint8))
    kept = decode_image(msg, "sensor_msgs/msg/CompressedImage", "depth", None)
    assert isinstance(kept, Quantized) and kept.scale == 1000.0
    np.testing.assert_allclose(plain(kept), mm / 1000.0, rtol=1e-6)


# ------------------------------------------------------------------ PointCloud2 as the depth source

K_PCL = kinect_intrinsics().astype(np.float32)


def sample_clouds():
    """Per sample frame: (subsampled cloud, full-size organized cloud), each (points, colours), metres.

    Frame 0 is the real organized PCD PCL's grabber recorded for that frame: every 2nd pixel (320x240, like
    ../shared's bag) and in full (640x480). Frame 1 is back-projected from its depth image: unorganized (valid
    points only, shuffled) and organized 640x480.
    """
    from mmtk.pointcloud import depth_to_xyz, read_cloud

    real = read_cloud(SAMPLES / "pcl_kinect" / "frame_20121214T142255.814212.pcd")
    _, rgb, mm = sample_frames()[1]
    xyz = depth_to_xyz(mm / np.float32(1000), K_PCL)
    valid = np.isfinite(xyz).all(axis=-1)
    order = np.random.default_rng(0).permutation(int(valid.sum()))
    return [((real.points[::2, ::2], real.colors[::2, ::2]), (real.points, real.colors)),
            ((xyz[valid][order], rgb[valid][order]), (xyz, rgb))]


# A robot (REP 103 axes: x forward, y left, z up) with the colour camera and a lidar on its base_link.
CAMERA_IN_BASE = np.array([[0, 0, 1, 0.20], [-1, 0, 0, 0.0], [0, -1, 0, 0.50], [0, 0, 0, 1]])  # optical frame axes
YAW = np.radians(10)
LIDAR_IN_BASE = np.array([[np.cos(YAW), -np.sin(YAW), 0, 0.10], [np.sin(YAW), np.cos(YAW), 0, 0.10], [0, 0, 1, 0.60],
                          [0, 0, 0, 1]])
TF_STATIC = [("base_link", "camera_rgb_optical_frame", (0.20, 0.0, 0.50), (-0.5, 0.5, -0.5, 0.5)),  # (x, y, z, w)
             ("/base_link", "lidar", (0.10, 0.10, 0.60), (0.0, 0.0, np.sin(YAW / 2), np.cos(YAW / 2)))]


def write_cloud_bag(path, kind: str, with_info: bool = True, in_lidar_frame: bool = False):
    """A ROS1 .bag or ROS2 mcap bag with the sample's real colour + 16UC1 depth, two PointCloud2 topics
    (/cam/points: see sample_clouds, /cam/points_full: 640x480 organized), clouds stamped 3 ms after colour.

    With ``in_lidar_frame`` the /cam/points clouds are given in the lidar's frame instead, and /tf_static holds
    the robot's two mounts (TF_STATIC) while /tf moves the robot in the world (not between the sensors)."""
    from rosbags.typesys import Stores, get_typestore

    ros1 = kind == "ros1"
    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    if ros1:  # tf2_msgs is not in rosbags' Noetic store; its one-line definition, as in ROS
        from rosbags.typesys import get_types_from_msg

        store.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", "tf2_msgs/msg/TFMessage"))
    types = store.types
    serialize = store.serialize_ros1 if ros1 else store.serialize_cdr

    def header(ns, frame="camera_rgb_optical_frame"):
        extra = {"seq": 0} if ros1 else {}
        return types["std_msgs/msg/Header"](**extra, stamp=types["builtin_interfaces/msg/Time"](
            sec=ns // 10**9, nanosec=ns % 10**9), frame_id=frame)

    def tf_msg(ns, transforms):
        vector, quaternion = types["geometry_msgs/msg/Vector3"], types["geometry_msgs/msg/Quaternion"]
        return types["tf2_msgs/msg/TFMessage"]([types["geometry_msgs/msg/TransformStamped"](
            header(ns, parent), child, types["geometry_msgs/msg/Transform"](vector(*map(float, t)),
                                                                             quaternion(*map(float, q))))
            for parent, child, t, q in transforms])

    def cloud_msg(ns, points, colors, frame="camera_rgb_optical_frame"):
        record = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])
        flat = np.zeros(points.shape[:-1], record)
        flat["x"], flat["y"], flat["z"] = points[..., 0], points[..., 1], points[..., 2]
        flat["rgb"] = (colors[..., 0].astype(np.uint32) << 16) | (colors[..., 1].astype(np.uint32) << 8) | colors[..., 2]
        height, width = flat.shape if flat.ndim == 2 else (1, flat.shape[0])
        fields = [types["sensor_msgs/msg/PointField"](name=n, offset=4 * i, datatype=7, count=1)
                  for i, n in enumerate("x y z rgb".split())]
        return types["sensor_msgs/msg/PointCloud2"](header(ns, frame), height, width, fields, False, 16, 16 * width,
                                                     flat.view(np.uint8).reshape(-1), False)

    def info_msg(ns):
        mats = {"d": np.zeros(5), "k": K_PCL.astype(np.float64).reshape(-1), "r": np.eye(3).reshape(-1),
                "p": np.zeros(12)}
        mats = {(name.upper() if ros1 else name): value for name, value in mats.items()}
        return types["sensor_msgs/msg/CameraInfo"](header=header(ns), height=480, width=640,
                                                   distortion_model="plumb_bob", **mats, binning_x=0, binning_y=0,
                                                   roi=types["sensor_msgs/msg/RegionOfInterest"](0, 0, 0, 0, False))

    if ros1:
        from rosbags.rosbag1 import Writer
        writer = Writer(path)
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer
        writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    with writer:
        conn = {topic: writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype in (
            ("/cam/color", "sensor_msgs/msg/Image"), ("/cam/depth", "sensor_msgs/msg/Image"),
            ("/cam/points", "sensor_msgs/msg/PointCloud2"), ("/cam/points_full", "sensor_msgs/msg/PointCloud2"),
            ("/cam/camera_info", "sensor_msgs/msg/CameraInfo"), ("/tf_static", "tf2_msgs/msg/TFMessage"),
            ("/tf", "tf2_msgs/msg/TFMessage"))}
        first_stamp = sample_frames()[0][0]
        if in_lidar_frame:
            writer.write(conn["/tf_static"], first_stamp, serialize(tf_msg(0, TF_STATIC), "tf2_msgs/msg/TFMessage"))
        for (stamp, rgb, mm), (cloud, full) in zip(sample_frames(), sample_clouds()):
            cloud_frame = "camera_rgb_optical_frame"
            if in_lidar_frame:
                valid = np.isfinite(cloud[0]).all(axis=-1)
                to_lidar = np.linalg.inv(LIDAR_IN_BASE) @ CAMERA_IN_BASE
                cloud = (cloud[0][valid] @ to_lidar[:3, :3].T + to_lidar[:3, 3], cloud[1][valid])
                cloud_frame = "lidar"
                odom = ("odom", "base_link", (1e-9 * (stamp - first_stamp), 0, 0), (0, 0, 0, 1))  # driving at 1 m/s
                writer.write(conn["/tf"], stamp, serialize(tf_msg(stamp, [odom]), "tf2_msgs/msg/TFMessage"))
            messages = [("/cam/color", stamp, types["sensor_msgs/msg/Image"](header(stamp), 480, 640, "rgb8", 0, 1920,
                                                                             rgb.reshape(-1))),
                        ("/cam/depth", stamp, types["sensor_msgs/msg/Image"](
                            header(stamp), 480, 640, "16UC1", 0, 1280, mm.astype("<u2").view(np.uint8).reshape(-1))),
                        ("/cam/points", stamp + 3_000_000, cloud_msg(stamp + 3_000_000, *cloud, cloud_frame)),
                        ("/cam/points_full", stamp + 3_000_000, cloud_msg(stamp + 3_000_000, *full))]
            if with_info:
                messages.append(("/cam/camera_info", stamp, info_msg(stamp)))
            for topic, ns, msg in messages:
                writer.write(conn[topic], ns, serialize(msg, conn[topic].msgtype))


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_cloud_topic_gives_the_depth_image_values(tmp_path, kind):
    bag = tmp_path / ("b.bag" if kind == "ros1" else "b_mcap")
    write_cloud_bag(bag, kind)
    code, text = run_cli("convert", "--rosbag", bag)
    assert code == 0 and "/cam/points" in text and "sensor_msgs/msg/PointCloud2" in text
    from_cloud, from_full, from_image = tmp_path / "c.h5", tmp_path / "f.h5", tmp_path / "d.h5"
    texts = []
    for out, args in ((from_cloud, ["--cloud-topic", "/cam/points"]), (from_full, ["--cloud-topic", "/cam/points_full"]),
                      (from_image, ["--depth-topic", "/cam/depth"])):
        code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--no-progress", *args)
        assert code == 0, text
        texts.append(text)
    assert "paired 2 frames within 20 ms; dropped 0 colour and 0 cloud messages" in texts[0]
    (_, _, mm0), (stamp1, rgb1, mm1) = sample_frames()
    with DecodedFile(from_cloud) as c, DecodedFile(from_full) as f, DecodedFile(from_image) as d:
        assert c["all/depth"].attrs["units"] == d["all/depth"].attrs["units"] == "m"
        np.testing.assert_array_equal(c["all/rgb"][:], d["all/rgb"][:])
        np.testing.assert_array_equal(c["all/intrinsics"][1], K_PCL)
        assert c["all/timestamp"][1] == pytest.approx(stamp1 * 1e-9)
        image_depth, cloud_depth = d["all/depth"][:], c["all/depth"][:]
        both = (image_depth > 0) & (cloud_depth > 0)
        assert np.abs(cloud_depth - image_depth)[both].max() < 1e-3                   # within 1 mm
        # frame 0: the real 320x240 cloud lands on every 2nd pixel of the 640x480 colour image, nowhere else
        grid = np.zeros((480, 640), bool)
        grid[::2, ::2] = True
        np.testing.assert_array_equal(cloud_depth[0] > 0, grid & (mm0 > 0))
        # frame 1: the unorganized cloud covers exactly the pixels with depth
        np.testing.assert_array_equal(cloud_depth[1] > 0, mm1 > 0)
        # the full-size organized cloud is registered: read pixel for pixel, equal to the depth image
        np.testing.assert_allclose(f["all/depth"][:], image_depth, atol=1e-3)
        np.testing.assert_array_equal(f["all/depth"][:] > 0, image_depth > 0)


def test_transform_tree_walks_mounts_both_ways():
    from mmtk.data.sources.ros.tf import TransformTree, rigid_matrix

    tree = TransformTree()
    for parent, child, t, q in TF_STATIC:
        tree.add(parent, child, rigid_matrix(t, q))
    np.testing.assert_allclose(rigid_matrix(*TF_STATIC[0][2:]), CAMERA_IN_BASE, atol=1e-12)
    lidar_to_camera = tree.lookup("camera_rgb_optical_frame", "/lidar", stamp=0.0, max_dt=0.0)
    np.testing.assert_allclose(lidar_to_camera, np.linalg.inv(CAMERA_IN_BASE) @ LIDAR_IN_BASE, atol=1e-12)
    np.testing.assert_allclose(tree.lookup("lidar", "camera_rgb_optical_frame", 0.0, 0.0) @ lidar_to_camera, np.eye(4),
                               atol=1e-12)
    assert tree.lookup("lidar", "map", 0.0, 1.0) is None  # not connected
    tree.add("map", "base_link", rigid_matrix((5.0, 0, 0), (0, 0, 0, 1)), stamp=10.0)  # a moving robot
    tree.add("map", "base_link", rigid_matrix((6.0, 0, 0), (0, 0, 0, 1)), stamp=11.0)
    assert tree.lookup("map", "base_link", 10.9, max_dt=0.2)[0, 3] == 6.0  # the sample nearest in time
    with pytest.raises(MmtkError, match="no map -> base_link transform within 0.2 s of 12.000 s"):
        tree.lookup("map", "lidar", 12.0, max_dt=0.2)


@pytest.mark.parametrize("kind", ["ros1", "mcap"])
def test_cloud_in_another_frame_is_moved_with_tf_static(tmp_path, kind):
    bag = tmp_path / ("b.bag" if kind == "ros1" else "b_mcap")
    write_cloud_bag(bag, kind, in_lidar_frame=True)
    moved, image = tmp_path / "moved.h5", tmp_path / "image.h5"
    code, text = run_cli("convert", "--rosbag", bag, moved, "--rgb-topic", "/cam/color", "--cloud-topic",
                         "/cam/points", "--no-progress")
    assert code == 0, text
    assert "cloud points moved from frame 'lidar' to the colour frame 'camera_rgb_optical_frame'" in text
    code, text = run_cli("convert", "--rosbag", bag, image, "--rgb-topic", "/cam/color", "--depth-topic",
                         "/cam/depth", "--no-progress")
    assert code == 0, text
    (_, _, mm0), (_, _, mm1) = sample_frames()
    with DecodedFile(moved) as c, DecodedFile(image) as d:
        cloud_depth, image_depth = c["all/depth"][:], d["all/depth"][:]
    grid = np.zeros((480, 640), bool)
    grid[::2, ::2] = True
    np.testing.assert_array_equal(cloud_depth[0] > 0, grid & (mm0 > 0))  # the same pixels as in the camera frame
    np.testing.assert_array_equal(cloud_depth[1] > 0, mm1 > 0)
    both = cloud_depth > 0
    assert np.abs(cloud_depth - image_depth)[both].max() < 1e-3  # within 1 mm of the depth image


def copy_ros1_bag_without(bag, out, prefix: str):
    """A copy of a ROS1 bag without the topics that start with ``prefix`` (connections included)."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer

    with AnyReader([bag]) as reader, Writer(out) as writer:
        keep = [c for c in reader.connections if not c.topic.startswith(prefix)]
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, md5sum=c.digest) for c in keep}
        for conn, stamp, raw in reader.messages(connections=keep):
            writer.write(conns[conn.id], stamp, raw)
    return out


def test_cloud_frame_without_transforms_is_taken_as_given(tmp_path):
    bag = tmp_path / "b.bag"
    write_cloud_bag(bag, "ros1", in_lidar_frame=True)
    stripped = copy_ros1_bag_without(bag, tmp_path / "no_tf.bag", "/tf")
    code, text = run_cli("convert", "--rosbag", stripped, tmp_path / "o.h5", "--rgb-topic", "/cam/color",
                         "--cloud-topic", "/cam/points", "--no-progress")
    assert "cloud frame 'lidar' differs from colour frame 'camera_rgb_optical_frame' and /tf_static and /tf do not " \
           "connect them" in " ".join(text.split())
    # taken as given, the lidar's points fall behind the colour camera: no pixel gets depth, so nothing is written
    assert code == 2 and "error: no frame of split 'all' has a valid depth value" in text
    assert not (tmp_path / "o.h5").exists()


def test_cloud_topic_errors(tmp_path):
    bag = tmp_path / "noinfo.bag"
    write_cloud_bag(bag, "ros1", with_info=False)
    out = tmp_path / "o.h5"
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--cloud-topic", "/cam/points",
                         "--depth-topic", "/cam/depth")
    assert code == 2 and "give exactly one depth source: --depth-topic (depth images) or --cloud-topic" in text
    assert not out.exists()
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--cloud-topic", "/cam/points",
                         "--no-progress")
    error = text.split("error: ", 1)[1]
    assert code == 2 and "'/cam/points' is organized 320x240" in error and "--camera-info-topic" in error
    assert len(error.strip().splitlines()) == 1 and not out.exists() and not list(tmp_path.glob("o.h5*"))
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--cloud-topic", "/cam/depth")
    assert code == 2 and "'/cam/depth' has type sensor_msgs/msg/Image, expected PointCloud2" in text
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--depth-topic", "/cam/depth",
                         "--camera-info-topic", "/cam/color")
    assert code == 2 and "camera info topic '/cam/color' has type sensor_msgs/msg/Image, expected CameraInfo" in text
    # a registered (same-size organized) cloud needs no intrinsics
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--cloud-topic",
                         "/cam/points_full", "--no-progress")
    assert code == 0, text
    with DecodedFile(out) as f:
        np.testing.assert_allclose(f["all/depth"][1], sample_frames()[1][2] / 1000.0, atol=1e-3)


def test_shared_bags_cloud_topic_ros1_and_ros2(tmp_path):
    ros1 = shared("rosbag_pcl_kinect/pcl_kinect_3frames.bag")
    ros2 = shared("rosbag_pcl_kinect/pcl_kinect_3frames_ros2")
    image = tmp_path / "d.h5"
    convert_bag(ros1, image)
    for bag, step in ((ros1, 2), (ros2, 4)):  # clouds of every 2nd (320x240) / 4th (160x120) pixel
        out = tmp_path / f"c{step}.h5"
        code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", RGB_TOPIC, "--cloud-topic",
                             "/camera/depth_registered/points", "--no-progress")
        assert code == 0, text
        with DecodedFile(out) as c, DecodedFile(image) as d:
            expected = np.zeros_like(d["all/depth"][:])
            expected[:, ::step, ::step] = d["all/depth"][:, ::step, ::step]
            np.testing.assert_allclose(c["all/depth"][:], expected, atol=1e-3)


def test_colour_frames_without_depth_for_prediction():
    from mmtk.data.sources.ros.source import open_rosbag_source

    bag = SAMPLES / "rosbag_pcl_kinect" / "pcl_kinect_2frames.bag"
    frames = list(open_rosbag_source(bag, "/camera/rgb/image_color").frames())
    assert len(frames) == 2 and all(list(f.arrays) == ["rgb"] for f in frames)
    assert frames[0].arrays["rgb"].shape == (480, 640, 3) and frames[0].arrays["rgb"].dtype == np.uint8
    np.testing.assert_allclose(frames[0].intrinsics, [[525, 0, 320], [0, 525, 240], [0, 0, 1]])
    assert frames[0].timestamp < frames[1].timestamp


def test_colour_frames_of_a_bag_without_camera_info(tmp_path):
    from mmtk.data.sources.ros.source import open_rosbag_source

    bag = copy_ros1_bag_without(SAMPLES / "rosbag_pcl_kinect" / "pcl_kinect_2frames.bag", tmp_path / "b.bag",
                                "/camera/rgb/camera_info")
    frames = list(open_rosbag_source(bag, "/camera/rgb/image_color").frames())
    assert len(frames) == 2 and all(f.intrinsics is None and f.arrays["rgb"].shape == (480, 640, 3) for f in frames)


def test_camera_infos_nearest_in_time_and_linear_in_the_bag_length():
    import time

    from mmtk.data.sources.ros.camera_info import CameraInfos

    infos = CameraInfos()
    assert infos.nearest(1.0, (480, 640)) is None
    for stamp in (0.75, 0.25, 0.5):  # header stamps may arrive out of order
        infos.add(stamp, np.full((3, 3), stamp, np.float32), (480, 640))
    assert infos.nearest(0.3, (480, 640))[0, 0] == 0.25
    assert infos.nearest(0.7, (480, 640))[0, 0] == 0.75
    assert infos.nearest(0.375, (480, 640))[0, 0] == 0.25  # a tie goes to the earlier
    assert infos.nearest(9.0, (480, 640))[0, 0] == 0.75
    with pytest.raises(MmtkError, match="CameraInfo is 640x480 but the colour image is 320x240"):
        infos.nearest(0.5, (240, 320))
    # One CameraInfo per frame of a 20000-frame bag (11 min at 30 Hz): a scan per frame took 10.6 s here.
    k, start = np.eye(3, dtype=np.float32), time.perf_counter()
    for index in range(20000):
        infos.add(index / 30, k, (480, 640))
        infos.nearest(index / 30, (480, 640))
    assert time.perf_counter() - start < 3.0


def test_a_stream_that_stops_does_not_hold_every_later_colour_message():
    """Depth drops out after 10 of 1000 colour messages (30 Hz): colour is decided once the bag is 2 s past it,
    instead of waiting for depth to the bag's end with every message in memory (990 were held)."""
    from mmtk.data.sources.ros.pairer import MAX_STREAM_LAG_S, StreamPairer

    pairer, frames, held = StreamPairer(["rgb", "depth"], 0.02), [], 0
    for index in range(1000):
        frames += pairer.add("rgb", index / 30, f"rgb {index}")
        if index < 10:
            frames += pairer.add("depth", index / 30 + 0.001, f"depth {index}")
        held = max(held, len(pairer.pending["rgb"]))
    frames += pairer.finish()
    assert [parts["depth"] for _, parts in frames] == [f"depth {index}" for index in range(10)]
    assert [parts["rgb"] for _, parts in frames] == [f"rgb {index}" for index in range(10)]
    assert held <= (MAX_STREAM_LAG_S + 2 * 0.02) * 30 + 2
