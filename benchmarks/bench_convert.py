"""Conversion speed (frames/s) and peak memory of `mmtk convert`, on real frames repeated to N frames.

Each conversion runs in a fresh subprocess so its peak RSS (resident memory) is its own; running it for
two sizes shows that memory does not grow with the input (streaming). Each conversion runs --repeat times and
the fastest run is reported, with the writing process's least CPU time per frame ("writer CPU", ms), which a busy
machine disturbs less than frames/s. Folders and bags are decoded in a second process, not counted there; the
.mat is read inline, so its reading is counted.

Sources (--sources, comma-separated):
  sync  BTS sync folder (jpg + png mm), no timestamps
  mat   NYUv2 labeled .mat (v7.3), no timestamps
  tum   TUM RGB-D folder (png rgb + png depth 5000/m) named by Unix time: timestamps and frame ids
  bag   ROS2 mcap bag (rgb8 + 16UC1 mm Image messages): timestamps and frame ids, cheap to decode

With --bags N, it instead converts N such ROS2 bags (--frames frames each) into one shard folder with each
--workers count (`mmtk convert --rosbag 'bags/*' OUT --workers W`) and prints frames/s of the whole run.

Usage: python benchmarks/bench_convert.py [--frames 40,160] [--sources sync,mat,tum,bag] [--repeat 1]
       python benchmarks/bench_convert.py --bags 4 --frames 40 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAMES = {"sync": "bts-sync (jpg + png mm)", "mat": "nyuv2 .mat (v7.3)", "tum": "tum (png, timestamps)",
         "bag": "ros2 mcap (raw, timestamps)"}
CHILD = r"""
import json, sys, time
from mmtk.data import convert_rgbd, convert_rosbag
spec = json.loads(sys.argv[1])
start, cpu = time.perf_counter(), time.process_time()
if spec["kind"] == "bag":
    result = convert_rosbag(spec["src"], spec["out"], spec["rgb"], spec["depth"], progress=False)
else:
    result = convert_rgbd(spec["src"], spec["out"], layout=spec.get("layout"), progress=False)
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
frames = sum(result.frames.values())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the benchmark's own peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"frames": frames, "seconds": elapsed, "cpu_s": cpu, "peak_rss_mb": hwm / 1024}))
"""

SHARDS_CHILD = r"""
import json, sys, time
from pathlib import Path
from mmtk.data.convert import convert_to_shards
spec = json.loads(sys.argv[1])
start = time.perf_counter()
convert_to_shards("rosbag", [Path(p) for p in spec["inputs"]], spec["out"],
                  {"rgb_topic": spec["rgb"], "depth_topic": spec["depth"]}, workers=spec["workers"], progress=False)
