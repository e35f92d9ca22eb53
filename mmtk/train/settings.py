"""The engine's typed settings, made once from a recipe by :func:`train_settings`.

Each part of the engine takes only its own: the data feed and the memory check :class:`FeedSettings`, the
optimizer and its lr schedule :class:`OptimSettings`, the loop :class:`LoopSettings`. Nothing in the engine
reads the :class:`~mmtk.config.Recipe` itself; this module is the one place its keys become engine values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmtk.config import Recipe
from mmtk.train.schedules import get_schedule


@dataclass(frozen=True)
class FeedSettings:
    """How the global batch is cut and fed: ``optim.batch_size``/``accum_steps``/``micro_batch`` and ``data.*``."""

    batch_size: int  # global, per optimizer step, over all processes and accumulation steps
    accum_steps: int  # micro-steps per optimizer step, at least
    micro_batch: int | Literal["auto"] | None  # most samples per process per micro-step
    num_workers: int | Literal["auto"]
    repeat: int
    weights: tuple[float, ...] | None  # a mixture's share of each epoch's draws; None: by size
    pin_memory: bool
    seed: int  # sampling and augmentation


@dataclass(frozen=True)
class OptimSettings:
    """AdamW and its lr schedule: ``optim.*`` with the lr already scaled by the batch size (``optim.scale_lr``)."""

    lr: float
    min_lr: float
    weight_decay: float
    weight_decay_on: str
    betas: tuple[float, float]
    layer_decay: float
    schedule: str  # a registered schedule (mmtk.train.schedules)
    epochs: float
    warmup_epochs: float


@dataclass(frozen=True)
class LoopSettings:
    """How :func:`mmtk.train.engine.fit` runs: ``train.*`` and the per-step gradient handling of ``optim``."""

    device: str
    precision: str
    deterministic: bool
    compile: str
    clip_grad: float | None
    batch_size: int  # for images/s
    max_steps: int | None
    log_every: int
    ckpt_every: int
    keep_checkpoints: int


@dataclass(frozen=True)
class TrainSettings:
    """Everything the engine needs of a recipe; ``seed`` seeds the run (:func:`mmtk.runtime.seed_run`)."""

    seed: int
    feed: FeedSettings
    optim: OptimSettings
    loop: LoopSettings


def train_settings(recipe: Recipe) -> TrainSettings:
    """The engine's settings of ``recipe``; an unknown ``optim.schedule`` is one line listing the registered ones."""
    data, optim, train = recipe.data, recipe.optim, recipe.train
    get_schedule(optim.schedule)  # fails before anything is built
    return TrainSettings(
        seed=train.seed,
        feed=FeedSettings(batch_size=optim.batch_size, accum_steps=optim.accum_steps, micro_batch=optim.micro_batch,
                          num_workers=data.num_workers, repeat=data.repeat, weights=data.weights,
                          pin_memory=data.pin_memory, seed=train.seed),
        optim=OptimSettings(lr=optim.lr * optim.batch_size / 256 if optim.scale_lr else optim.lr, min_lr=optim.min_lr,
                            weight_decay=optim.weight_decay, weight_decay_on=optim.weight_decay_on, betas=optim.betas,
                            layer_decay=optim.layer_decay, schedule=optim.schedule, epochs=optim.epochs,
                            warmup_epochs=optim.warmup_epochs),
        loop=LoopSettings(device=train.device, precision=train.precision, deterministic=train.deterministic,
                          compile=str(train.compile), clip_grad=optim.clip_grad, batch_size=optim.batch_size,
                          max_steps=train.max_steps, log_every=train.log_every, ckpt_every=train.ckpt_every,
                          keep_checkpoints=train.keep_checkpoints))
