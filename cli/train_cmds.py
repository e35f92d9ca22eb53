"""`mmtk pretrain`, `mmtk finetune` and `mmtk eval`."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Annotated, Optional

import typer

from mmtk.cli.app import DEVICE_HELP, PLUGIN_HELP, app, bundled_options, load_plugins
from mmtk.errors import MmtkError

SET_HELP = "Override a recipe value, e.g. --set optim.lr=2e-4 (repeatable)."


def _run_dir(recipe: str, out: Optional[Path], resume: bool) -> Path:
    """--out, else runs/<recipe name>; refuses to mix a new run into a folder that has checkpoints."""
    from mmtk.train.checkpoint import newest_checkpoint

    run_dir = out or Path("runs") / Path(recipe).stem
    blocking = next((folder for folder in (run_dir, *run_dir.parents) if folder.exists() and not folder.is_dir()),
                    None)
    if blocking is not None:  # a file where the run folder (or one above it) would be
        raise MmtkError(f"--out {run_dir}: {blocking} is a file, not a folder; give a new or existing run folder "
                        f"with --out")
    if resume and not run_dir.is_dir():  # before anything is created there
        raise MmtkError(f"--resume: run folder {run_dir} does not exist, so it has no checkpoint; check --out or "
                        f"start without --resume")
    if not resume and newest_checkpoint(run_dir) is not None:
        raise MmtkError(f"{run_dir} already holds checkpoints; add --resume to continue that run or "
                        f"--out NEW_FOLDER for a new one")
    return run_dir


def _resume_command(kind: str, recipe: str, data: list[Path], run_dir: Path, overrides: list[str]) -> str:
    """The command line that continues this run."""
    words = ["mmtk", kind, recipe, *[word for path in data for word in ("--data", str(path))], "--out", str(run_dir)]
    words += [f"--set={text}" for text in overrides] + ["--resume"]
    return " ".join(shlex.quote(word) for word in words)


def _train(recipe_arg: str, kind: str, run: RunFlags, init: Optional[Path] = None) -> None:
    """Run `mmtk pretrain`/`finetune`: the recipe with its overrides, the run folder, then the run itself; a stop
    by Ctrl-C or SIGTERM exits with 128 + the signal, after printing the command that resumes."""
    load_plugins(run.plugin)
    from mmtk.config import load_recipe
    from mmtk.train.engine import TrainingInterrupted
    from mmtk.progress import counted
    from mmtk.runtime import cleanup_distributed
    from mmtk.train.run_folders import record_run, resolve_checkpoint
    from mmtk.weights.folders import run_checkpoint
    from mmtk.train.run import run_training

    data, out, resume = run.data or [], run.out, run.resume
    overrides = run.set_ + ([f"train.device={run.device}"] if run.device is not None else [])  # resumes carry it
    data_path = [str(path) for path in data] if len(data) > 1 else str(data[0]) if data else None  # >1: a mixture
    recipe = load_recipe(recipe_arg, overrides, data_path=data_path)
    if recipe.kind != kind:
        raise MmtkError(f"{recipe_arg} is a {recipe.kind} recipe; run it with `mmtk {recipe.kind}`")
    if init is not None:
        init = resolve_checkpoint(init, "--init")
    run_dir = _run_dir(recipe_arg, out, resume)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        record_run(run_dir)
    try:
        result = run_training(recipe, run_dir, init=init, resume=resume)
    except TrainingInterrupted as stopped:  # Ctrl-C (exit 130) or SIGTERM (exit 143), after the checkpoint
        if main:
            typer.echo(f"checkpoint written: {stopped.checkpoint} (step {stopped.step} of {stopped.stop})", err=True)
            typer.echo(f"stopped at step {stopped.step}; resume with: "
                       f"{_resume_command(kind, recipe_arg, data, run_dir, overrides)}", err=True)
        raise typer.Exit(128 + stopped.signum)
    except KeyboardInterrupt as err:  # the second Ctrl-C or SIGTERM: stopped at once, mid-step
        if main:
            newest = run_checkpoint(run_dir)
            typer.echo("stopped at once; " + (f"the newest checkpoint is {newest}; resume with: "
                       f"{_resume_command(kind, recipe_arg, data, run_dir, overrides)}" if newest else
                       "no checkpoint was written yet"), err=True)
        raise typer.Exit(128 + getattr(err, "signum", 2))  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        cleanup_distributed()
    if main:
        typer.echo(f"{kind} done: {counted(result.steps, 'step')}; run folder {result.run_dir}; "
                   f"last checkpoint {result.last_checkpoint}")


RECIPE_HELP = "A shipped recipe's name (`mmtk recipes` lists them) or your own YAML file"


@dataclass
class RunFlags:
    """The options `mmtk pretrain` and `mmtk finetune` share, as given."""

    data: Optional[list[Path]] = None
    out: Optional[Path] = None
    set_: list[str] = field(default_factory=list)
    resume: bool = False
    device: Optional[str] = None
    plugin: Optional[list[Path]] = None


RUN_OPTIONS = {
    "data": Annotated[Optional[list[Path]], typer.Option("--data", help="HDF5 file from `mmtk convert` (overrides "
                                                         "data.path); repeat it to train on a mixture "
                                                         "(data.weights).")],
    "out": Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe name>).")],
    "set_": Annotated[list[str], typer.Option("--set", help=SET_HELP)],
    "resume": Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")],
    "device": Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N: the same as --set "
                                                    "train.device=... (default: the recipe's, auto).")],
    "plugin": Annotated[Optional[list[Path]], typer.Option("--plugin", help=PLUGIN_HELP)],
}
run_options = bundled_options("run", RUN_OPTIONS, RunFlags)


@app.command()
@run_options
def pretrain(run: RunFlags, recipe: str = typer.Argument(..., help=f"{RECIPE_HELP}, e.g. tiny or my.yaml.")) -> None:
    """Pretrain a MultiMAE (masked multi-modal autoencoder) as the recipe says. Ctrl-C or SIGTERM saves and
    stops."""
    _train(recipe, "pretrain", run)


@app.command()
@run_options
def finetune(
    run: RunFlags,
    recipe: str = typer.Argument(..., help=f"{RECIPE_HELP}, e.g. tiny_finetune_semseg or my.yaml."),
    init: Optional[Path] = typer.Option(None, "--init", help="Pretrained weights: a run folder of `mmtk pretrain` "
                                        "(its newest checkpoint), a checkpoint file, official MultiMAE or timm ViT."),
) -> None:
    """Finetune a dense head (semantic segmentation or depth) on top of a pretrained encoder. Ctrl-C or SIGTERM
    saves and stops."""
    _train(recipe, "finetune", run, init=init)


@app.command("runs")
def runs() -> None:
    """List your training runs, newest first: when, the newest checkpoint's step, the run folder and the folder
    it was started from (`mmtk eval --run RUN_FOLDER` evaluates one)."""
    import time

    from mmtk.train.run_folders import index_path, list_runs

    found = list_runs()
    if not found:
        typer.echo(f"no runs recorded yet in {index_path()} (`mmtk pretrain` and `mmtk finetune` record theirs)")
        return
    here = Path.cwd().resolve()
    typer.echo(f"{'started':<16}  {'step':>8}  run folder (* = started from this folder)")
    for record in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.started))
        step = "-" if record.step is None else str(record.step)
        origin = " *" if record.cwd == here else f"  (from {record.cwd})"
        typer.echo(f"{when:<16}  {step:>8}  {record.run}{origin}")


def _eval_checkpoint(run: Optional[Path], checkpoint: Optional[Path]) -> Path:
    """The checkpoint eval means: --run's or --checkpoint's, else the newest run trained from this folder."""
    from mmtk.train.run_folders import newest_run_checkpoint, resolve_checkpoint

    if run is not None and checkpoint is not None:
        raise MmtkError("give --run RUN_FOLDER or --checkpoint FILE, not both")
    if run is not None:
        if not run.is_dir():
            raise MmtkError(f"--run {run}: not a folder; pass the run folder `mmtk pretrain`/`finetune --out` wrote")
        return resolve_checkpoint(run, "--run")
    if checkpoint is not None:
        return resolve_checkpoint(checkpoint)
    found, how = newest_run_checkpoint()
    typer.echo(f"checkpoint: {found} ({how}; --run RUN_FOLDER picks another)")
    return found


def _training_data(checkpoint: Path) -> list[Path]:
    """The datasets a run trained on, as its checkpoint records them (one, or each of a mixture's)."""
    from mmtk.weights.files import read_state_dict
    from mmtk.weights.folders import locate_weights

    entry = read_state_dict(locate_weights(checkpoint)[0], mmap=True).get("data")
    recorded = (entry.get("paths") or [entry.get("path")]) if isinstance(entry, dict) else [None]
    if not all(isinstance(path, str) and path for path in recorded):  # official, timm or folder weights
        raise MmtkError(f"{checkpoint} records no data file (it is not from an mmtk run); pass --data FILE.h5")
    for path in map(Path, recorded):
        if not path.exists():  # a file or a shard folder
            relative = " (a relative path, from the folder the run was started in)" if not path.is_absolute() else ""
            raise MmtkError(f"no --data given and the training data {path}{relative} that {checkpoint} records is "
                            f"not there; pass --data FILE.h5")
    typer.echo(f"data: {', '.join(recorded)} (the {'file' if len(recorded) == 1 else 'datasets'} the run trained on)")
    return [Path(path) for path in recorded]


@app.command("eval")
def eval_cmd(
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder of `mmtk pretrain`/`finetune` (its newest "
                                       "checkpoint; default: the newest run trained from this folder)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file, or a run folder "
                                              "(its newest checkpoint)."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="HDF5 file or shard folder; repeat it for one "
                                              "table per dataset (default: what the run trained on)."),
    inputs: list[str] = typer.Option([], "--inputs", help="Input combination, e.g. rgb,depth; repeat for more rows "
                                     "(default: each input alone and all together)."),
    split: str = typer.Option("test", "--split", help="Split of the data file."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N frames."),
    batch_size: int = typer.Option(4, "--batch-size", help="Frames per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    protocol: str = typer.Option("standard", "--protocol", help="Evaluation protocol: standard (full frame at full "
                                 "resolution, depth in the Eigen crop capped at 10 m, pooled over all frames) or "
                                 "multimae (the official MultiMAE evaluation: depth short side to the input size + "
                                 "centre crop, metrics per batch of 96 frames averaged; semseg longest side + pad)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results (and the protocol) to this "
                                            "JSON file."),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions",
                                                    help="Write input | prediction | ground truth PNGs here."),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Evaluate a checkpoint: one row per input combination (what does each sensor buy?)."""
    load_plugins(plugin)
    from rich.console import Console

    from mmtk.evaluation.evaluate import evaluate, load_trained_model, results_json
    from mmtk.runtime import pick_device
    from mmtk.io import atomic_write_text
    from mmtk.progress import counted
    from mmtk.evaluation.protocols import PROTOCOLS, get_protocol

    get_protocol(protocol)  # an unknown name fails before the model is loaded
    checkpoint = _eval_checkpoint(run, checkpoint)
    datasets = data or _training_data(checkpoint)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    results = []
    model = load_trained_model(checkpoint, pick_device(device)) if len(datasets) > 1 else None  # loaded once
    for dataset in datasets:
        try:
            rows, frames = evaluate(checkpoint, dataset, inputs, split=split, limit=limit, batch_size=batch_size,
                                    device=device, protocol=protocol, model=model,  # a picture folder each
                                    save_predictions=save_predictions / Path(dataset).stem
                                    if save_predictions and len(datasets) > 1 else save_predictions)
        except MmtkError as err:
            if len(datasets) == 1:
                raise
            console.print(f"{dataset}: not evaluated: {err}", soft_wrap=True)  # a mixture's dataset without the task
            continue
        _print_tables(console, rows, frames, split, dataset, protocol)
        where = f" of {dataset}" if len(datasets) > 1 else ""
        console.print(f"{counted(frames, 'frame')}{where} evaluated (split '{split}'"
                      f"{', --limit ' + str(limit) if limit else ', full split'}); "
                      f"protocol {protocol}: {PROTOCOLS[protocol].source}", soft_wrap=True)
        results.append(results_json(checkpoint, dataset, split, frames, rows, protocol))
    if not results:
        raise MmtkError(f"none of the {len(datasets)} datasets could be evaluated (the reasons are above)")
    if json_out:  # strict JSON: NaN is null; several datasets: a list of their results
        atomic_write_text(json_out, results[0] if len(datasets) == 1 else "[" + ",\n".join(results) + "]\n")


def _print_tables(console, rows: list, frames: int, split: str, data: Path, protocol: str) -> None:
    """One table per task of one dataset's rows, with each row's note under it; the task's family gives the title,
    the columns (headers with units) and how each value prints."""
    from rich.table import Table

    from mmtk.modality import get_modality
    from mmtk.progress import counted

    for task in dict.fromkeys(r.task for r in rows):
        family = get_modality(task).family()
        task_rows = [r for r in rows if r.task == task]
        rescaled = any(row.rescaled for row in task_rows)
        table = Table(title=f"{family.table_title(rescaled)}: {counted(frames, 'frame')} of split '{split}' of {data}, "
                            f"protocol {protocol}")
        table.add_column("inputs")
        for column in family.columns:
            table.add_column(family.header(column, rescaled), justify="right")
        table.add_column("pixels", justify="right")
        for row in task_rows:
            cells = [column.format(row.metrics[column.key]) for column in family.columns] if row.metrics \
                else ["-"] * len(family.columns)
            table.add_row(",".join(row.inputs), *cells, str(row.metrics.get("pixels", "-")))
        console.print(table)
        if family.footnote(rescaled):
            console.print(family.footnote(rescaled), soft_wrap=True)
        for row in task_rows:
            if row.note:
                console.print(f"  {','.join(row.inputs)} -> {task}: {row.note}", soft_wrap=True)
