"""Checkpoints: atomic step files with every state a bit-exact resume needs, ``RUN/last.pt``, and finding them."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmtk.config import Recipe, recipe_to_dict
from mmtk.errors import MmtkError
from mmtk.formats import read_state_dict
from mmtk.io import atomic_write, discard, disk_errors, make_temp, publish
from mmtk.runtime import DistInfo, rng_state, seed_everything, set_rng_state

CHECKPOINT_FORMAT = "mmtk-checkpoint"
CHECKPOINT_VERSION = 1
# What a resume may change in the optim section: how a step is cut into micro-steps, not the optimisation
# (the checkpoint's optimizer and schedule state would silently override any other change).
RESUMABLE_OPTIM = ("micro_batch", "accum_steps")


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
    """The step checkpoint with the highest step, or None when the run has none."""
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


class Checkpointer:
    """Writes and restores everything a bit-exact resume needs; only rank 0 writes."""

    def __init__(self, recipe: Recipe, run_dir: Path, info: DistInfo, model: nn.Module, optimizer, scheduler,
                 scaler, steps_per_epoch: int, extra_state: dict[str, Any] | None) -> None:
        self.recipe, self.run_dir, self.info, self.model = recipe, run_dir, info, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.steps_per_epoch, self.extra = steps_per_epoch, extra_state or {}
        self.last: Path | None = None

    def save(self, step: int) -> Path:
        """Write step ``step``'s checkpoint, point ``last.pt`` at it and drop those beyond
        ``train.keep_checkpoints``. Every process calls it (each one's RNG state is gathered); rank 0 writes."""
        mine = rng_state()
        states = [mine]
        if self.info.world_size > 1:
            states = [None] * self.info.world_size
            dist.all_gather_object(states, mine)
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

    def restore(self, path: Path, state: dict[str, Any]) -> int:
        """Load checkpoint ``path``, read as ``state``, into everything; returns its step.

        ``state`` is emptied here, so no second copy of the weights and optimizer moments stays in host memory
        for the run (the caller read it once, to build the model from it too).
        """
        self.last = path
        self._check_same_optimisation(state.get("recipe"))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
        except (KeyError, RuntimeError, ValueError) as err:  # another image size, other outputs or depth
            raise MmtkError(f"--resume: {self.last} does not fit this run ({_mismatch(err)}); resume with the "
                            f"settings of {self.run_dir / 'recipe.yaml'}, or start a new run in another --out "
                            f"folder") from None
        if self.info.is_main:  # a kill between the checkpoint's publish and last.pt's update left it behind
            last = self.run_dir / "last.pt"
            if not (last.exists() and os.path.samefile(last, self.last)):
                link_last(self.last)
        if len(state["rng"]) == self.info.world_size:
            set_rng_state(state["rng"][self.info.rank])
        else:  # resumed with another process count: same data order, new mask draws
            seed_everything(self.recipe.train.seed + self.info.rank + step)
        state.clear()
        return step

    def _check_same_optimisation(self, recorded: Any) -> None:
        """A resume continues the run's optimisation: an optim setting other than the checkpoint's is refused."""
        then = recorded.get("optim") if isinstance(recorded, dict) else None
        if not isinstance(then, dict):
            return  # a checkpoint of a writer that recorded no recipe: nothing to compare
        now = recipe_to_dict(self.recipe)["optim"]
        changed = [f"optim.{key} {then[key]!r} -> {value!r}" for key, value in now.items()
                   if key not in RESUMABLE_OPTIM and key in then and then[key] != value]
        if changed:
            raise MmtkError(f"--resume: {', '.join(changed)} against the run in {self.run_dir}; a resume continues "
                            f"its optimisation (the checkpoint's optimizer and schedule would override the change): "
                            f"resume with the settings of {self.run_dir / 'recipe.yaml'}, or start a new run in "
                            f"another --out folder")


def _mismatch(err: Exception) -> str:
    """The first line of what torch found wrong, e.g. ``size mismatch for encoder.pos_emb: ...`` (at most 200 chars)."""
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r}: not an mmtk training checkpoint"
    lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # torch: a heading, then a list
    return reason if len(reason) <= 200 else reason[:197] + "..."
