"""Named model sizes and `create_model`, the one way to build a model."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from mmtk.errors import MmtkError
from mmtk.formats import load_weights
from mmtk.multimae import DenseModel, ModelConfig, MultiMAE

# ViT sizes (DeiT/ViT naming); MultiMAE-B is "multimae-base".
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "multimae-tiny": dict(dim=192, depth=12, num_heads=3),
    "multimae-small": dict(dim=384, depth=12, num_heads=6),
    "multimae-base": dict(dim=768, depth=12, num_heads=12),
    "multimae-large": dict(dim=1024, depth=24, num_heads=16),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODEL_SIZES)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named model with `overrides` applied (any :class:`ModelConfig` field)."""
    if name not in MODEL_SIZES:
        raise MmtkError(f"unknown model '{name}'; choose one of {', '.join(MODEL_SIZES)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MmtkError(f"unknown model option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
    return ModelConfig(**{**MODEL_SIZES[name], **overrides})


def build_model(config: ModelConfig) -> nn.Module:
    """A pretraining MultiMAE, or a DenseModel when the config names a finetuning head."""
    return MultiMAE(config) if config.head is None else DenseModel(config)


def create_model(name: str, pretrained: str | Path | None = None, verbose: bool = True, **overrides: Any) -> nn.Module:
    """Build a model by name, optionally loading weights of any supported checkpoint format.

    Example::

        model = mmtk.create_model("multimae-base", pretrained="multimae-b.pth")
        model = mmtk.create_model("multimae-base", head="convnext", task="semseg", num_classes=40,
                                  inputs=("rgb", "depth"), pretrained="run/checkpoint.pt")

    Args:
        name: one of :func:`list_models`.
        pretrained: an mmtk checkpoint, an official MultiMAE checkpoint or timm/MAE ViT weights.
        verbose: print which keys of the checkpoint were not used or are missing.
        overrides: any :class:`mmtk.multimae.ModelConfig` field.
    """
    model = build_model(model_config(name, **overrides))
    if pretrained is not None:
        report = load_weights(model, pretrained)
        model.load_report = report
        if verbose:
            print(f"loaded {pretrained}: {report.summary()}")
    return model
