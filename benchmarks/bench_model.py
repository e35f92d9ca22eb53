"""Pretraining step of MultiMAE-base: images/s (fp32 and bf16 autocast), FLOPs, and how close to GEMM-bound.

    python benchmarks/bench_model.py [--batch 8] [--steps 5] [--size 224] [--compile] [--device cpu|cuda]
                                     [--profile]

FLOPs per image come from PyTorch's flop counter (matmuls, convolutions, attention) over one
forward+backward. The "matmul-bound limit" is FLOPs per image divided by the GEMM rate measured
between the steps with large square matrices (2048 on a CPU, 8192 on a GPU); the efficiency is
images/s over that limit, i.e. the model FLOP utilisation (MFU) against the measured GEMM rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmtk


def timed(fn, device: torch.device) -> float:
    """Seconds that ``fn()`` takes, waiting for the GPU's queued work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_steps(model: torch.nn.Module, batch: dict, bf16: bool, steps: int, dtype: torch.dtype,
               n: int) -> tuple[float, float]:
    """Median seconds per step, and the median GEMM FLOP/s measured between the steps (same conditions:
    a CPU's speed can drift by +-20 % from minute to minute, so both are sampled together)."""
    device = batch["rgb"].device
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):  # warm-up (cuBLAS/oneDNN kernel choice, compilation, allocator)
        step(model, batch, bf16)
        timed(lambda: a @ b, device)
    step_times, gemm_times = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step_times.append(timed(lambda: step(model, batch, bf16), device))
        gemm_times += [timed(lambda: a @ b, device) for _ in range(3)]
    return statistics.median(step_times), 2 * n**3 / statistics.median(gemm_times)


def make_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "rgb": torch.randn(batch, 3, size, size, device=device),
        "depth": torch.randn(batch, 1, size, size, device=device),
        "semseg": torch.randint(0, 40, (batch, size // 4, size // 4), device=device),
    }


def step(model: torch.nn.Module, batch: dict, bf16: bool) -> None:
    with torch.autocast(batch["rgb"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(batch).loss
    loss.backward()


def profile_step(model: torch.nn.Module, batch: dict, bf16: bool) -> None:
    """Print where one step's time goes: the top operators, and on a GPU how busy the GPU was."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = batch["rgb"].device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(lambda: step(model, batch, bf16), device)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # not the operators that launch them
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"GPU kernels {busy * 1000:.1f} ms of a {seconds * 1000:.1f} ms step (profiled): "
              f"GPU busy {100 * busy / seconds:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU wants a larger --batch, e.g. 128)")
    parser.add_argument("--profile", action="store_true", help="then print where a bf16 step's time goes")
    args = parser.parse_args()

    device = torch.device(args.device)
    gemm_size = 8192 if device.type == "cuda" else 2048
    torch.manual_seed(0)
    model = mmtk.create_model("multimae-base", image_size=args.size, num_visible=98).to(device)
    batch = make_batch(args.batch, args.size, device)
    with FlopCounterMode(display=False) as counter:
        step(model, batch, bf16=False)
    flops_per_image = counter.get_total_flops() / args.batch
    if args.compile:
        mmtk.compile_blocks(model)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size} px, 98 visible tokens, "
          f"{'compiled blocks' if args.compile else 'eager'}")
    print(f"FLOPs per image (forward+backward): {flops_per_image / 1e9:.1f} GFLOP")
    for label, dtype, bf16 in (("fp32", torch.float32, False), ("bf16 autocast", torch.bfloat16, True)):
        seconds, rate = time_steps(model, batch, bf16, args.steps, dtype, gemm_size)
        images_per_s = args.batch / seconds
        limit = rate / flops_per_image
        print(f"{label:>14}: {images_per_s:6.2f} images/s ({seconds * 1000:.0f} ms/step); GEMM rate "
              f"{rate / 1e9:.0f} GFLOP/s -> matmul-bound limit {limit:.2f} images/s; "
              f"efficiency {100 * images_per_s / limit:.0f}%")
    if args.profile:
        profile_step(model, batch, bf16=True)


if __name__ == "__main__":
    main()
