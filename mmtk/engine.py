"""The training engine shared by pretraining and finetuning.

One loop (:func:`fit`): AdamW with weight-decay groups and layer-wise lr decay, linear warm-up then
cosine per optimizer step, gradient accumulation, optional clipping, autocast (bf16/fp16), optional
``torch.compile``, DDP under ``torchrun``, atomic checkpoints with every state needed to resume
bit-exactly, JSONL metrics, rich progress and TensorBoard when installed.

What is being trained comes in as a model, a dataset and a ``compute_loss(model, batch)`` function,
so the loop knows nothing about MultiMAE; :mod:`mmtk.training` builds those from a recipe.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from mmtk.config import Recipe, loader_workers, recipe_to_dict, save_recipe
from mmtk.errors import MmtkError
from mmtk.formats import read_state_dict
from mmtk.io import atomic_write, atomic_write_text, available_ram, discard, disk_errors, make_temp, publish
from mmtk.multimae import compile_blocks, compile_step

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
CHECKPOINT_FORMAT = "mmtk-checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the local rank's GPU when CUDA is available, else the CPU; ``cpu``, ``cuda``, ``cuda:N``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmtkError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise MmtkError(f"device {name!r}: mmtk runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MmtkError(f"device {name!r} asked for, but CUDA is not available here; use cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup_distributed(device_name: str) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 tokenizers/global tokens, i+1 block i, top the rest."""
    if name.startswith(("encoder.tokenizers.", "encoder.global_tokens", "encoder.pos_emb")):
        return 0
    match = re.match(r"encoder\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def count_blocks(model: nn.Module) -> int:
    ids = {int(m.group(1)) for n, _ in model.named_parameters() if (m := re.match(r"encoder\.blocks\.(\d+)\.", n))}
    return max(ids) + 1 if ids else 0


def _no_weight_decay(name: str, param: torch.Tensor, extra: set[str]) -> bool:
    # Biases, norm scales, learned tokens and position embeddings are not decayed (MAE/BEiT convention).
    return param.ndim <= 1 or name.endswith(".bias") or name in extra or "token" in name or "pos_emb" in name


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: (decay / no decay) x layer, each with its own ``lr`` (layer-wise decay) and ``weight_decay``."""
    num_blocks = count_blocks(model)
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_blocks)
        decay = not _no_weight_decay(name, param, extra)
        scale = layer_decay ** (num_blocks + 1 - lid)
        group = groups.setdefault((lid, decay), {
            "params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


@dataclass
class WarmupCosine:
    """lr multiplier at optimizer step s: linear warm-up to 1, then cosine down to ``min_ratio``."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, recipe: Recipe, total_steps: int, warmup_steps: int):
    """AdamW + per-step warm-up/cosine LambdaLR for ``model`` as the recipe says."""
    optim = recipe.optim
    lr = optim.lr * optim.batch_size / 256 if optim.scale_lr else optim.lr
    groups = param_groups(model, lr, optim.weight_decay, optim.layer_decay)
    for group in groups:
        group.pop("names")
    # fused: one kernel for all parameters (on a CPU about 3x faster than the default per-parameter loop)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    schedule = WarmupCosine(warmup_steps, total_steps, optim.min_lr / lr if lr > 0 else 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# Data: resumable sampling and per-sample seeded augmentation


class RunSampler(Sampler):
    """``(epoch, index)`` keys for a whole run, epoch after epoch, from any optimizer step on.

    Each epoch is a DistributedSampler permutation (this process's share) cut to whole optimizer
    steps, so a batch never straddles two epochs and a run resumed at step s sees the same keys as
    an uninterrupted one. The stream is endless: one loader iterator serves the whole run, and its
    workers keep prefetching across epoch boundaries (with a few steps per epoch, restarting the
    loader every epoch would leave the GPU waiting for each epoch's first batch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, samples_per_step: int) -> None:
        self.epoch_order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                              drop_last=True)
        self.samples_per_step = samples_per_step
        self.steps_per_epoch = self.epoch_order.num_samples // samples_per_step
        self.start_step = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, done = divmod(self.start_step, self.steps_per_epoch)
        first, end = done * self.samples_per_step, self.steps_per_epoch * self.samples_per_step
        while True:
            self.epoch_order.set_epoch(epoch)
            for index in itertools.islice(self.epoch_order, first, end):
                yield epoch, int(index)
            epoch, first = epoch + 1, 0


class SeededDataset(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index) only.

    The global torch/numpy/python RNGs are re-seeded around each ``dataset[index]`` and restored
    afterwards, so the crop of a frame does not depend on the worker count, on the process count or
    on where a resumed run restarted.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`mmtk.io.atomic_write`: private temporary file, fsync, rename).

    Keep ``state`` to tensors, plain containers, numbers and strings so it loads with
    ``weights_only=True``. A full disk or a read-only folder is one :class:`MmtkError` line.
    """
    return atomic_write(path, lambda handle: torch.save(state, handle))


def link_last(path: Path) -> Path:
    """Point ``RUN/last.pt`` at checkpoint ``path`` (a hard link, swapped in atomically; a copy where links fail)."""
    last = path.parent.parent / "last.pt"
    tmp = make_temp(last)
    try:
        with disk_errors(last):
            os.unlink(tmp)  # os.link needs a free name: the unpredictable one just reserved
            try:
                os.link(path, tmp)
            except OSError:
                with open(path, "rb") as source, open(tmp, "xb") as copy:
                    shutil.copyfileobj(source, copy)
        publish(tmp, last)
    finally:
        discard(tmp)
    return last


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an mmtk checkpoint safely (``weights_only=True``; see :func:`mmtk.formats.read_state_dict`)."""
    return read_state_dict(path, map_location)


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """Step checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Metrics log


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; TensorBoard too when it is installed."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with disk_errors(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    """What :func:`fit` leaves behind."""

    run_dir: Path
    steps: int
    last_checkpoint: Path | None
    last_losses: dict[str, float]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / info.world_size
    return values


@dataclass
class Batches:
    """The resumable data feed of a run."""

    loader: DataLoader
    sampler: RunSampler
    micro: int  # samples per process per micro-step
    accum_steps: int  # micro-steps per optimizer step
    steps_per_epoch: int  # optimizer steps

    def from_step(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from optimizer step ``step`` on, endlessly (``accum_steps`` per optimizer step)."""
        self.sampler.start_step = step
        return iter(self.loader)


def make_batches(recipe: Recipe, train_set: Dataset, info: DistInfo, micro_batch: int | None = None,
                 workers: int | None = None) -> Batches:
    """Split the global batch over processes and accumulation steps; seed sampling and augmentation.

    ``micro_batch`` and ``workers`` are the resolved values of ``optim.micro_batch`` and ``data.num_workers``
    (:func:`plan_memory` resolves ``auto``); by default the recipe's numbers.
    """
    opt, seed = recipe.optim, recipe.train.seed
    if micro_batch is None and isinstance(opt.micro_batch, int):
        micro_batch = opt.micro_batch
    if workers is None:
        workers = loader_workers(recipe.data.num_workers, info.device.type, info.world_size)
    accum = accum_steps_for(recipe, info.world_size, micro_batch)
    micro = opt.batch_size // (info.world_size * accum)
    repeat = recipe.data.repeat
    if len(train_set) * repeat < opt.batch_size:  # e.g. 795 NYUv2 frames and the paper's batch of 2048
        repeat = math.ceil(opt.batch_size / len(train_set))
        if info.is_main:
            main_process_print(f"note: {len(train_set)} frames x data.repeat {recipe.data.repeat} is less than one "
                               f"global batch of {opt.batch_size}; each epoch repeats the frames {repeat} times")
    if repeat > 1:
        train_set = ConcatDataset([train_set] * repeat)
    sampler = RunSampler(train_set, info.world_size, info.rank, seed, samples_per_step=micro * accum)
    # Its own generator: creating an iterator must not draw from the global RNG (the masks' RNG).
    loader = DataLoader(SeededDataset(train_set, seed), batch_size=micro, sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_sigint,
                        pin_memory=recipe.data.pin_memory and info.device.type == "cuda")
    return Batches(loader, sampler, micro, accum, sampler.steps_per_epoch)


def accum_steps_for(recipe: Recipe, world_size: int, micro_batch: int | None) -> int:
    """Micro-steps per optimizer step: optim.accum_steps, or more so that no micro-batch exceeds ``micro_batch``."""
    opt = recipe.optim
    accum = opt.accum_steps
    if micro_batch is not None:  # e.g. the paper's 2048 on one GPU: 8 micro-steps of 256
        accum = max(accum, math.ceil(opt.batch_size / (world_size * micro_batch)))
    if opt.batch_size % (world_size * accum):
        raise MmtkError(f"optim.batch_size {opt.batch_size} must be divisible by processes x accumulation steps "
                        f"= {world_size} x {accum}; change optim.batch_size or optim.micro_batch")
    return accum


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the loader workers too; the main process decides when to stop (Ctrl-C is a save point).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Memory: will a micro-step fit on the device?

GB = 1e9
WORKER_BYTES = 300e6  # a forked loader worker's own memory (torch, h5py, decoded frames), besides its batches
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments
BACKWARD_MARGIN = 1.25  # activations kept for backward, times this: gradients of activations exist meanwhile


@dataclass
class MemoryEstimate:
    """Bytes a training process needs, by part; ``total(micro, workers)`` adds them up."""

    model: int  # weights, gradients and optimizer moments
    per_image: int  # activations kept for backward per image of a micro-batch (with the margin)
    fixed: int  # per micro-step, whatever its size (e.g. weights cast for autocast)
    sample: int  # bytes of one prepared training sample (loader batches in flight)

    def total(self, micro: int, workers: int) -> int:
        return self.model + self.fixed + micro * self.per_image + self.loader(micro, workers)

    def loader(self, micro: int, workers: int) -> int:
        return int(workers * (WORKER_BYTES + 2 * micro * self.sample))  # 2: DataLoader's prefetch factor


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on ``device``: free GPU memory, or the system's available memory (within
    the container's cgroup limit, when there is one: :func:`mmtk.io.available_ram`)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram()


def _saved_bytes(model: nn.Module, compute_loss: LossFn, batch: dict[str, torch.Tensor], device: torch.device,
                 precision: str) -> int:
    """Bytes of the tensors one forward pass keeps for backward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _autocast(device, precision):
        loss, _ = compute_loss(model, batch)
    del loss
    return sum(kept.values())


def estimate_memory(model: nn.Module, compute_loss: LossFn, train_set: Dataset, recipe: Recipe,
                    device: torch.device) -> MemoryEstimate:
    """Measure what a micro-step needs: forward passes at 1 and 2 images give the activations per image.

    Runs on ``device`` with the recipe's precision; the global RNGs and the model's mode are left as they were.
    """
    dataset = SeededDataset(train_set, recipe.train.seed)
    samples = [dataset[(0, i % len(train_set))] for i in range(2)]  # type: ignore[arg-type]
    sample_bytes = sum(v.numel() * v.element_size() for v in samples[0].values() if torch.is_tensor(v))
    was_training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()  # no running statistics change; the saved activations are those of training
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            one, two = (_saved_bytes(model, compute_loss, to_device(default_collate(samples[:n]), device), device,
                                     recipe.train.precision) for n in (1, 2))
    finally:
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
    per_image = max(two - one, 1)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(model=OPTIMIZER_BYTES_PER_PARAM * params, per_image=int(BACKWARD_MARGIN * per_image),
                          fixed=max(one - per_image, 0), sample=sample_bytes)


def _micro_choices(recipe: Recipe, world_size: int) -> list[int]:
    """Micro-batch sizes the global batch can be split into on this many processes, largest first."""
    per_process = recipe.optim.batch_size // world_size
    return [per_process // accum for accum in range(recipe.optim.accum_steps, per_process + 1)
            if per_process % accum == 0]


def plan_memory(model: nn.Module, compute_loss: LossFn, train_set: Dataset, recipe: Recipe,
                info: DistInfo) -> tuple[int | None, int]:
    """(micro-batch, loader workers) for this run, checked against the device's memory before training starts.

    ``optim.micro_batch: auto`` takes the largest micro-batch that fits; a fixed one that does not fit stops
    with one line naming the estimate, what is available and the ``--set`` values that fit.
    """
    opt = recipe.optim
    workers = loader_workers(recipe.data.num_workers, info.device.type, info.world_size)
    setting = opt.micro_batch if isinstance(opt.micro_batch, int) else None
    micro = opt.batch_size // (info.world_size * accum_steps_for(recipe, info.world_size, setting))
    estimate = estimate_memory(model, compute_loss, train_set, recipe, info.device)
    on_device = sum(p.numel() * p.element_size() for p in model.parameters()) if info.device.type == "cuda" else 0
    # 90 %: room for the allocator's fragmentation and for what the estimate leaves out
    budget = int(0.9 * (available_memory(info.device) + on_device))
    fitting = [m for m in _micro_choices(recipe, info.world_size) if estimate.total(m, workers) <= budget]
    if opt.micro_batch == "auto":
        if not fitting:
            raise MmtkError(_does_not_fit(estimate, 1, workers, budget, info, recipe))
        if info.is_main:
            main_process_print(f"optim.micro_batch auto: {fitting[0]} images per micro-step (about "
                               f"{estimate.total(fitting[0], workers) / GB:.1f} GB of {budget / GB:.1f} GB usable "
                               f"on {info.device.type})")
        return fitting[0], workers
    if estimate.total(micro, workers) > budget:
        raise MmtkError(_does_not_fit(estimate, micro, workers, budget, info, recipe))
    return setting, workers


def _does_not_fit(estimate: MemoryEstimate, micro: int, workers: int, budget: int, info: DistInfo,
                  recipe: Recipe) -> str:
    """The one line that says how much a micro-step needs, what there is, and which settings fit."""
    need = (f"a micro-step of {micro} images needs about {estimate.total(micro, workers) / GB:.1f} GB "
            f"(model and optimizer {estimate.model / GB:.1f} GB, activations {micro * estimate.per_image / GB:.1f} GB, "
            f"{workers} loader workers {estimate.loader(micro, workers) / GB:.1f} GB) but {budget / GB:.1f} GB is "
            f"usable on {info.device.type}")
    for try_workers in dict.fromkeys((workers, min(workers, 2), 0)):
        fitting = [m for m in _micro_choices(recipe, info.world_size) if estimate.total(m, try_workers) <= budget]
        if fitting:
            sets = f"--set optim.micro_batch={fitting[0]}"
            if try_workers != workers:
                sets += f" --set data.num_workers={try_workers}"
            return f"{need}; use {sets} (or --set optim.micro_batch=auto), which needs about " \
                   f"{estimate.total(fitting[0], try_workers) / GB:.1f} GB"
    return f"{need}; even 1 image per micro-step does not fit: use a smaller model (model.name) or image size " \
           f"(data.image_size), or a machine with more memory"


class Checkpointer:
    """Writes and restores everything a bit-exact resume needs; only rank 0 writes."""

    def __init__(self, recipe: Recipe, run_dir: Path, info: DistInfo, model: nn.Module, optimizer, scheduler,
                 scaler, steps_per_epoch: int, extra_state: dict[str, Any] | None) -> None:
        self.recipe, self.run_dir, self.info, self.model = recipe, run_dir, info, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.steps_per_epoch, self.extra = steps_per_epoch, extra_state or {}
        self.last: Path | None = None

    def save(self, step: int) -> Path:
        states = [rng_state()]
        if self.info.world_size > 1:
            states = [None] * self.info.world_size
            dist.all_gather_object(states, rng_state())
        path = self.run_dir / "checkpoints" / f"step_{step:08d}.pt"
        if self.info.is_main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": self.recipe.kind,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": states,
                "step": step, "epoch": step / self.steps_per_epoch, "recipe": recipe_to_dict(self.recipe),
                **self.extra,
            }, path)
            link_last(path)
            for old in checkpoint_paths(self.run_dir)[:-self.recipe.train.keep_checkpoints]:
                old.unlink(missing_ok=True)
        self.last = path
        return path

    def restore(self) -> int:
        """Load the newest checkpoint into everything; returns its step."""
        self.last = newest_checkpoint(self.run_dir)
        if self.last is None:
            raise MmtkError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; start without --resume")
        state = load_checkpoint(self.last)
        if self.info.is_main:  # a kill between the checkpoint's publish and last.pt's update left it behind
            last = self.run_dir / "last.pt"
            if not (last.exists() and os.path.samefile(last, self.last)):
                link_last(self.last)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if len(state["rng"]) == self.info.world_size:
            set_rng_state(state["rng"][self.info.rank])
        else:  # resumed with another process count: same data order, new mask draws
            seed_everything(self.recipe.train.seed + self.info.rank + step)
        return step


def fit(recipe: Recipe, run_dir: str | Path, model: nn.Module, train_set: Dataset, compute_loss: LossFn,
        resume: bool = False, extra_state: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` on ``train_set`` as ``recipe`` says, writing checkpoints and metrics to ``run_dir``.

    ``compute_loss(model, batch)`` returns the scalar loss to minimise and a dict of named scalar
    losses to log. ``extra_state`` (plain values) is stored in every checkpoint, e.g. how to rebuild
    the model. With ``resume`` the newest checkpoint in ``run_dir`` is loaded and training continues
    from its step, reproducing an uninterrupted run.
    """
    opt, cfg, run_dir = recipe.optim, recipe.train, Path(run_dir)
    if resume and newest_checkpoint(run_dir) is None:  # before anything is created or written
        raise MmtkError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    info = setup_distributed(cfg.device)
    if cfg.precision == "fp16" and info.device.type != "cuda":
        raise MmtkError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    model.to(info.device)
    micro_batch, workers = plan_memory(model, compute_loss, train_set, recipe, info)  # before anything is written
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    data = make_batches(recipe, train_set, info, micro_batch, workers)
    total_steps = max(1, math.ceil(opt.epochs * data.steps_per_epoch))
    stop = min(total_steps, cfg.max_steps or total_steps)
    optimizer, scheduler = build_optimizer(model, recipe, total_steps, round(opt.warmup_epochs * data.steps_per_epoch))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    ckpt = Checkpointer(recipe, run_dir, info, model, optimizer, scheduler, scaler, data.steps_per_epoch, extra_state)
    metrics = MetricsLog(run_dir, info.is_main)
    seed_everything(cfg.seed + info.rank)  # different masks per process, same init (weights are broadcast)
    step = ckpt.restore() if resume else 0
    if resume and info.is_main:
        main_process_print(f"resumed from step {step} of {stop} ({ckpt.last})")
    metrics.truncate_after(step)
    if cfg.compile == "blocks":
        compile_blocks(model)  # the transformer blocks; masking and gathers stay eager
    elif cfg.compile == "step":
        compile_step(model)  # the whole forward (masking, decoders, losses) and its backward: one graph
    train_model = model
    if info.world_size > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    progress, last_losses = ProgressLine(info.is_main, stop, data.accum_steps, data.micro * info.world_size), {}
    tick, tick_step = time.perf_counter(), step
    train_model.train()
    batches = data.from_step(step)
    with progress, StopRequest() as stop_request:
        progress.start(step)
        while step < stop:
            sums: dict[str, torch.Tensor] = {}
            for micro_step in range(data.accum_steps):
                batch = to_device(next(batches), info.device)
                sync = micro_step == data.accum_steps - 1 or info.world_size == 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with _autocast(info.device, cfg.precision):
                        loss, losses = compute_loss(train_model, batch)
                    scaler.scale(loss / data.accum_steps).backward()
                for name, value in {"loss": loss, **losses}.items():
                    sums[name] = sums.get(name, 0) + value.detach().float() / data.accum_steps
                progress.micro_step(step, micro_step + 1)
            values = _mean_over_ranks(torch.stack(list(sums.values())), info).tolist()
            step_losses = dict(zip(sums, values))
            if not all(math.isfinite(v) for v in values):
                raise MmtkError(
                    f"loss became non-finite at step {step + 1} ({_fmt_losses(step_losses)}); stopped. "
                    f"Last good checkpoint: {ckpt.last or 'none yet'}. Lower optim.lr, set optim.clip_grad "
                    f"or train.precision=fp32, then rerun with --resume")
            if opt.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[-1]["lr"]  # top group: no layer decay
            scheduler.step()
            step, last_losses = step + 1, step_losses
            progress.step_done(step, step_losses, lr)
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                images_per_s = (step - tick_step) * opt.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                metrics.write({"step": step, "epoch": round(step / data.steps_per_epoch, 4), **step_losses,
                               "lr": lr, "images_per_s": round(images_per_s, 2)})
                progress.log(step)
            stopping = stop_request.agreed(info) and step < stop
            if step % cfg.ckpt_every == 0 or step == stop or stopping:
                ckpt.save(step)
            if stopping:
                metrics.close()
                raise TrainingInterrupted(step, stop, ckpt.last)
    metrics.close()
    return FitResult(run_dir, step, ckpt.last, last_losses)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at a save point: ``step`` finished and written to ``checkpoint``."""

    def __init__(self, step: int, stop: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped at step {step} of {stop}; checkpoint {checkpoint}")
        self.step, self.stop, self.checkpoint = step, stop, checkpoint


class StopRequest:
    """Ctrl-C as a save point: the first SIGINT asks the loop to stop after the current optimizer step (which
    then writes a checkpoint); a second one raises KeyboardInterrupt at once. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        main_process_print("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again stops at once)")

    def agreed(self, info: DistInfo) -> bool:
        """Whether any process was asked to stop (all processes must save the same step together)."""
        if info.world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _fmt_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in losses.items())


