"""Will a micro-step fit on the device? Measured before anything is written; ``auto`` picks the largest that does."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from mmtk.train.batches import SeededDataset, accum_steps_for
from mmtk.config import loader_workers
from mmtk.errors import MmtkError
from mmtk.io import available_ram
from mmtk.runtime import DistInfo, LossFn, autocast, main_process_print, to_device
from mmtk.train.settings import FeedSettings

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
        """Bytes for micro-steps of ``micro`` images fed by ``workers`` loader workers."""
        return self.model + self.fixed + micro * self.per_image + self.loader(micro, workers)

    def loader(self, micro: int, workers: int) -> int:
        """Bytes of the loader workers and the batches they prefetch."""
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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(device, precision):
        loss, _ = compute_loss(model, batch)
    del loss
    return sum(kept.values())


def estimate_memory(model: nn.Module, compute_loss: LossFn, train_set: Dataset, device: torch.device,
                    precision: str, seed: int = 0) -> MemoryEstimate:
    """Measure what a micro-step needs: forward passes at 1 and 2 images give the activations per image.

    Runs on ``device`` in ``precision`` on the first samples augmented with ``seed``; the global RNGs and the
    model's mode are left as they were.
    """
    dataset = SeededDataset(train_set, seed)
    samples = [dataset[(0, i % len(train_set))] for i in range(2)]  # type: ignore[arg-type]
    sample_bytes = sum(v.numel() * v.element_size() for v in samples[0].values() if torch.is_tensor(v))
    was_training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()  # no running statistics change; the saved activations are those of training
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            one, two = (_saved_bytes(model, compute_loss, to_device(default_collate(samples[:n]), device), device,
                                     precision) for n in (1, 2))
    finally:
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
    per_image = max(two - one, 1)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(model=OPTIMIZER_BYTES_PER_PARAM * params, per_image=int(BACKWARD_MARGIN * per_image),
                          fixed=max(one - per_image, 0), sample=sample_bytes)


def _micro_choices(feed: FeedSettings, world_size: int) -> list[int]:
    """Micro-batch sizes the global batch can be split into on this many processes, largest first."""
    per_process = feed.batch_size // world_size
    return [per_process // accum for accum in range(feed.accum_steps, per_process + 1)
            if per_process % accum == 0]


def plan_memory(model: nn.Module, compute_loss: LossFn, train_set: Dataset, feed: FeedSettings, precision: str,
                info: DistInfo, resumed_micro: int | None = None) -> tuple[int | None, int]:
    """(micro-batch, loader workers) for this run, checked against the device's memory before training starts.

    ``optim.micro_batch: auto`` takes the largest micro-batch that fits, or, when resuming, the one the run
    used (``resumed_micro``) if it still fits: masks are drawn per micro-batch, so another size would not
    reproduce the uninterrupted run. A fixed micro-batch that does not fit stops with one line naming the
    estimate, what is available and the ``--set`` values that fit.
    """
    workers = loader_workers(feed.num_workers, info.device.type, info.world_size)
    setting = feed.micro_batch if isinstance(feed.micro_batch, int) else None
    micro = feed.batch_size // (info.world_size * accum_steps_for(feed, info.world_size, setting))
    estimate = estimate_memory(model, compute_loss, train_set, info.device, precision, feed.seed)
    on_device = sum(p.numel() * p.element_size() for p in model.parameters()) if info.device.type == "cuda" else 0
    # 90 %: room for the allocator's fragmentation and for what the estimate leaves out
    budget = int(0.9 * (available_memory(info.device) + on_device))
    fitting = [m for m in _micro_choices(feed, info.world_size) if estimate.total(m, workers) <= budget]
    if feed.micro_batch == "auto":
        if not fitting:
            raise MmtkError(_does_not_fit(estimate, 1, workers, budget, info, feed))
        chosen = resumed_micro if resumed_micro in fitting else fitting[0]
        if info.is_main:
            why = ("as the run it resumes" if chosen == resumed_micro else
                   f"the resumed run used {resumed_micro}, which no longer fits: its losses will not repeat an "
                   f"uninterrupted run's" if resumed_micro is not None else "the largest that fits")
            main_process_print(f"optim.micro_batch auto: {chosen} images per micro-step, {why} (about "
                               f"{estimate.total(chosen, workers) / GB:.1f} GB of {budget / GB:.1f} GB usable "
                               f"on {info.device.type})")
        return chosen, workers
    if estimate.total(micro, workers) > budget:
        raise MmtkError(_does_not_fit(estimate, micro, workers, budget, info, feed))
    return setting, workers


def _does_not_fit(estimate: MemoryEstimate, micro: int, workers: int, budget: int, info: DistInfo,
                  feed: FeedSettings) -> str:
    """The one line that says how much a micro-step needs, what there is, and which settings fit."""
    need = (f"a micro-step of {micro} images needs about {estimate.total(micro, workers) / GB:.1f} GB "
            f"(model and optimizer {estimate.model / GB:.1f} GB, activations {micro * estimate.per_image / GB:.1f} GB, "
            f"{workers} loader workers {estimate.loader(micro, workers) / GB:.1f} GB) but {budget / GB:.1f} GB is "
            f"usable on {info.device.type}")
    for try_workers in dict.fromkeys((workers, min(workers, 2), 0)):
        fitting = [m for m in _micro_choices(feed, info.world_size) if estimate.total(m, try_workers) <= budget]
        if fitting:
            sets = f"--set optim.micro_batch={fitting[0]}"
            if try_workers != workers:
                sets += f" --set data.num_workers={try_workers}"
            return f"{need}; use {sets} (or --set optim.micro_batch=auto), which needs about " \
                   f"{estimate.total(fitting[0], try_workers) / GB:.1f} GB"
    return f"{need}; even 1 image per micro-step does not fit: use a smaller model (model.name) or image size " \
           f"(data.image_size), or a machine with more memory"
