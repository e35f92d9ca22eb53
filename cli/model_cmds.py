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
                                       "official names; read from the checkpoint's config when stored."),
) -> None:
    """Say what a checkpoint holds (format, tensors, parameters) and convert it to the official layout."""
    import os
    import tempfile

    import torch

    from mmtk.formats import mmtk_to_official, read_state_dict, to_mmtk_names, unwrap

    container = read_state_dict(checkpoint)
    state, unknown, fmt = to_mmtk_names(unwrap(container))
    count = sum(t.numel() for t in state.values())
    typer.echo(f"{checkpoint}: format {fmt}, {len(state)} tensors, {count / 1e6:.2f} million values")
    if unknown:
        typer.echo(f"  {len(unknown)} tensors have no mmtk meaning: {', '.join(unknown[:10])}")
    if to_official is None:
        return
    config = container.get("config") if isinstance(container.get("config"), dict) else {}
    model_config = config.get("model", config) if isinstance(config, dict) else {}
    official = mmtk_to_official(state, task or model_config.get("task"))
    fd, tmp = tempfile.mkstemp(dir=to_official.parent if str(to_official.parent) else ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": official}, tmp)
        os.replace(tmp, to_official)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    typer.echo(f"wrote {to_official} ({len(official)} tensors in the official MultiMAE layout)")