def format_eta(seconds: float) -> str:
    """``eta 1:02:03`` (hours:minutes:seconds); ``eta --`` while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "eta --"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"eta {hours}:{minutes:02d}:{secs:02d}"


def progress_text(step: int, stop: int, micro: int, accum: int, images_per_s: float, eta_s: float,
                  losses: dict[str, float], lr: float | None, width: int | None) -> str:
    """The progress line: step (and micro-step inside a long step), images/s and a labelled ETA always; then,
    as far as ``width`` allows, a bar, the loss, the lr and each task's loss (None: everything)."""
    where = f"step {step}/{stop}" + (f" micro {micro}/{accum}" if 0 < micro < accum else "")
    line = f"{where} {images_per_s:.1f} img/s {format_eta(eta_s)}"
    if width is not None and len(line) > width and where != f"step {step}/{stop}":  # very narrow: no micro-step
        return progress_text(step, stop, 0, accum, images_per_s, eta_s, losses, lr, width)
    optional = []
    if "loss" in losses:
        optional.append(f"loss {losses['loss']:.4f}")
    if lr is not None:
        optional.append(f"lr {lr:.2e}")
    optional += [f"{name} {value:.4f}" for name, value in losses.items() if name != "loss"]
    if width is None:
        return " ".join([line, *optional])
    bar = 20 if len(line) + 1 + 20 + len(optional[0] if optional else "") + 1 <= width else 0  # room for the loss too
    if bar:
        done = round(bar * step / max(stop, 1))
        line = f"{where} {'━' * done}{'╺' if done < bar else ''}{' ' * max(bar - done - 1, 0)} " \
               f"{images_per_s:.1f} img/s {format_eta(eta_s)}"
    for part in optional:
        if len(line) + 1 + len(part) > width:
            break  # losses drop first, in order: the task losses, then lr, then the total loss
        line += " " + part
    return line


