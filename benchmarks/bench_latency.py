"""CPU latency of a finetuned model: PyTorch vs ONNX Runtime, ms per frame (batch 1).

Usage:
    python benchmarks/bench_latency.py                          # multimae-base, ConvNeXt semseg head, 480x640
    python benchmarks/bench_latency.py --checkpoint run/ckpt.pt # a real finetuned checkpoint
    python benchmarks/bench_latency.py --task depth --inputs rgb,depth --runs 20

Without --checkpoint the model is a randomly initialised finetuned architecture (latency does not depend
on the weight values). The ONNX model is exported with `mmtk.export.export_onnx`, so the numbers are those
of what `mmtk export --onnx` produces. Threads default to all cores for both runtimes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_checkpoint(path: Path, task: str, inputs: tuple[str, ...], size: tuple[int, int], classes: int) -> Path:
    import mmtk

    head = dict(head="convnext", task="semseg") if task == "semseg" else dict(head="dpt", task="depth")
    args = dict(inputs=inputs, main_inputs=("rgb",), image_size=size, num_classes=classes, **head)
    model = mmtk.create_model("multimae-base", verbose=False, **args)
    torch.save({"model_name": "multimae-base", "model_args": args, "model": model.state_dict()}, path)
    return path


def time_ms(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="finetuned mmtk checkpoint (default: random multimae-base)")
    parser.add_argument("--task", choices=("semseg", "depth"), default="semseg")
    parser.add_argument("--inputs", default="rgb", help="comma-separated inputs (rgb or rgb,depth)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from mmtk.export import example_inputs, export_onnx, onnx_session
    from mmtk.predict import load_predictor

    torch.set_num_threads(args.threads)
    size = (args.height, args.width)
    names = tuple(n.strip() for n in args.inputs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or build_checkpoint(Path(tmp) / "model.pt", args.task, names, size, args.classes)
        start = time.perf_counter()
        result = export_onnx(checkpoint, Path(tmp) / "model.onnx", names, size)
        export_s = time.perf_counter() - start
        predictor = load_predictor(checkpoint)
        tensors = example_inputs(names, size)
        feeds = {n: t.numpy() for n, t in zip(names, tensors)}
        model = predictor.model
        with torch.inference_mode():
            torch_ms = time_ms(lambda: model(dict(zip(names, tensors))), args.runs, args.warmup)
        session = onnx_session(result.path, threads=args.threads)
        ort_ms = time_ms(lambda: session.run(None, feeds), args.runs, args.warmup)

    import onnxruntime

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {predictor.model_name} + {predictor.config.head} head ({predictor.config.task}), {params:.1f} M params, "
          f"inputs {','.join(names)}, {size[0]}x{size[1]} px, batch 1")
    print(f"cpu: {platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; export took {export_s:.1f} s; "
          f"max |ort - torch| = {result.max_abs_diff:.2e}")
    for name, times in (("pytorch", torch_ms), ("onnxruntime", ort_ms)):
        print(f"{name:12s} median {statistics.median(times):8.1f} ms/frame   min {min(times):8.1f} ms   "
              f"max {max(times):8.1f} ms   ({len(times)} runs)")


if __name__ == "__main__":
    main()
