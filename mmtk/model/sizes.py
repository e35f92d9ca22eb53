"""The named models as declared data: their sizes, the modalities they are pretrained on and their parameter
counts. Plain values, no torch: `mmtk models` prints them in a fraction of a second (:mod:`mmtk.registry` builds
the models; tests/test_newcomer.py checks these counts against them)."""

from __future__ import annotations

from typing import Any

# The modalities of MultiMAE (Bachmann et al., ECCV 2022; official cfg multimae-b_98_rgb+-depth-semseg_1600e):
# in_domains rgb-depth-semseg, out_domains the same plus extra_norm_pix_loss (norm_rgb); the finetuning heads
# read the RGB tokens (decoder_main_tasks rgb).
PAPER_MODALITIES: dict[str, tuple[str, ...]] = dict(
    inputs=("rgb", "depth", "semseg"), outputs=("rgb", "norm_rgb", "depth", "semseg"), main_inputs=("rgb",))
PAPER_CLASSES = 40  # NYUv2's 40 classes: the semseg class count the named models are built with (ModelConfig's)
# The named models: a ViT size (DeiT/ViT naming) and the modalities it is pretrained on. MultiMAE-B is
# "multimae-base"; the model code itself names no modality. A model of other sizes is not one of these names.
NAMED_MODELS: dict[str, dict[str, Any]] = {
    "multimae-tiny": dict(dim=192, depth=12, num_heads=3, **PAPER_MODALITIES),
    "multimae-small": dict(dim=384, depth=12, num_heads=6, **PAPER_MODALITIES),
    "multimae-base": dict(dim=768, depth=12, num_heads=12, **PAPER_MODALITIES),
    "multimae-large": dict(dim=1024, depth=24, num_heads=16, **PAPER_MODALITIES),
}
SIZE_KEYS = ("dim", "depth", "num_heads")  # what tells the sizes apart
# Trainable parameters of `create_model(name)` (its decoders and adapters included).
PARAMETERS = {"multimae-tiny": 16_040_832, "multimae-small": 32_586_624, "multimae-base": 97_528_704,
              "multimae-large": 315_571_072}
SIZE_WORDS = {"dim": "width {}", "depth": "{} blocks", "num_heads": "{} heads"}


def size_name(config: Any) -> str | None:
    """The named size with this width, depth (and heads, when given), or None."""
    values = config if isinstance(config, dict) else vars(config)
    for name, declared in NAMED_MODELS.items():
        if all(values.get(key, declared[key]) == declared[key] for key in SIZE_KEYS):
            return name
    return None


def reported_name(recorded: str | None, config: Any) -> str:
    """The name to show for a model built as ``recorded`` (a named model, or None) with ``config``'s sizes: the
    name itself only when the sizes are its own, so one name always means one model; otherwise the named size
    the sizes match, or ``custom (multimae-tiny with 4 blocks)``."""
    values = config if isinstance(config, dict) else vars(config)
    declared = NAMED_MODELS.get(recorded or "")
    if declared is not None and all(values.get(key, declared[key]) == declared[key] for key in SIZE_KEYS):
        return str(recorded)
    match = size_name(values)
    if match is not None:
        return match
    if declared is None:
        return "custom"
    changed = ", ".join(SIZE_WORDS[key].format(values[key]) for key in SIZE_KEYS
                        if values.get(key, declared[key]) != declared[key])
    return f"custom ({recorded} with {changed})"
