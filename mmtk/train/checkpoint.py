"""Checkpoints: atomic step files with every state a bit-exact resume needs, ``RUN/last.pt``, and finding them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
import torch.distributed as dist
from torch import nn

from mmtk.config import FINETUNE_LOSS_KEYS, Recipe, TrainConfig, recipe_to_dict
from mmtk.errors import MmtkError
from mmtk.weights.files import read_state_dict
from mmtk.io import atomic_write, discard, disk_errors, make_temp, publish
from mmtk.weights.integrity import seal
from mmtk.weights.folders import checkpoint_paths, checkpoint_step
from mmtk.runtime import DistInfo, main_process_print, rng_state
from mmtk.train.optim import Optimization

CHECKPOINT_FORMAT = "mmtk-checkpoint"
CHECKPOINT_VERSION = 1
# What a resume may change in the optim section: how a step is cut into micro-steps, not the optimisation
# (the checkpoint's optimizer and schedule state would silently override any other change).
RESUMABLE_OPTIM = ("micro_batch", "accum_steps")
# What a resume may change in the model section: the masking (which tokens the encoder sees), not the weights.
RESUMABLE_MODEL = ("num_visible", "alphas")
# train settings a resume may change: all but what the head was trained to predict (its loss, target normalisation)
RESUMABLE_TRAIN = tuple(f.name for f in fields(TrainConfig) if f.name not in (*FINETUNE_LOSS_KEYS, "seed"))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`mmtk.io.atomic_write`: private temporary file, fsync, rename).

    Keep ``state`` to tensors, plain containers, numbers and strings so it loads with
    ``weights_only=True``. A full disk or a read-only folder is one :class:`MmtkError` line.
    """
    sealed = seal(state)  # its SHA-256, checked whenever the file is read (mmtk.weights.integrity)
    return atomic_write(path, lambda handle: torch.save(sealed, handle))


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
    """Load an mmtk checkpoint safely (``weights_only=True``; see :func:`mmtk.weights.files.read_state_dict`)."""
    return read_state_dict(path, map_location)


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step checkpoint with the highest step, or None when the run has none."""
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def older_intact(path: str | Path) -> Path | None:
    """The newest checkpoint of the same run older than ``path`` (a run's ``last.pt`` or step file) that reads
    back intact, or None: what to use instead of a corrupt one."""
    path = Path(path)
    run_dir = path.parent if path.name == "last.pt" else path.parent.parent
    if path.name != "last.pt" and path.parent.name != "checkpoints":
        return None
    limit = checkpoint_step(path)
    for candidate in reversed(checkpoint_paths(run_dir)):
        if (limit is not None and checkpoint_step(candidate) >= limit) or _same_file(candidate, path):
            continue
        try:
            load_checkpoint(candidate)
        except MmtkError:
            continue
        return candidate
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class ResumePoint:
    """The checkpoint a ``--resume`` continues from, read once: its path and its content."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def find_resume_point(run_dir: str | Path, recipe: Recipe) -> ResumePoint:
    """The newest checkpoint of ``run_dir`` that reads back intact (an unreadable newer one is skipped with a
    note), checked against ``recipe`` before anything is built or written: an edited ``RUN/recipe.yaml`` that the
    resume would overwrite, and a model or optimisation other than the run's, are refused in one line."""
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise MmtkError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(paths):
        try:
            point = ResumePoint(path, load_checkpoint(path))
            break
        except MmtkError as err:
            skipped.append((path, str(err)))
    else:
        raise MmtkError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} reads back intact ({skipped[0][1]}); "
                        f"start a new run in another --out folder")
    for path, reason in skipped:
        main_process_print(f"note: {path.name} is unreadable ({reason}); resuming from the older intact "
                           f"{point.path.name} (step {point.step}) instead")
    recorded = point.state.get("recipe")
    if isinstance(recorded, dict):
        _check_recipe_file(run_dir, recipe, recorded, point)
        recorded = _legacy_weight_decay(recipe, recorded)
        _check_same(recipe, recorded, point, "model", RESUMABLE_MODEL, "the checkpoint's weights only fit its model")
        _check_same(recipe, recorded, point, "optim", RESUMABLE_OPTIM,
                    "the checkpoint's optimizer and schedule would override the change")
        _check_same(recipe, recorded, point, "train", RESUMABLE_TRAIN,
                    "the head was trained for that loss and target normalisation; the data order and masks follow "
                    "the seed")
    return point


