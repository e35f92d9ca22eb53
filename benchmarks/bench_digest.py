"""What the checkpoint digest (SHA-256 over every tensor, mmtk.weights.integrity) costs: MB/s on this machine.

The number behind the README's Reliability note: a ``base`` checkpoint with its AdamW moments is about 1.2 GB, so
its save and its full read each take 1.2 GB / this rate longer. Median of ``--repeat`` runs over a ``--mb`` tensor.

Usage: python benchmarks/bench_digest.py [--mb 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmtk.weights.integrity import content_digest

BASE_CHECKPOINT_GB = 1.2  # multimae-base weights plus AdamW's two moments, float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="tensor size, MB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    state = {"model": {"weight": torch.randn(args.mb * 2**20 // 4)}}
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        content_digest(state)
        times.append(time.perf_counter() - start)
    rate = args.mb / statistics.median(times)
    print(f"content_digest of a {args.mb} MB tensor: {rate:.0f} MB/s (median of {args.repeat}); "
          f"a {BASE_CHECKPOINT_GB} GB base checkpoint: {BASE_CHECKPOINT_GB * 1024 / rate:.1f} s")


if __name__ == "__main__":
    main()
