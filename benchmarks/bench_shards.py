"""Reading a shard folder: how long opening takes, and samples/s when frames come from open shards or not.

Builds a folder of N shards (links to one real converted shard: the 2-frame sample ROS bag, 480x640 rgb + depth),
indexes it with `mmtk index`'s write_index (which reads every shard once), then in one process with one torch
thread (as one DataLoader worker): opens it as H5Dataset, and reads rgb + depth as 224x224 augmented samples
(a) from frames of the 8 shards kept open, (b) each from a shard not open yet (what a uniform shuffle over a folder
of many shards does).

Usage: python benchmarks/bench_shards.py [--shards 2000] [--samples 200]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from data_helpers import BAG1, DEPTH_TOPIC, RGB_TOPIC

    from mmtk.data import H5Dataset, convert_rosbag, write_index

    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.h5"
        convert_rosbag(BAG1, one, RGB_TOPIC, DEPTH_TOPIC, progress=False)
        folder = Path(tmp) / "shards"
        folder.mkdir()
        for number in range(args.shards):
            (folder / f"s{number:05d}.h5").symlink_to(one)
        start = time.perf_counter()
        write_index(folder)
        print(f"{args.shards} shards of 2 frames: index written in {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        dataset = H5Dataset(folder, split="all", modalities=("rgb", "depth"), image_size=(224, 224), augment=True,
                            max_open=8)
        print(f"opened in {time.perf_counter() - start:.3f} s ({len(dataset)} frames)")
        dataset[0]
        orders = {"frames of 8 open shards": [random.randrange(16) for _ in range(args.samples)],
                  "each from a shard not open": [2 * (8 + i) % len(dataset) for i in range(args.samples)]}
        for label, order in orders.items():
            start = time.perf_counter()
            for index in order:
                dataset[index]
            print(f"{label:<28} {args.samples / (time.perf_counter() - start):7.1f} samples/s")


if __name__ == "__main__":
    main()
