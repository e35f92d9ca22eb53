"""Pretraining step of MultiMAE-base: images/s and MFU per compile mode, precision and batch size.

    python benchmarks/bench_model.py [--batch 8 ...] [--modes eager blocks step ...] [--precisions fp32 bf16]
                                     [--steps 5] [--size 224] [--device cpu|cuda] [--budget SECONDS] [--profile]
                                     [--backend inductor|aot_eager] [--fp32-decoders [TASK ...]]

Modes: ``eager``; ``blocks`` (each transformer block compiled, `train.compile: blocks`); ``step`` (the whole
forward, masking and losses included, compiled as one graph with its AOTAutograd backward, `train.compile:
step`); ``step-cudagraphs`` (the same with ``mode="reduce-overhead"``, CUDA only). Each row builds a fresh model
from the same seed. The first step of a row (compilation, kernel choice) is timed and reported once, apart from
the steps.

FLOPs per image come from PyTorch's flop counter (matmuls, convolutions, attention) over one eager
forward+backward. The matmul-bound limit is FLOPs per image divided by the GEMM rate of the row's precision,
measured between the row's steps with large square matrices (2048 on a CPU, 8192 on a GPU); MFU is images/s over
that limit (the model FLOP utilisation against the GEMM rate measured in the same run). Rows print as they finish
and as a table at the end; a row that fails (e.g. out of memory) prints its error and the run goes on, and rows
that would start after ``--budget`` seconds are skipped, so a time-capped run still ends with a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmtk
from mmtk.model.multimae import compile_step

MODES = ("eager", "blocks", "step", "step-cudagraphs")


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``fn()`` takes, waiting for the GPU's queued work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """MultiMAE-base at the benchmark's size with 98 visible tokens, from seed 0: the same weights in every row."""
    torch.manual_seed(0)
    return mmtk.create_model("multimae-base", image_size=args.size, num_visible=98,
                             fp32_decoders=args.fp32_decoders).to(device)


def make_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "rgb": torch.randn(batch, 3, size, size, device=device),
        "depth": torch.randn(batch, 1, size, size, device=device),
        "semseg": torch.randint(0, 40, (batch, size // 4, size // 4), device=device),
    }


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's forward: masks, encoder, decoders, losses (all in the model's forward)."""
    return model(batch).loss


def make_step(model: torch.nn.Module, mode: str, bf16: bool, backend: str = "inductor"
              ) -> Callable[[dict[str, torch.Tensor]], None]:
    """forward + backward of ``model`` in ``mode`` (compiled in place)."""
    if mode == "blocks":
        mmtk.compile_blocks(model)
    elif mode.startswith("step"):
        compile_step(model, backend, mode="reduce-overhead" if mode == "step-cudagraphs" else None)

    def step(batch: dict[str, torch.Tensor]) -> None:
        if mode == "step-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with torch.autocast(batch["rgb"].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model_loss(model, batch)
        loss.backward()

    return step


@dataclass
class Row:
    mode: str
    precision: str
    batch: int
    first_s: float = 0.0  # first step: compilation, kernel choice, allocator
    step_s: float = 0.0  # median
    gemm_flops: float = 0.0  # median GEMM rate, FLOP/s
    error: str = ""

    def images_per_s(self) -> float:
        return self.batch / self.step_s

    def mfu(self, flops_per_image: float) -> float:
        return self.images_per_s() * flops_per_image / self.gemm_flops


def measure(row: Row, args: argparse.Namespace, device: torch.device) -> None:
    """Fill ``row``: first step, then median step and GEMM rate sampled together (a CPU's speed drifts by
    +-20 % from minute to minute)."""
    bf16 = row.precision == "bf16"
    model = build_model(args, device)
    batch = make_batch(row.batch, args.size, device)
    step = make_step(model, row.mode, bf16, args.backend)
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    row.first_s = timed(lambda: step(batch), device)
    model.zero_grad(set_to_none=True)
    timed(lambda: step(batch), device)  # second warm-up (CUDA graphs record on their second call)
    timed(lambda: a @ b, device)
    step_times, gemm_times = [], []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        step_times.append(timed(lambda: step(batch), device))
        gemm_times += [timed(lambda: a @ b, device) for _ in range(3)]
    row.step_s = statistics.median(step_times)
    row.gemm_flops = 2 * n**3 / statistics.median(gemm_times)


def flops_per_image(args: argparse.Namespace, device: torch.device) -> float:
    model = build_model(args, device)
    batch = make_batch(2, args.size, device)
    with FlopCounterMode(display=False) as counter:
        model_loss(model, batch).backward()
    return counter.get_total_flops() / 2


def format_row(row: Row, flops: float) -> str:
    head = f"| {row.mode} | {row.precision} | {row.batch} |"
    if row.error:
        return f"{head} {row.error} | | | |"
    return (f"{head} {row.images_per_s():.1f} images/s ({row.step_s * 1000:.0f} ms/step) | "
            f"{100 * row.mfu(flops):.0f} % | {row.gemm_flops / 1e12:.2f} TFLOP/s | {row.first_s:.1f} s |")


def profile_step(step: Callable[[dict], None], batch: dict, device: torch.device) -> None:
    """Print where one step's time goes: the top operators, and on a GPU how busy the GPU was."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(lambda: step(batch), device)
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
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes (GPU: e.g. 128 256)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--fp32-decoders", nargs="*", default=["semseg"],
                        help="decoders kept in fp32 under bf16 autocast (the model's default: semseg; none: all bf16)")
    parser.add_argument("--backend", default="inductor", help="step modes' torch.compile backend (aot_eager: "
                                                                  "check the capture without code generation)")
    parser.add_argument("--budget", type=float, default=None, help="seconds; rows that would start later are skipped")
    parser.add_argument("--profile", action="store_true", help="then print where a bf16 step's time goes "
                                                               "(first mode, first batch size)")
    args = parser.parse_args()

    start = time.perf_counter()
    device = torch.device(args.device)
    if "step-cudagraphs" in args.modes and device.type != "cuda":
        parser.error("step-cudagraphs needs --device cuda")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    flops = flops_per_image(args, device)
    print(f"{where}, torch {torch.__version__}, {args.size}x{args.size} px, 98 visible tokens, fp32 decoders "
          f"{args.fp32_decoders or 'none'}; "
          f"FLOPs per image (forward+backward): {flops / 1e9:.1f} GFLOP", flush=True)
    header = ("| mode | precision | batch | images/s | MFU | GEMM rate (same run) | first step (compile) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
    print(header, flush=True)
    rows = []
    for batch in args.batch:
        for mode in args.modes:
            for precision in args.precisions:
                row = Row(mode, precision, batch)
                if args.budget is not None and time.perf_counter() - start > args.budget:
                    row.error = f"skipped: past the {args.budget:.0f} s budget"
                else:
                    try:
                        measure(row, args, device)
                    except Exception as err:  # one row's failure (OOM, a backend error) must not end the table
                        first_line = str(err).splitlines()[0][:200] if str(err) else ""
                        row.error = f"failed: {type(err).__name__}: {first_line}"
                    torch._dynamo.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row, flops), flush=True)
    print(f"\nAll rows ({time.perf_counter() - start:.0f} s in all):\n{header}")
    print("\n".join(format_row(row, flops) for row in rows))
    if args.profile:
        model = build_model(args, device)
        batch = make_batch(args.batch[0], args.size, device)
        step = make_step(model, args.modes[0], bf16=True, backend=args.backend)
        step(batch)
        step(batch)
        profile_step(step, batch, device)


if __name__ == "__main__":
    main()
