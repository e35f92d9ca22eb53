"""The training loop shared by pretraining and finetuning: :func:`train` builds its parts, :func:`fit` runs it.

One loop: gradient accumulation, optional clipping, autocast (bf16/fp16), optional ``torch.compile``, DDP under
``torchrun``, Ctrl-C as a save point, JSONL metrics (and TensorBoard when installed). Its parts live beside it:
:mod:`mmtk.train.settings` (the typed settings made once from a recipe), :mod:`mmtk.runtime` (processes, devices,
seeding, precision), :mod:`mmtk.train.optim` (AdamW groups) with :mod:`mmtk.train.schedules` (the lr schedules),
:mod:`mmtk.train.batches` (the resumable data feed), :mod:`mmtk.train.memory` (will a micro-step fit),
:mod:`mmtk.train.checkpoint` (bit-exact resume) and :mod:`mmtk.progress` (the progress line).

What is being trained comes in as a model, a dataset and a ``compute_loss(model, batch)`` function,
so the loop knows nothing about MultiMAE; :mod:`mmtk.train.run` builds those from a recipe.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from mmtk.config import save_recipe
from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text, disk_errors
from mmtk.model.multimae import compile_blocks, compile_step
from mmtk.progress import ProgressLine, format_duration
from mmtk.runtime import DistInfo, LossFn, autocast, main_process_print, seed_run, setup_distributed, to_device
from mmtk.train.batches import Batches, make_batches
from mmtk.train.checkpoint import Checkpointer, ResumePoint
from mmtk.train.memory import plan_memory
from mmtk.train.optim import Optimization, build_optimizer
from mmtk.train.settings import LoopSettings, TrainSettings


@dataclass
class FitResult:
    """What :func:`fit` leaves behind."""

    run_dir: Path
    steps: int
    last_checkpoint: Path | None
    last_losses: dict[str, float]


def train(settings: TrainSettings, run_dir: str | Path, model: nn.Module, train_set: Dataset, compute_loss: LossFn,
          record: dict[str, Any] | None = None, resume_from: ResumePoint | None = None) -> FitResult:
    """Train ``model`` on ``train_set`` as ``settings`` say, writing checkpoints and metrics to ``run_dir``.

    ``compute_loss(model, batch)`` returns the scalar loss to minimise and a dict of named scalar losses to log.
    ``record`` (plain values) is stored in every checkpoint; its ``recipe`` also as ``RUN/recipe.yaml``.
    ``resume_from`` is the checkpoint a ``--resume`` continues from (:func:`mmtk.train.checkpoint.find_resume_point`
    found, checked and read it): it is loaded here, once, before the loop; without it the run starts fresh.
    Nothing is written before the memory check and the restore have passed.
    """
    loop, run_dir = settings.loop, Path(run_dir)
    process = setup_distributed(loop.device)
    if loop.precision == "fp16" and process.device.type != "cuda":
        raise MmtkError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if loop.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    model.to(process.device)
    resumed_micro = resume_from.state.get("micro_batch") if resume_from is not None else None
    micro_batch, workers = plan_memory(model, compute_loss, train_set, settings.feed, loop.precision, process,
                                       resumed_micro if isinstance(resumed_micro, int) else None)
    feed = make_batches(settings.feed, train_set, process, micro_batch, workers)
    optimization = build_optimizer(model, settings.optim, feed.steps_per_epoch)
    scaler = torch.amp.GradScaler(process.device.type, enabled=loop.precision == "fp16")
    ckpt = Checkpointer(run_dir, loop.keep_checkpoints, process, model, optimization, scaler, feed.steps_per_epoch,
                        {**(record or {}), "micro_batch": feed.micro})
    step, saved_rng = ckpt.restore(resume_from) if resume_from is not None else (0, None)  # refuses another model
    seed_run(settings.seed, process, saved_rng, step)
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if record and "recipe" in record:
            save_recipe(record["recipe"], run_dir / "recipe.yaml")
    return fit(loop, run_dir, model, compute_loss, feed, optimization, scaler, ckpt, process, step)


def fit(loop: LoopSettings, run_dir: Path, model: nn.Module, compute_loss: LossFn, feed: Batches,
        optimization: Optimization, scaler: torch.amp.GradScaler, ckpt: Checkpointer, process: DistInfo,
        start_step: int = 0) -> FitResult:
    """The loop: optimizer steps from ``start_step`` (a restored run's, else 0) to the schedule's end or
    ``loop.max_steps``, with the parts :func:`train` built."""
    optimizer, scheduler = optimization.optimizer, optimization.scheduler
    stop = min(optimization.total_steps, loop.max_steps or optimization.total_steps)
    step = start_step
    metrics = MetricsLog(run_dir, process.is_main)
    if ckpt.last is not None and process.is_main:
        main_process_print(f"resumed from step {step} of {stop} ({ckpt.last})")
    metrics.truncate_after(step)
    train_model = _compiled_and_wrapped(model, loop.compile, process)
    progress, last_losses = ProgressLine(process.is_main, stop, feed.accum_steps, feed.micro * process.world_size,
                                         on_cpu=process.device.type == "cpu"), {}
    tick, tick_step = time.perf_counter(), step
    train_model.train()
    batches = feed.from_step(step)
    with progress, StopRequest(progress.step_time_left) as stop_request, contextlib.closing(metrics):  # closed however the loop ends
        progress.start(step)
        while step < stop:
            sums = _accumulate(train_model, compute_loss, batches, feed.accum_steps, scaler, loop.precision, process,
                               lambda micro_step: progress.micro_step(step, micro_step))
            # One all_reduce per step carries the losses and the stop flag, so every rank decides alike.
            flag = stop_request.flag(process.device)
            reduced = _mean_over_ranks(torch.stack([*sums.values(), flag]), process).tolist()
            values, stop_flag = reduced[:-1], reduced[-1]
            step_losses = dict(zip(sums, values))
            if not all(math.isfinite(v) for v in values):
                raise MmtkError(
                    f"loss became non-finite at step {step + 1} ({_fmt_losses(step_losses)}); stopped. "
                    f"Last good checkpoint: {ckpt.last or 'none yet'}. Lower optim.lr, set optim.clip_grad "
                    f"or train.precision=fp32, then rerun with --resume")
            if loop.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[-1]["lr"]  # top group: no layer decay
            scheduler.step()
            step, last_losses = step + 1, step_losses
            progress.step_done(step, step_losses, lr)
            if step % loop.log_every == 0 or step == stop:
                now = time.perf_counter()
                images_per_s = (step - tick_step) * loop.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                metrics.write({"step": step, "epoch": round(step / feed.steps_per_epoch, 4), **step_losses,
                               "lr": lr, "images_per_s": round(images_per_s, 2)})
                progress.log()
            stopping = stop_request.agreed(stop_flag, process) and step < stop
            if step % loop.ckpt_every == 0 or step == stop or stopping:
                ckpt.save(step)
            if stopping:
                raise TrainingInterrupted(step, stop, ckpt.last, stop_request.signum)
    return FitResult(run_dir, step, ckpt.last, last_losses)


def _compiled_and_wrapped(model: nn.Module, compile_mode: str, process: DistInfo) -> nn.Module:
    """``model`` compiled as ``train.compile`` says, and wrapped in DDP under torchrun: what the loop calls."""
    if compile_mode == "blocks":
        compile_blocks(model)  # the transformer blocks; masking and gathers stay eager
    elif compile_mode == "step":
        compile_step(model)  # the whole forward (masking, decoders, losses) and its backward: one graph
    if process.world_size == 1:
        return model
    ids = [process.device.index] if process.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _accumulate(train_model: nn.Module, compute_loss: LossFn, batches: Iterator[dict[str, torch.Tensor]],
                accum_steps: int, scaler: torch.amp.GradScaler, precision: str, process: DistInfo,
                micro_step_done: Callable[[int], None]) -> dict[str, torch.Tensor]:
    """Forward and backward over one optimizer step's ``accum_steps`` micro-batches (gradients synchronised only on
    the last); returns this process's mean of each named loss, ``loss`` first."""
    sums: dict[str, torch.Tensor] = {}
    for micro_step in range(accum_steps):
        batch = to_device(next(batches), process.device)
        sync = micro_step == accum_steps - 1 or process.world_size == 1
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with autocast(process.device, precision):
                loss, losses = compute_loss(train_model, batch)
            scaler.scale(loss / accum_steps).backward()
        for name, value in {"loss": loss, **losses}.items():
            sums[name] = sums.get(name, 0) + value.detach().float() / accum_steps
        micro_step_done(micro_step + 1)
    return sums


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run at a save point: ``step`` finished and written to ``checkpoint``;
    ``signum`` is the signal that asked (the CLI exits with 128 + it)."""

    def __init__(self, step: int, stop: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped at step {step} of {stop}; checkpoint {checkpoint}")
        self.step, self.stop, self.checkpoint, self.signum = step, stop, checkpoint, int(signum)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: the run stops mid-step, without a checkpoint (the CLI exits with 128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by signal {signum}")
        self.signum = int(signum)


class StopRequest:
    """Ctrl-C and SIGTERM (what SLURM and Kubernetes send before killing) as save points: the first one asks the
    loop to stop after the current optimizer step (which then writes a checkpoint), saying about how long that
    takes (``time_left()`` seconds); a second one raises :class:`StoppedAtOnce` at once. Only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, time_left: Callable[[], float] | None = None) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self.time_left = time_left
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise StoppedAtOnce(signum)
        self.requested, self.signum = True, int(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        left = self.time_left() if self.time_left is not None else float("nan")
        how_long = f" (about {format_duration(left)} more)" if math.isfinite(left) else ""
        main_process_print(f"{name}: finishing this step{how_long} and writing a checkpoint ({name} again stops "
                           f"at once)")

    def flag(self, device: torch.device) -> torch.Tensor:
        """1.0 when this process was asked to stop, else 0.0: reduced with the step's losses (no extra all_reduce)."""
        return torch.full((), float(self.requested), device=device)

    def agreed(self, reduced_flag: float, info: DistInfo) -> bool:
        """Whether to stop after this step: all processes must save the same step together, so under torchrun
        only what the step's reduction carried counts (a request after it stops the next step); a single
        process also sees a request that came during its optimizer step."""
        return reduced_flag > 0 or (info.world_size == 1 and self.requested)


def _fmt_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in losses.items())


def _mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / info.world_size
    return values


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
        """Append ``record`` (it has a ``step``); nothing on processes other than rank 0."""
        if not self.enabled:
            return
        with disk_errors(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard's writer (it buffers); the JSONL lines are already on disk."""
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
