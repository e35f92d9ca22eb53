"""Learning-rate schedules, registered by name: ``optim.schedule`` in a recipe picks one.

A schedule is one small function: the lr multiplier (of ``optim.lr``) at optimizer step ``step`` of a run
described by an :class:`LrSchedule` (its warm-up and total steps, and ``optim.min_lr`` as a ratio of the lr).
Adding one (here, in a plugin file or in a test)::

    @register_schedule("constant")
    def constant(step: int, run: LrSchedule) -> float:
        return 1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mmtk.errors import MmtkError
from mmtk.plugins import record_registration


@dataclass
class LrSchedule:
    """The lr multiplier at each optimizer step of a run, as ``torch.optim.lr_scheduler.LambdaLR`` calls it.

    Plain fields only: LambdaLR stores them in every checkpoint (loaded with ``weights_only=True``)."""

    name: str  # a registered schedule
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0  # optim.min_lr / the lr

    def __call__(self, step: int) -> float:
        return get_schedule(self.name)(step, self)


Schedule = Callable[[int, LrSchedule], float]
_SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    """Decorator: register ``schedule(step, run) -> lr multiplier`` as ``optim.schedule: name``."""

    def register(schedule: Schedule) -> Schedule:
        _SCHEDULES[name] = schedule
        record_registration(name)
        return schedule

    return register


def list_schedules() -> list[str]:
    """Names of the registered schedules, in registration order."""
    return list(_SCHEDULES)


def get_schedule(name: str) -> Schedule:
    """The schedule registered as ``name``; an unknown name is one line listing the registered ones."""
    if name not in _SCHEDULES:
        raise MmtkError(f"optim.schedule: unknown schedule {name!r}; registered: {', '.join(_SCHEDULES)} (a plugin "
                        f"file adds one with mmtk.train.schedules.register_schedule)")
    return _SCHEDULES[name]


@register_schedule("cosine")
def warmup_cosine(step: int, run: LrSchedule) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` (step 0 already at 1 / warmup_steps), then cosine down to
    ``min_ratio`` at ``total_steps``."""
    if step < run.warmup_steps:
        return (step + 1) / run.warmup_steps
    span = max(1, run.total_steps - run.warmup_steps)
    progress = min(1.0, (step - run.warmup_steps) / span)
    return run.min_ratio + (1 - run.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
