"""`mmtk pretrain`, `mmtk finetune` and `mmtk eval`."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.main import app
from mmtk.errors import MmtkError

SET_HELP = "Override a recipe value, e.g. --set optim.lr=2e-4 (repeatable)."


def _run_dir(recipe: Path, out: Optional[Path], resume: bool) -> Path:
    """--out, else runs/<recipe name>; refuses to mix a new run into a folder that has checkpoints."""
    from mmtk.engine import newest_checkpoint

    run_dir = out or Path("runs") / recipe.stem
    if not resume and newest_checkpoint(run_dir) is not None:
        raise MmtkError(f"{run_dir} already holds checkpoints; add --resume to continue that run or "
                        f"--out NEW_FOLDER for a new one")
    return run_dir


def _train(recipe_path: Path, kind: str, data: Optional[Path], out: Optional[Path], overrides: list[str],
           resume: bool, init: Optional[Path] = None) -> None:
    from mmtk.config import load_recipe
    from mmtk.engine import cleanup_distributed
    from mmtk.training import run_training

    recipe = load_recipe(recipe_path, overrides, data_path=str(data) if data else None)
    if recipe.kind != kind:
        raise MmtkError(f"{recipe_path} is a {recipe.kind} recipe; run it with `mmtk {recipe.kind}`")
    run_dir = _run_dir(recipe_path, out, resume)
    try:
        result = run_training(recipe, run_dir, init=init, resume=resume)
    finally:
        cleanup_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"{kind} done: {result.steps} steps; run folder {result.run_dir}; "
                   f"last checkpoint {result.last_checkpoint}")


@app.command()
def pretrain(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/tiny.yaml."),
    data: Optional[Path] = typer.Option(None, "--data", help="HDF5 file from `mmtk convert` (overrides data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<recipe name>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run folder."),
) -> None:
    """Pretrain a MultiMAE (masked multi-modal autoencoder) as the recipe says."""
    _train(recipe, "pretrain", data, out, set_, resume)


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="Finetuning recipe YAML, e.g. recipes/tiny_finetune_semseg.yaml."),
    init: Optional[Path] = typer.Option(None, "--init", help="mmtk, official MultiMAE or timm ViT checkpoint."),
    data: Optional[Path] = typer.Option(None, "--data", help="HDF5 file from `mmtk convert` (overrides data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<recipe name>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run folder."),
) -> None:
    """Finetune a dense head (semantic segmentation or depth) on top of a pretrained encoder."""
    _train(recipe, "finetune", data, out, set_, resume, init=init)


def _newest_run_checkpoint() -> Path:
    found = sorted(Path("runs").glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MmtkError("no --checkpoint given and no run under runs/; pass --checkpoint RUN/last.pt")
    typer.echo(f"checkpoint: {found[-1]} (the newest run under runs/)")
    return found[-1]


def _fmt(value: float, key: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if key in ("miou", "pixel_acc", "mean_acc", "delta1", "delta2", "delta3"):
        return f"{100 * value:.1f}"
    return f"{value:.3f}"


HEADERS = {"miou": "mIoU %", "pixel_acc": "pixel acc %", "mean_acc": "mean acc %", "delta1": "δ1 %",
           "delta2": "δ2 %", "delta3": "δ3 %", "abs_rel": "AbsRel", "sq_rel": "SqRel m", "rmse": "RMSE m",
           "rmse_log": "RMSE log", "log10": "log10"}


@app.command("eval")
def eval_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint of `mmtk pretrain`/`finetune` "
                                              "(default: the newest runs/*/last.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="HDF5 file (default: the one the run trained on)."),
    inputs: list[str] = typer.Option([], "--inputs", help="Input combination, e.g. rgb,depth; repeat for more rows "
                                     "(default: each input alone and all together)."),
    split: str = typer.Option("test", "--split", help="Split of the data file."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N frames."),
    batch_size: int = typer.Option(4, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions",
                                                    help="Write input | prediction | ground truth PNGs here."),
) -> None:
    """Evaluate a checkpoint: one row per input combination (what does each sensor buy?)."""
    from rich.console import Console
    from rich.table import Table

    from mmtk.evaluate import DEPTH_KEYS, SEG_KEYS, evaluate, results_json
    from mmtk.formats import locate_weights, read_state_dict

    checkpoint = checkpoint or _newest_run_checkpoint()
    if data is None:  # the recorded training file (tensors only mapped, not read)
        recorded = read_state_dict(locate_weights(checkpoint)[0], mmap=True).get("data", {}).get("path")
        if not recorded:  # official, timm or folder weights: no training file
            raise MmtkError(f"{checkpoint} records no data file (it is not from an mmtk run); pass --data FILE.h5")
        data = Path(recorded)
        if not data.is_file():
            raise MmtkError(f"no --data given and the training file {data} of {checkpoint} is gone; pass --data FILE.h5")
        typer.echo(f"data: {data} (the file the run trained on)")
    rows, frames = evaluate(checkpoint, data, inputs, split=split, limit=limit, batch_size=batch_size,
                            device=device, save_predictions=save_predictions)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    for task, keys in (("semseg", SEG_KEYS), ("depth", DEPTH_KEYS)):
        task_rows = [r for r in rows if r.task == task]
        if not task_rows:
            continue
        title = "semantic segmentation" if task == "semseg" else "depth (metres, valid pixels)"
        table = Table(title=f"{title}: {frames} frames of split '{split}' of {data}")
        table.add_column("inputs")
        for key in keys:
            table.add_column(HEADERS[key], justify="right")
        table.add_column("pixels", justify="right")
        for row in task_rows:
            cells = [_fmt(row.metrics[k], k) for k in keys] if row.metrics else ["-"] * len(keys)
            table.add_row(",".join(row.inputs), *cells, str(row.metrics.get("pixels", "-")))
        console.print(table)
        for row in task_rows:
            if row.note:
                console.print(f"  {','.join(row.inputs)} -> {task}: {row.note}")
    console.print(f"{frames} frames evaluated (split '{split}'{', --limit ' + str(limit) if limit else ', full split'})")
    if json_out:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(results_json(checkpoint, data, split, frames, rows))  # strict JSON: NaN becomes null
        tmp.replace(json_out)
