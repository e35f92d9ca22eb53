"""Pretraining step of MultiMAE-base: images/s (fp32 and bf16 autocast), FLOPs, and how close to GEMM-bound.

    python benchmarks/bench_model.py [--batch 8] [--steps 5] [--size 224] [--compile]

FLOPs per image come from PyTorch's flop counter (matmuls, convolutions, attention) over one
forward+backward. The "matmul-bound limit" is FLOPs per image divided by the GEMM rate measured
between the steps with large square matrices; the efficiency is images/s over that limit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmtk


def gemm_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def time_steps(model: torch.nn.Module, batch: dict, bf16: bool, steps: int, dtype: torch.dtype,
               n: int = 2048) -> tuple[float, float]:
    """Median seconds per step, and the median GEMM FLOP/s measured between the steps (same conditions:
    this machine's speed drifts by +-20 % from minute to minute, so both are sampled together)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    step(model, batch, bf16)  # warm-up
    gemm_seconds(a, b)
    step_times, gemm_times = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(model, batch, bf16)
        step_times.append(time.perf_counter() - start)
        gemm_times += [gemm_seconds(a, b) for _ in range(3)]
    return statistics.median(step_times), 2 * n**3 / statistics.median(gemm_times)


def make_batch(batch: int, size: int) -> dict[str, torch.Tensor]:
    return {
        "rgb": torch.randn(batch, 3, size, size),
        "depth": torch.randn(batch, 1, size, size),
        "semseg": torch.randint(0, 40, (batch, size // 4, size // 4)),
    }


def step(model: torch.nn.Module, batch: dict, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(batch).loss
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = mmtk.create_model("multimae-base", image_size=args.size, num_visible=98)
    batch = make_batch(args.batch, args.size)
    with FlopCounterMode(display=False) as counter:
        step(model, batch, bf16=False)
    flops_per_image = counter.get_total_flops() / args.batch
    if args.compile:
        mmtk.compile_blocks(model)
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}, {args.size}x{args.size} px, 98 visible tokens, "
          f"{'compiled blocks' if args.compile else 'eager'}")
    print(f"FLOPs per image (forward+backward): {flops_per_image / 1e9:.1f} GFLOP")
    for label, dtype, bf16 in (("fp32", torch.float32, False), ("bf16 autocast", torch.bfloat16, True)):
        seconds, rate = time_steps(model, batch, bf16, args.steps, dtype)
        images_per_s = args.batch / seconds
        limit = rate / flops_per_image
        print(f"{label:>14}: {images_per_s:6.2f} images/s ({seconds * 1000:.0f} ms/step); GEMM rate "
              f"{rate / 1e9:.0f} GFLOP/s -> matmul-bound limit {limit:.2f} images/s; "
              f"efficiency {100 * images_per_s / limit:.0f}%")


if __name__ == "__main__":
    main()
