"""Finding runs: which run folders a user trained from which folder, and which checkpoint a command means.

Every `mmtk pretrain` / `mmtk finetune` records its run folder (absolute) with the folder it was started
from in a small index, ``$XDG_STATE_HOME/mmtk/runs.jsonl`` (default ``~/.local/state/mmtk/runs.jsonl``),
so `mmtk eval` without arguments finds the newest run trained from the current folder wherever ``--out``
put it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text
from mmtk.weights.folders import checkpoint_paths, checkpoint_step, is_model_folder, run_checkpoint

INDEX_ENTRIES = 200  # newest records kept
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def index_path() -> Path:
    """Where the run index lives (XDG state folder)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mmtk" / "runs.jsonl"


def _read_index() -> list[dict]:
    records = []
    with contextlib.suppress(OSError):
        for line in index_path().read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and "run" in record and "cwd" in record:
                    records.append(record)
    return records


def record_run(run_dir: str | Path, cwd: str | Path | None = None) -> None:
    """Add ``run_dir`` (trained from ``cwd``, default the current folder) to the index.

    Records of folders that are gone are dropped. The index is a convenience: a read-only home folder
    must not stop a training run, so failures to write it are ignored.
    """
    run = str(Path(run_dir).resolve())
    where = str(Path(cwd or Path.cwd()).resolve())
    records = [r for r in _read_index() if r["run"] != run and Path(r["run"]).is_dir()]
    records = (records + [{"run": run, "cwd": where, "time": time.time()}])[-INDEX_ENTRIES:]
    path = index_path()
    with contextlib.suppress(OSError, MmtkError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


@dataclass
class RunRecord:
    """A run in the index: its folder, the folder it was started from, when, and its newest checkpoint's step."""

    run: Path
    cwd: Path
    started: float
    step: int | None


def list_runs() -> list[RunRecord]:
    """The indexed runs whose folders still exist, newest first."""
    found = []
    for record in reversed(_read_index()):
        run = Path(record["run"])
        if run.is_dir():
            steps = checkpoint_paths(run)
            found.append(RunRecord(run, Path(record["cwd"]), float(record.get("time", 0)),
                                   checkpoint_step(steps[-1]) if steps else None))
    return found


def resolve_checkpoint(path: str | Path, option: str = "--checkpoint") -> Path:
    """The checkpoint ``path`` means: a file as it is, a run folder's newest checkpoint, a model folder (written by
    `mmtk weights --to`, or a huggingface_hub cache entry) as it is.

    A missing path, a folder without checkpoints and an HDF5 data file are one-line errors."""
    path = Path(path)
    if is_model_folder(path):
        return path  # a model folder: the weights loader reads it
    if path.is_dir():
        found = run_checkpoint(path)
        if found is None:
            raise MmtkError(f"{option} {path}: this folder holds no checkpoint (last.pt or checkpoints/step_*.pt); "
                            f"pass the run folder `mmtk pretrain`/`finetune --out` wrote, or a checkpoint file")
        return found
    if not path.exists():
        raise MmtkError(f"{option} {path}: no such file or folder; pass a run folder or a checkpoint file")
    with open(path, "rb") as handle:
        is_hdf5 = handle.read(8) == HDF5_SIGNATURE
    if is_hdf5:
        raise MmtkError(f"{option} {path} is an HDF5 data file (as `mmtk convert` writes), not a checkpoint; pass a "
                        f"run folder, its last.pt, an official MultiMAE .pth or timm ViT weights")
    return path


def newest_run_checkpoint(cwd: str | Path | None = None) -> tuple[Path, str]:
    """(checkpoint, how it was found) of the newest run trained from ``cwd``: the indexed runs started there
    and the folders under its ``runs/``, newest checkpoint first."""
    where = Path(cwd or Path.cwd()).resolve()
    runs = [Path(r["run"]) for r in _read_index() if r["cwd"] == str(where)]
    runs += sorted((where / "runs").glob("*/"))
    found = [(c.stat().st_mtime, c) for c in {run_checkpoint(run) for run in runs if run.is_dir()} if c is not None]
    if not found:
        raise MmtkError(f"no run was trained from this folder ({where}) and none is under runs/; pass --run RUN_FOLDER "
                        f"or --checkpoint FILE")
    return max(found)[1], "the newest run trained from this folder"