def _legacy_weight_decay(recipe: Recipe, recorded: dict[str, Any]) -> dict[str, Any]:
    """A run begun before ``optim.weight_decay_on`` existed excluded every "token" parameter from decay, and its
    optimizer state has that rule's groups: it continues with that rule (said once), whatever the recipe says."""
    optim = recorded.get("optim")
    legacy = "weights-except-tokens"
    if not isinstance(optim, dict) or optim.get("weight_decay_on", legacy) != legacy:
        return recorded
    if recipe.optim.weight_decay_on != legacy:
        main_process_print(f"resume: this run started with optim.weight_decay_on {legacy} (mmtk's rule before the key "
                           f"existed); it continues with it, since its optimizer state has that rule's groups")
        recipe.optim.weight_decay_on = legacy
    return {**recorded, "optim": {**optim, "weight_decay_on": legacy}}


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    if not isinstance(values, dict):
        return {prefix.rstrip("."): values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for each value that differs. A key ``before`` lacks (a setting newer than the
    checkpoint) was its default then."""
    defaults = _flat(recipe_to_dict(Recipe()))
    olds = {key: before.get(key, defaults.get(key)) for key in dict.fromkeys([*before, *after])}
    return {key: (old, after.get(key)) for key, old in olds.items() if old != after.get(key)}


def _check_recipe_file(run_dir: Path, recipe: Recipe, recorded: dict[str, Any], point: ResumePoint) -> None:
    """RUN/recipe.yaml edited by hand since the checkpoint was written, and the resume's recipe (the command line's)
    does not carry the edit: the resume would write the old values back over it. Refused, saying how to apply it."""
    path = run_dir / "recipe.yaml"
    try:
        edited = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return  # none, or unreadable: the resume writes it anew from its recipe
    if not isinstance(edited, dict):
        return
    file, then, now = _flat(edited), _flat(recorded), _flat(recipe_to_dict(recipe))
    edits = [key for key in file if file[key] != then.get(key) and file[key] != now.get(key)]
    if edits:
        changes = ", ".join(f"{key} {then.get(key)!r} -> {file[key]!r}" for key in edits)
        raise MmtkError(f"--resume: {path} was edited after step {point.step} was written ({changes}), but a resume "
                        f"takes its settings from the command line, which would write the old values back; apply "
                        f"the edit with `mmtk {recipe.kind} {path} --out {run_dir} --resume` (or --set KEY=VALUE), "
                        f"or undo it")


def _check_same(recipe: Recipe, recorded: dict[str, Any], point: ResumePoint, section: str, allowed: tuple[str, ...],
                why: str) -> None:
    """A resume continues the run: a ``section`` setting other than the checkpoint's (except ``allowed``) is refused,
    naming what the recipe asks and what the checkpoint holds."""
    then = recorded.get(section)
    if not isinstance(then, dict):
        return  # a checkpoint of a writer that recorded no recipe: nothing to compare
    differences = _changes(_flat(then, f"{section}."), _flat(recipe_to_dict(recipe)[section], f"{section}."))
    changed = [f"{key} {old!r} -> {new!r}" for key, (old, new) in differences.items()
               if key.split(".")[1] not in allowed]
    if changed:
        run_dir = point.path.parent.parent
        raise MmtkError(f"--resume: {', '.join(changed)}: the recipe contradicts checkpoint {point.path}, whose run "
                        f"was trained with the values left of each arrow ({why}); resume with the settings of "
                        f"{run_dir / 'recipe.yaml'}, or start a new run in another --out folder")


class Checkpointer:
    """Writes and restores everything a bit-exact resume needs; only rank 0 writes.

    ``record`` (plain values) goes into every checkpoint besides the training state: the run's kind, its
    recipe and how to rebuild its model (:func:`mmtk.train.run.run_training` says what)."""

    def __init__(self, run_dir: Path, keep: int, info: DistInfo, model: nn.Module, optimization: Optimization,
                 scaler: torch.amp.GradScaler, steps_per_epoch: int, record: dict[str, Any]) -> None:
        self.run_dir, self.keep, self.info, self.model = run_dir, keep, info, model
        self.optimizer, self.scheduler, self.scaler = optimization.optimizer, optimization.scheduler, scaler
        self.steps_per_epoch, self.record = steps_per_epoch, record
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
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": states,
                "step": step, "epoch": step / self.steps_per_epoch, **self.record,
            }, path)
            link_last(path)
            for old in checkpoint_paths(self.run_dir)[:-self.keep]:
                old.unlink(missing_ok=True)
        self.last = path
        return path

    def restore(self, point: ResumePoint) -> tuple[int, list[dict[str, Any]]]:
        """Load the checkpoint ``point`` (found and checked by :func:`find_resume_point`) into the model, optimizer,
        scheduler and scaler; returns its step and the RNG states it saved, one per process
        (:func:`mmtk.runtime.seed_run` restores them).

        Its state is emptied here, so no second copy of the weights and optimizer moments stays in host memory
        for the run (the caller read it once, to build the model from it too).
        """
        self.last, state = point.path, point.state
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            step, saved_rng = int(state["step"]), list(state["rng"])
        except (KeyError, RuntimeError, ValueError) as err:  # another image size, other outputs or depth
            raise MmtkError(f"--resume: {self.last} does not fit this run ({_mismatch(err)}); resume with the "
                            f"settings of {self.run_dir / 'recipe.yaml'}, or start a new run in another --out "
                            f"folder") from None
        if self.info.is_main:  # a kill between the checkpoint's publish and last.pt's update left it behind
            last = self.run_dir / "last.pt"
            if not (last.exists() and os.path.samefile(last, self.last)):
                link_last(self.last)
        state.clear()
        return step, saved_rng


def _mismatch(err: Exception) -> str:
    """The first line of what torch found wrong, e.g. ``size mismatch for encoder.pos_emb: ...`` (at most 200 chars)."""
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r}: not an mmtk training checkpoint"
    lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # torch: a heading, then a list
    return reason if len(reason) <= 200 else reason[:197] + "..."