class ProgressLine:
    """Training progress: on a terminal one line redrawn in place, fitted to its width; otherwise (logs, CI)
    plain lines, one per logged step, plus one at least every minute inside long optimizer steps.

    The rate counts micro-steps (images seen), so a long optimizer step still moves the line.
    """

    PLAIN_EVERY_S = 60.0

    def __init__(self, enabled: bool, stop: int, accum: int, images_per_micro: int) -> None:
        from rich.console import Console

        self.enabled, self.stop, self.accum, self.images_per_micro = enabled, stop, accum, images_per_micro
        self.console = Console()
        self.live = None
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.losses: dict[str, float] = {}
        self.lr: float | None = None
        self.step, self.micro = 0, 0
        self.start_images, self.start_time, self.last_plain = 0, time.perf_counter(), time.perf_counter()

    def __enter__(self) -> ProgressLine:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def start(self, step: int) -> None:
        self.step, self.start_images, self.start_time = step, self._images(step, 0), time.perf_counter()
        self._show()

    def micro_step(self, step: int, micro: int) -> None:
        self.step, self.micro = step, micro
        if self.live is not None:
            self._show()
        elif self.enabled and micro < self.accum and time.perf_counter() - self.last_plain >= self.PLAIN_EVERY_S:
            self._print()  # a long optimizer step is never silent in a log

    def step_done(self, step: int, losses: dict[str, float], lr: float) -> None:
        self.step, self.micro, self.losses, self.lr = step, 0, losses, lr
        if self.live is not None:
            self._show()

    def log(self, step: int) -> None:
        """A logged step: a plain line when not on a terminal."""
        if self.enabled and self.live is None:
            self._print()

    def _images(self, step: int, micro: int) -> int:
        return (step * self.accum + micro) * self.images_per_micro

    def _rate_eta(self) -> tuple[float, float]:
        seen = self._images(self.step, self.micro) - self.start_images
        elapsed = time.perf_counter() - self.start_time
        rate = seen / elapsed if seen and elapsed > 0 else 0.0
        left = self._images(self.stop, 0) - self._images(self.step, self.micro)
        return rate, left / rate if rate > 0 else float("nan")

    def _show(self) -> None:
        if self.live is None:
            return
        from rich.text import Text

        rate, eta = self._rate_eta()
        text = progress_text(self.step, self.stop, self.micro, self.accum, rate, eta, self.losses, self.lr,
                             self.console.width - 1)
        self.live.update(Text(text, no_wrap=True, overflow="crop"))

    def _print(self) -> None:
        rate, eta = self._rate_eta()
        print(progress_text(self.step, self.stop, self.micro, self.accum, rate, eta, self.losses, self.lr, None),
              flush=True)
        self.last_plain = time.perf_counter()


def main_process_print(message: str) -> None:
    """Print on rank 0 only (under torchrun every process would print otherwise)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)
