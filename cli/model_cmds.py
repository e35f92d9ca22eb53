"""`mmtk models` (the registry) and `mmtk weights` (inspect and convert checkpoint files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.main import app


@app.command("models")
def models() -> None:
    """List the model sizes `create_model` knows, with their parameter counts."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import mmtk

    table = Table(title="mmtk models (pretraining: rgb, depth, semseg in; rgb, norm_rgb, depth, semseg out; 40 classes)")
    for column in ("name", "width", "blocks", "heads", "parameters (millions)"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name in mmtk.list_models():
        config = mmtk.model_config(name)
        with torch.device("meta"):  # shapes only: no memory, no init
            model = mmtk.build_model(config)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        table.add_row(name, str(config.dim), str(config.depth), str(config.num_heads), f"{count / 1e6:.1f}")
    Console().print(table)


@app.command("weights")
def weights(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file: mmtk, official MultiMAE or timm ViT."),
    to_official: Optional[Path] = typer.Option(None, "--to-official", help="Write the weights in the official "
                                               "MultiMAE layout ({'model': state_dict}) to this file."),
    task: Optional[str] = typer.Option(None, "--task", help="Task of a finetuning head (semseg, depth) for the "
                                       "official names; read from an mmtk training checkpoint."),
) -> None:
    """Say what a checkpoint holds (format, tensors, parameters) and convert it to the official layout."""
    from mmtk.engine import save_checkpoint
    from mmtk.formats import mmtk_to_official, read_state_dict, to_mmtk_names, unwrap

    container = read_state_dict(checkpoint)
    state, unknown, fmt, _ = to_mmtk_names(unwrap(container))
    count = sum(t.numel() for t in state.values())
    typer.echo(f"{checkpoint}: format {fmt}, {len(state)} tensors, {count / 1e6:.2f} million values")
    if unknown:
        typer.echo(f"  {len(unknown)} tensors have no mmtk meaning: {', '.join(unknown[:10])}")
    if to_official is None:
        return
    model_args = container.get("model_args") if isinstance(container.get("model_args"), dict) else {}
    official = mmtk_to_official(state, task or model_args.get("task"))  # mmtk training checkpoints store it
    save_checkpoint({"model": official}, to_official)
    typer.echo(f"wrote {to_official} ({len(official)} tensors in the official MultiMAE layout)")
