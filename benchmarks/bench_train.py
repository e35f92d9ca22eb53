"""Training throughput of the recipes, and whether the data loader keeps up.

    python benchmarks/bench_train.py [--recipes tiny base] [--precisions fp32 bf16] [--steps 5]
                                     [--base-batch 8] [--data FILE.h5] [--loader-recipe tiny|base]
                                     [--workers 0 1] [--compile none|blocks|step]

For each recipe and precision: images/s of a full optimizer step (forward, backward, AdamW) of the
recipe's model on synthetic tensors of the recipe's image size, and the AdamW step alone (default,
foreach and fused implementations). Then, for --loader-recipe (its
precision, its image size), the same steps fed by the real HDF5 loader (random resized crop + flip
from the sample frames) against the same steps on synthetic tensors already in memory, and the
loader alone, per worker count: if the real-data step is no slower than the synthetic one, the
loader keeps up. ``--compile`` is the recipes' ``train.compile`` (the first step, which compiles, is not timed).
No GPU needed; on a GPU the same script measures the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmtk.train.batches import SeededDataset
from mmtk.config import load_recipe
from mmtk.train.optim import build_optimizer
from mmtk.train.settings import train_settings
from mmtk.runtime import autocast, pick_device, to_device
from mmtk.data.contents import DataInfo, open_dataset
from mmtk.train.run import model_args, needed_modalities, pretrain_loss_fn

REPO = Path(__file__).resolve().parents[1]


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int) -> dict[str, torch.Tensor]:
    h, w = size
    return {"rgb": torch.randn(batch, 3, h, w), "depth": torch.randn(batch, 1, h, w),
            "depth_valid": torch.ones(batch, 1, h, w, dtype=torch.bool),
            "semseg": torch.randint(0, num_classes, (batch, h // 4, w // 4))}


def build(recipe_name: str, precision: str, batch: int | None, compile_mode: str = "none"):
    import mmtk

    overrides = [f"train.precision={precision}", "data.path=null", f"train.compile={compile_mode}"]
    if batch:
        overrides.append(f"optim.batch_size={batch}")
    recipe = load_recipe(recipe_name, overrides)
    size = tuple(recipe.data.image_size or (224, 224))
    info = DataInfo("synthetic", ("rgb", "depth", "semseg"), size, 40, 0)
    torch.manual_seed(0)
    model = mmtk.create_model(recipe.model.name, verbose=False, **model_args(recipe, info))
    if recipe.train.compile == "blocks":  # as the engine does
        mmtk.compile_blocks(model)
    elif recipe.train.compile == "step":
        mmtk.compile_step(model)
    return recipe, model, size


def time_steps(recipe, model, batches, device, steps: int) -> float:
    """Seconds per optimizer step (median of `steps` after one warm-up step)."""
    model.to(device).train()
    optimizer = build_optimizer(model, train_settings(recipe).optim, steps_per_epoch=1).optimizer
    pretrain_loss = pretrain_loss_fn()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        batch = to_device(next(batches), device)
        with autocast(device, recipe.train.precision):
            loss, _ = pretrain_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def adamw_step_ms(model: torch.nn.Module, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per AdamW step over the model's parameters: the default implementation, foreach, fused
    (the engine's)."""
    params = [p for p in model.to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    times = {}
    for label, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        optimizer.step()  # creates the state
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[label] = (time.perf_counter() - start) / repeats * 1000
        del optimizer  # its state (two tensors per parameter) before the next one's
    for p in params:
        p.grad = None
    return times


def forever(batch: dict[str, torch.Tensor]):
    while True:
        yield batch


def real_batches(recipe, data: Path, workers: int):
    dataset = open_dataset(data, "train", needed_modalities(recipe), tuple(recipe.data.image_size), augment=True,
                           crop_scale=recipe.data.crop_scale, hflip=recipe.data.hflip)
    keys = [(0, i % len(dataset)) for i in range(10**6)]  # (epoch, index) as the engine's sampler yields
    loader = DataLoader(SeededDataset(dataset, 0), batch_size=recipe.optim.batch_size, sampler=keys,
                        num_workers=workers,
                        pin_memory=torch.cuda.is_available())  # as the engine does on a GPU
    return iter(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--base-batch", type=int, default=8, help="batch for base.yaml (its 2048 needs GPUs)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="loader worker counts to compare")
    parser.add_argument("--data", type=Path, default=None, help="HDF5 file (default: the shipped NYUv2 sample)")
    parser.add_argument("--loader-recipe", choices=["tiny", "base"], default="tiny",
                        help="the recipe whose steps the real loader feeds (tiny: fp32, base: bf16, --base-batch)")
    parser.add_argument("--compile", choices=["none", "blocks", "step"], default="none", help="train.compile")
    args = parser.parse_args()
    device = pick_device("auto")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, compile {args.compile}")
    for name in args.recipes:
        for precision in args.precisions:
            recipe, model, size = build(name, precision, args.base_batch if name == "base" else None, args.compile)
            batch = recipe.optim.batch_size
            seconds = time_steps(recipe, model, forever(synthetic_batch(batch, size, 40)), device, args.steps)
            print(f"{name:5s} {precision}: {model.config.dim}-wide x {model.config.depth} blocks, "
                  f"{size[0]}x{size[1]} px, batch {batch}: {seconds:.3f} s/step, {batch / seconds:.1f} images/s")
        print(f"{name:5s} AdamW step alone ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters): "
              + ", ".join(f"{label} {ms:.0f} ms" for label, ms in adamw_step_ms(model, device).items()))

    data = args.data
    if data is None:
        from mmtk.data import convert_rgbd

        data = Path(tempfile.mkdtemp()) / "sample.h5"
        convert_rgbd(REPO / "samples" / "nyuv2_multimae", data, progress=False)
    name = args.loader_recipe
    recipe, model, size = build(name, "fp32" if name == "tiny" else "bf16", args.base_batch if name == "base" else None,
                                args.compile)
    synthetic = time_steps(recipe, model, forever(synthetic_batch(recipe.optim.batch_size, size, 40)), device,
                           args.steps)
    print(f"{name} {recipe.train.precision} step on synthetic tensors: {synthetic:.3f} s")
    for workers in args.workers:
        batches = real_batches(recipe, data, workers)
        next(batches)  # start the workers
        start = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        load = (time.perf_counter() - start) / args.steps
        real = time_steps(recipe, model, batches, device, args.steps)
        print(f"real frames of {data.name}, {workers} loader workers: loader alone {load:.3f} s/batch "
              f"({recipe.optim.batch_size / load:.0f} images/s); training step {real:.3f} s "
              f"({100 * (real / synthetic - 1):+.0f} % vs synthetic)")


if __name__ == "__main__":
    main()
