"""`mmtk convert --rosbag`: ROS1 .bag and ROS2 (sqlite3, mcap) bags with real frames."""

from __future__ import annotations

import io
import struct
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image

from data_helpers import BAG1, DEPTH_TOPIC, RGB_TOPIC, run_cli, shared
from mmtk.adapters.sensors.rosbag import decode_image


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
    with h5py.File(out) as f:
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
    assert "paired 1 frames within 20 ms; dropped 1 colour and 1 depth messages" in text
    stamp, rgb, mm = sample_frames()[0]
    with h5py.File(out) as f:
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
    with h5py.File(out16) as a, h5py.File(out32) as b, h5py.File(out2) as c:
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
    np.testing.assert_allclose(decode_image(msg, "sensor_msgs/msg/Image", "depth", None), mm / 1000.0, rtol=1e-6)


def test_decode_compressed_images():
    _, rgb, mm = sample_frames()[1]
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    msg = _msg(format="rgb8; png compressed rgb8", data=np.frombuffer(png.getvalue(), np.uint8))
    np.testing.assert_array_equal(decode_image(msg, "sensor_msgs/msg/CompressedImage", "rgb", None), rgb)
    jpg = io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG", quality=95)
    msg = _msg(format="jpeg", data=np.frombuffer(jpg.getvalue(), np.uint8))
    assert np.abs(decode_image(msg, "sensor_msgs/msg/CompressedImage", "rgb", None).astype(int) - rgb).mean() < 3
    depth_png = io.BytesIO()
    Image.fromarray(mm).save(depth_png, format="PNG")
    payload = struct.pack("<iff", 0, 0.0, 0.0) + depth_png.getvalue()
    msg = _msg(format="16UC1; compressedDepth png", data=np.frombuffer(payload, np.uint8))
    np.testing.assert_allclose(decode_image(msg, "sensor_msgs/msg/CompressedImage", "depth", None), mm / 1000.0,
                               rtol=1e-6)
