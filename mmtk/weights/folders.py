"""Folders that hold weights: which file a path means, and writing a model folder.

A path may be a weights file, a Hugging Face-style model folder (config.json + model.safetensors, as `mmtk weights
--to` writes), a huggingface_hub cache entry or one of its snapshots (nothing is downloaded), or an mmtk run folder
(its newest checkpoint: ``RUN/last.pt``, else the highest ``RUN/checkpoints/step_N.pt``). :func:`locate_weights` is
the one place that tells them apart. Torch-free: `mmtk runs` lists runs without importing it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text

if TYPE_CHECKING:
    from torch import Tensor

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")  # in a model folder, first found wins
CONFIG_TYPE = "mmtk-multimae"  # config.json "model_type" of folders mmtk writes


def locate_weights(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a file, a model folder, a huggingface_hub cache folder or a run folder.

    A cache folder is ``models--ORG--NAME`` (its ``refs/main`` snapshot, else its only one) or one of its
    ``snapshots/REV`` folders; a run folder (or its ``checkpoints/``) means its newest checkpoint.
    """
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise MmtkError(f"checkpoint '{path}' does not exist; check the path")
    if not is_model_folder(path):
        newest = run_checkpoint(path)
        if newest is not None:
            return newest, None
    folder = _hub_snapshot(path) or path
    config = folder / "config.json"
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name, config if config.is_file() else None
    if (folder / "model.safetensors.index.json").is_file():
        raise MmtkError(f"{folder} holds sharded safetensors; mmtk reads one model.safetensors per folder")
    raise MmtkError(f"folder {path} holds no {' or '.join(WEIGHT_FILES)} and no checkpoint (last.pt or "
                    "checkpoints/step_*.pt); give a weights file, a run folder or a folder written by "
                    "`mmtk weights CKPT --to DIR`")


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a model folder (a weights file of :data:`WEIGHT_FILES` inside) or a hub cache entry."""
    return path.is_dir() and ((path / "snapshots").is_dir() or any((path / name).is_file() for name in WEIGHT_FILES))


def _hub_snapshot(path: Path) -> Path | None:
    """The snapshot folder of a huggingface_hub cache entry (models--org--name), or None."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(revisions) != 1:
        raise MmtkError(f"{path}: {len(revisions)} snapshots and no refs/main; give the snapshot folder itself")
    return revisions[0]


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """Step checkpoints of a run (``RUN/checkpoints/step_N.pt``), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(step, p) for p in folder.glob("step_*.pt") if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int | None:
    """N of a step checkpoint ``step_N.pt``, else None."""
    match = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(match.group(1)) if match else None


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """A run folder's newest checkpoint: ``last.pt``, else its newest ``checkpoints/step_*.pt``."""
    run_dir = Path(run_dir)
    if run_dir.name == "checkpoints" and not (run_dir / "last.pt").exists():
        run_dir = run_dir.parent  # RUN/checkpoints given: the run's newest
    if (run_dir / "last.pt").is_file():
        return run_dir / "last.pt"
    found = checkpoint_paths(run_dir)
    return found[-1] if found else None


def read_config_json(path: Path) -> dict[str, Any]:
    """A model folder's config.json: a JSON object, whose model_args (when mmtk wrote it) are an object too."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MmtkError(f"{path} is not valid JSON ({err}); rewrite it with `mmtk weights CKPT --to DIR`") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_args", {}), dict):
        raise MmtkError(f"{path} is not a model description (a JSON object whose model_args is an object); rewrite "
                        "it with `mmtk weights CKPT --to DIR`")
    return config


def write_model_folder(state: dict[str, Tensor], folder: str | Path, model_name: str, model_args: dict[str, Any]
                       ) -> Path:
    """A Hugging Face-style model folder: config.json (the model description) + model.safetensors (mmtk names).

    The safetensors metadata repeats the description, so the weights file alone still says what model it is.
    Files are written beside their final names and renamed when complete.
    """
    from mmtk.weights.files import write_safetensors  # torch: not for the commands that only find runs

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MmtkError(f"{folder} is a file; --to takes a folder (created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    architecture = "DenseModel" if model_args.get("head") else "MultiMAE"
    config = {"model_type": CONFIG_TYPE, "architectures": [architecture], "model_name": model_name,
              "model_args": model_args}
    write_safetensors(state, folder / "model.safetensors", model_name, model_args)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    return folder