elapsed = time.perf_counter() - start
index = json.loads((Path(spec["out"]) / "index.json").read_text())
print(json.dumps({"frames": sum(s["frames"] for s in index["splits"].values()), "seconds": elapsed}))
"""


def _sync(root: Path, frames: int) -> dict:
    from data_helpers import SYNC  # noqa: E402

    sync = root / f"sync_{frames}"
    (sync / "rgb").mkdir(parents=True)
    (sync / "depth").mkdir()
    originals = sorted((SYNC / "rgb").glob("rgb_*.jpg"))
    for i in range(frames):
        number = originals[i % len(originals)].stem.split("_")[1]
        shutil.copy(SYNC / "rgb" / f"rgb_{number}.jpg", sync / "rgb" / f"rgb_{i:05d}.jpg")
        shutil.copy(SYNC / "depth" / f"sync_depth_{number}.png", sync / "depth" / f"sync_depth_{i:05d}.png")
    return {"kind": "rgbd", "src": str(sync)}


def _mat(root: Path, frames: int) -> dict:
    from data_helpers import nyu_mat_frames, write_nyu_mat  # noqa: E402

    mat_dir = root / f"nyu_{frames}"
    mat_dir.mkdir()
    base = nyu_mat_frames()
    write_nyu_mat(mat_dir / "nyu_depth_v2_labeled.mat", [base[i % len(base)] for i in range(frames)],
                  [f"scene_{i:04d}" for i in range(frames)])
    return {"kind": "rgbd", "src": str(mat_dir)}


def _tum(root: Path, frames: int) -> dict:
    from data_helpers import TUM  # noqa: E402

    tum = root / f"tum_{frames}"
    (tum / "rgb").mkdir(parents=True)
    (tum / "depth").mkdir()
    for i in range(frames):  # 30 Hz, rgb and depth at the same time (TUM names frames by Unix time)
        stamp = f"{1305031102 + i / 30:.6f}"
        shutil.copy(TUM / "TUM_color.png", tum / "rgb" / f"{stamp}.png")
        shutil.copy(TUM / "TUM_depth.png", tum / "depth" / f"{stamp}.png")
    return {"kind": "rgbd", "src": str(tum), "layout": "tum"}


def _bag(root: Path, frames: int) -> dict:
    """A ROS2 mcap bag of the real frames of the sample ROS1 bag, repeated at 30 Hz."""
    from data_helpers import BAG1, DEPTH_TOPIC, RGB_TOPIC  # noqa: E402
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    with AnyReader([BAG1]) as reader:
        conns = [c for c in reader.connections if c.topic in (RGB_TOPIC, DEPTH_TOPIC)]
        messages = [(c.topic, reader.deserialize(raw, c.msgtype)) for c, _, raw in reader.messages(connections=conns)]
    rgbs = [np.asarray(m.data) for topic, m in messages if topic == RGB_TOPIC]
    depths = [np.asarray(m.data) for topic, m in messages if topic == DEPTH_TOPIC]
    store = get_typestore(Stores.ROS2_HUMBLE)
    image, header, time = (store.types[t] for t in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                    "builtin_interfaces/msg/Time"))
    bag = root / f"bag_{frames}"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        c_rgb = writer.add_connection("/cam/color", "sensor_msgs/msg/Image", typestore=store)
        c_depth = writer.add_connection("/cam/depth", "sensor_msgs/msg/Image", typestore=store)
        for i in range(frames):
            ns = 1_355_494_975_000_000_000 + i * 33_333_333
            stamp = header(stamp=time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera")
            writer.write(c_rgb, ns, store.serialize_cdr(image(stamp, 480, 640, "rgb8", 0, 1920, rgbs[i % len(rgbs)]),
                                                        c_rgb.msgtype))
            writer.write(c_depth, ns, store.serialize_cdr(
                image(stamp, 480, 640, "16UC1", 0, 1280, depths[i % len(depths)]), c_depth.msgtype))
    return {"kind": "bag", "src": str(bag), "rgb": "/cam/color", "depth": "/cam/depth"}


MAKERS = {"sync": _sync, "mat": _mat, "tum": _tum, "bag": _bag}


def bench_shards(bags: int, frames: int, workers: list[int], repeat: int) -> None:
    """frames/s of converting ``bags`` ROS2 bags of ``frames`` frames each into one shard folder, per worker count."""
    print(f"{bags} ROS2 mcap bags x {frames} frames (rgb8 + 16UC1 depth, 480x640) -> one shard folder")
    print("workers   frames   seconds   frames/s")
    with tempfile.TemporaryDirectory() as tmp:
        specs = []
        for number in range(bags):
            folder = Path(tmp) / f"bag{number}"
            folder.mkdir()
            specs.append(_bag(folder, frames))
        for count in workers:
            runs = []
            for run in range(repeat):
                out = Path(tmp) / f"shards_{count}_{run}"
                spec = {"inputs": [s["src"] for s in specs], "out": str(out), "rgb": specs[0]["rgb"],
                        "depth": specs[0]["depth"], "workers": count}
                proc = subprocess.run([sys.executable, "-c", SHARDS_CHILD, json.dumps(spec)], capture_output=True,
                                      text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out)
            best = min(runs, key=lambda stats: stats["seconds"])
            print(f"{count:7d} {best['frames']:8d} {best['seconds']:9.2f} {best['frames'] / best['seconds']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="40,160", help="frame counts, comma-separated")
    parser.add_argument("--sources", default="sync,mat", help=f"comma-separated, of {', '.join(MAKERS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per conversion; the fastest is reported")
    parser.add_argument("--bags", type=int, default=0, help="convert this many bags into a shard folder instead")
    parser.add_argument("--workers", default="1,2", help="with --bags: worker counts, comma-separated")
    args = parser.parse_args()
    if args.bags:
        sys.path.insert(0, str(REPO / "tests"))
        bench_shards(args.bags, int(args.frames.split(",")[0]), [int(v) for v in args.workers.split(",")], args.repeat)
        return
    sources = [name.strip() for name in args.sources.split(",")]
    if unknown := [name for name in sources if name not in MAKERS]:
        parser.error(f"unknown source(s) {', '.join(unknown)}; use {', '.join(MAKERS)}")
    sys.path.insert(0, str(REPO / "tests"))
    print("layout                        frames   frames/s   writer CPU   peak RSS")
    with tempfile.TemporaryDirectory() as tmp:
        for count in [int(v) for v in args.frames.split(",")]:
            for name in sources:
                spec = MAKERS[name](Path(tmp), count)
                runs = []
                for run in range(args.repeat):
                    spec["out"] = str(Path(tmp) / f"out_{count}_{name}_{run}.h5")
                    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                                          text=True, check=True)
                    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    Path(spec["out"]).unlink()
                best = min(runs, key=lambda stats: stats["seconds"])
                cpu = min(stats["cpu_s"] for stats in runs)
                print(f"{NAMES[name]:<28} {best['frames']:7d} {best['frames'] / best['seconds']:10.1f} "
                      f"{1000 * cpu / best['frames']:7.2f} ms/f {max(s['peak_rss_mb'] for s in runs):6.0f} MB")


if __name__ == "__main__":
    main()
