"""Conversion speed (frames/s) and peak memory of `mmtk convert`, on real frames repeated to N frames.

Each conversion runs in a fresh subprocess so its peak RSS (resident memory) is its own; running it for
two sizes shows that memory does not grow with the input (streaming).

Usage: python benchmarks/bench_convert.py [--frames 40,160]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
from mmtk.data import convert_rgbd
start = time.perf_counter()
result = convert_rgbd(sys.argv[1], sys.argv[2], progress=False)
elapsed = time.perf_counter() - start
frames = sum(result.frames.values())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the benchmark's own peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"frames": frames, "seconds": elapsed, "peak_rss_mb": hwm / 1024}))
"""


def make_sources(root: Path, frames: int) -> dict[str, Path]:
    """BTS sync folder and NYUv2 .mat with `frames` frames made of the real sample frames."""
    sys.path.insert(0, str(REPO / "tests"))
    from data_helpers import SYNC, nyu_mat_frames, write_nyu_mat  # noqa: E402

    sync = root / f"sync_{frames}"
    (sync / "rgb").mkdir(parents=True)
    (sync / "depth").mkdir()
    originals = sorted((SYNC / "rgb").glob("rgb_*.jpg"))
    for i in range(frames):
        number = originals[i % len(originals)].stem.split("_")[1]
        shutil.copy(SYNC / "rgb" / f"rgb_{number}.jpg", sync / "rgb" / f"rgb_{i:05d}.jpg")
        shutil.copy(SYNC / "depth" / f"sync_depth_{number}.png", sync / "depth" / f"sync_depth_{i:05d}.png")
    mat_dir = root / f"nyu_{frames}"
    mat_dir.mkdir()
    base = nyu_mat_frames()
    write_nyu_mat(mat_dir / "nyu_depth_v2_labeled.mat", [base[i % len(base)] for i in range(frames)],
                  [f"scene_{i:04d}" for i in range(frames)])
    return {"bts-sync (jpg + png mm)": sync, "nyuv2 .mat (v7.3)": mat_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="40,160")
    args = parser.parse_args()
    print("layout                        frames   frames/s   peak RSS")
    with tempfile.TemporaryDirectory() as tmp:
        for count in [int(v) for v in args.frames.split(",")]:
            for name, src in make_sources(Path(tmp), count).items():
                out = Path(tmp) / f"out_{count}_{src.name}.h5"
                proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True,
                                      text=True, check=True)
                stats = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{name:<28} {stats['frames']:7d} {stats['frames'] / stats['seconds']:10.1f} "
                      f"{stats['peak_rss_mb']:8.0f} MB")


if __name__ == "__main__":
    main()
