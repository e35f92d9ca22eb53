"""`mmtk models` (the registry) and `mmtk weights` (inspect and convert checkpoint files)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from mmtk.cli.app import PLUGIN_HELP, app, load_plugins

if TYPE_CHECKING:
    from mmtk.model.multimae import ModelConfig


@app.command("models")
def models() -> None:
    """List the model sizes `create_model` knows, with their parameter counts."""
    from rich.console import Console
    from rich.table import Table

    from mmtk.model.sizes import NAMED_MODELS, PAPER_CLASSES, PARAMETERS

    pretraining = "; ".join(dict.fromkeys(f"{', '.join(sizes['inputs'])} in; {', '.join(sizes['outputs'])} out"
                                          for sizes in NAMED_MODELS.values()))  # as declared
    table = Table(title=f"mmtk models (pretraining: {pretraining}; {PAPER_CLASSES} classes)")
    for column in ("name", "width", "blocks", "heads", "parameters (millions)"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name, sizes in NAMED_MODELS.items():
        table.add_row(name, str(sizes["dim"]), str(sizes["depth"]), str(sizes["num_heads"]),
                      f"{PARAMETERS[name] / 1e6:.1f}")
    Console().print(table)


def _has_classes(config: ModelConfig) -> bool:
    """Whether a modality of the model is a label map (its class count then matters)."""
    from mmtk.modality import get_modality

    names = {*config.inputs, *config.outputs, *([config.task] if config.task else [])}
    return any(get_modality(name).ignore_index is not None for name in names)


WEIGHTS_HELP = {
    "checkpoint": "Weights: an mmtk checkpoint or run folder (its newest checkpoint), an official MultiMAE checkpoint, "
                  "timm/DeiT/MAE ViT weights (PyTorch or safetensors, any file name), a model folder or a "
                  "huggingface_hub cache folder.",
    "to": "Write a model folder: config.json (the model) + model.safetensors (mmtk names), which every command "
          "accepts.",
    "to_official": "Write the weights in the official MultiMAE layout ({'model': state_dict}; safetensors when the "
                   "name ends in .safetensors).",
    "set": "Record what the file cannot say, e.g. --set num_heads=4 (any model option that changes no tensor; "
           "repeatable).",
}


@app.command("weights")
def weights(
    checkpoint: Path = typer.Argument(..., help=WEIGHTS_HELP["checkpoint"]),
    to: Optional[Path] = typer.Option(None, "--to", help=WEIGHTS_HELP["to"]),
    to_official: Optional[Path] = typer.Option(None, "--to-official", help=WEIGHTS_HELP["to_official"]),
    set_: list[str] = typer.Option([], "--set", help=WEIGHTS_HELP["set"]),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Say what model a weights file holds, and convert it (model folder, official layout)."""
    from dataclasses import asdict

    from mmtk.config import parse_override
    from mmtk.train.checkpoint import save_checkpoint
    from mmtk.errors import MmtkError
    from mmtk.weights.files import write_safetensors
    from mmtk.weights.folders import write_model_folder
    from mmtk.weights.official import mmtk_to_official
    from mmtk.registry import describe_weights
    from mmtk.model.sizes import reported_name

    load_plugins(plugin)
    overrides = {}
    for text in set_:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise MmtkError(f"--set {text!r}: a model option, e.g. --set num_heads=4")
        overrides[keys[0]] = value
    found, config, state, notes = describe_weights(checkpoint, **overrides)
    count = sum(t.numel() for t in state.values())
    name = reported_name(found.model_name, config)
    typer.echo(f"{checkpoint}: format {found.format}, {len(state)} tensors, {count / 1e6:.2f} million values")
    typer.echo(f"  model: {name}, width {config.dim}, {config.depth} blocks, {config.num_heads} attention heads, patch "
               f"{config.patch_size} px, image {config.image_size[0]}x{config.image_size[1]} px, inputs "
               f"{','.join(config.inputs)}, " + (f"{config.head} head -> {config.task}" if config.head else
                                                 f"outputs {','.join(config.outputs) or 'none (encoder only)'}")
               + (f", {config.num_classes} classes" if _has_classes(config) else ""))
    for note in found.notes + notes:
        typer.echo(f"  {note}")
    if found.unused:
        typer.echo(f"  {len(found.unused)} tensors not part of the model: {', '.join(found.unused[:10])}"
                   f"{' ...' if len(found.unused) > 10 else ''}")
    if to is not None:
        write_model_folder(state, to, found.model_name or name, asdict(config))  # the name it was built from
        typer.echo(f"wrote {to}/config.json and {to}/model.safetensors ({len(state)} tensors, mmtk names)")
    if to_official is not None:
        official = mmtk_to_official(state, config.task)
        if to_official.suffix == ".safetensors":
            write_safetensors(official, to_official)
        else:
            save_checkpoint({"model": official}, to_official)
        typer.echo(f"wrote {to_official} ({len(official)} tensors in the official MultiMAE layout)")
