"""What a training process runs on: its place in a torchrun job, its device, its RNGs and its precision."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmtk.errors import MmtkError

# What is trained, as the loop and the memory planner call it: (loss to minimise, named losses to log).
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_run(seed: int, process: DistInfo | None = None, saved: list[dict[str, Any]] | None = None,
             step: int = 0) -> None:
    """Every seeding of a training run's global RNGs (Python's, numpy's, torch's), at its two moments.

    - Before the model is built (no ``process``): ``seed`` on every process, so all draw the same initial
      weights (DDP broadcasts them anyway; a resumed run overwrites them).
    - Before the first step (``process`` given): each process its own stream, so each draws other masks:
      ``seed + rank`` for a new run; for a resumed one the states its checkpoint saved (``saved``, one per rank,
      :func:`rng_state`), or, when the process count changed, ``seed + rank + step`` (the same data order, new
      mask draws).

    The loader's sampling and augmentation do not use these: they are seeded per sample (mmtk.train.batches).
    """
    if process is not None and saved is not None and len(saved) == process.world_size:
        set_rng_state(saved[process.rank])
        return
    value = seed if process is None else seed + process.rank + (step if saved is not None else 0)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # a run that never touched the GPU has no CUDA RNG to keep (nor wakes it)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context that runs a forward pass in ``train.precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (non-blocking: pinned host memory copies asynchronously)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def main_process_print(message: str) -> None:
    """Print on rank 0 only (under torchrun every process would print otherwise)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)
