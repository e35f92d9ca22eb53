"""Checkpoint formats: mmtk, the official MultiMAE layout, and timm/MAE ViT weights.

In the spirit of timm's `checkpoint_filter_fn`: a foreign state dict is renamed into mmtk's
parameter names, positional embeddings are resized to the model's grid, and every key that could
not be used is reported. Loading never executes code from the file (`weights_only=True`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mmtk.errors import MmtkError
from mmtk.layers import resize_pos_embed

# (official regex, mmtk template), applied in order; the first match wins.
_OFFICIAL_TO_MMTK = [
    (r"^global_tokens$", r"encoder.global_tokens"),
    (r"^input_adapters\.(.+)$", r"encoder.tokenizers.\1"),
    (r"^encoder\.(\d+)\.(.+)$", r"encoder.blocks.\1.\2"),
    # Pretraining decoders
    (r"^output_adapters\.(\w+)\.decoder\.(.+)$", r"decoders.\1.cross_attn.\2"),
    (r"^output_adapters\.(\w+)\.decoder_transformer\.(.+)$", r"decoders.\1.blocks.\2"),
    (r"^output_adapters\.(\w+)\.(mask_token|pos_emb|task_embeddings\..+|proj_context\..+|query_norm\..+|"
     r"context_norm\..+|out_norm\..+|mlp\..+|out_proj\..+)$", r"decoders.\1.\2"),
    # DPT head
    (r"^output_adapters\.\w+\.act_(\d)_postprocess\.(.+)$", "head.reassemble.{0}.\\2"),
    (r"^output_adapters\.\w+\.scratch\.layer(\d)_rn\.(.+)$", "head.project.{0}.\\2"),
    (r"^output_adapters\.\w+\.scratch\.refinenet(\d)\.resConfUnit(\d)\.(.+)$", "head.fusion.{0}.res\\2.\\3"),
    (r"^output_adapters\.\w+\.scratch\.refinenet(\d)\.out_conv\.(.+)$", "head.fusion.{0}.out_conv.\\2"),
    (r"^output_adapters\.\w+\.head\.(.+)$", r"head.output.\1"),
    # ConvNeXt head
    (r"^output_adapters\.\w+\.(blocks\..+|final_layer\..+|proj_dec\..+)$", r"head.\1"),
]
# Official names that are a second registration of a tensor listed under another name (DPT).
_OFFICIAL_ALIASES = [
    (r"^(output_adapters\.\w+)\.act_postprocess\.(\d)\.(.+)$", "{prefix}.act_{n}_postprocess.{rest}"),
    (r"^(output_adapters\.\w+)\.scratch\.layer_rn\.(\d)\.(.+)$", "{prefix}.scratch.layer{n}_rn.{rest}"),
]


@dataclass
class LoadReport:
    """What happened to each key when weights were loaded into a model."""

    format: str
    unused: list[str] = field(default_factory=list)  # in the file, not used (name or shape unknown)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (left as initialised)
    resized: list[str] = field(default_factory=list)  # positional embeddings resized to the model's grid

    def summary(self) -> str:
        parts = [f"format {self.format}"]
        if self.unused:
            parts.append(f"{len(self.unused)} unused: {', '.join(self.unused[:8])}{' ...' if len(self.unused) > 8 else ''}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing[:8])}{' ...' if len(self.missing) > 8 else ''}")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        return "; ".join(parts)


def _official_name_to_mmtk(name: str) -> str | None:
    for pattern, template in _OFFICIAL_TO_MMTK:
        match = re.match(pattern, name)
        if match:
            if "{0}" in template:  # official 1-based DPT level -> 0-based index
                return match.expand(template.replace("{0}", str(int(match.group(1)) - 1)))
            return match.expand(template)
    return None


def _alias_target(name: str) -> str | None:
    for pattern, template in _OFFICIAL_ALIASES:
        match = re.match(pattern, name)
        if match:
            return template.format(prefix=match.group(1), n=int(match.group(2)) + 1, rest=match.group(3))
    return None


def official_to_mmtk(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an official MultiMAE state dict; returns (renamed, names that have no mmtk meaning)."""
    renamed, unknown = {}, []
    for name, tensor in state.items():
        alias_of = _alias_target(name)
        if alias_of is not None and alias_of in state and torch.equal(state[alias_of], tensor):
            continue  # the same tensor under its second name
        new = _official_name_to_mmtk(name)
        if new is None:
            unknown.append(name)
        else:
            renamed[new] = tensor
    return renamed, unknown


def mmtk_to_official(state: dict[str, Tensor], task: str | None = None) -> dict[str, Tensor]:
    """Rename an mmtk state dict into the official layout (aliases of DPT heads included).

    `task` names the output adapter of a finetuning head (e.g. "semseg", "depth").
    """
    inverse = {}
    for name, tensor in state.items():
        official = _mmtk_name_to_official(name, task)
        if official is None:
            raise MmtkError(f"parameter '{name}' has no counterpart in the official MultiMAE layout")
        inverse[official] = tensor
        alias = _official_alias_of(official)
        if alias is not None:
            inverse[alias] = tensor
    return inverse


def _mmtk_name_to_official(name: str, task: str | None) -> str | None:
    rules = [
        (r"^encoder\.global_tokens$", "global_tokens"),
        (r"^encoder\.tokenizers\.(.+)$", r"input_adapters.\1"),
        (r"^encoder\.blocks\.(\d+)\.(.+)$", r"encoder.\1.\2"),
        (r"^decoders\.(\w+)\.cross_attn\.(.+)$", r"output_adapters.\1.decoder.\2"),
        (r"^decoders\.(\w+)\.blocks\.(.+)$", r"output_adapters.\1.decoder_transformer.\2"),
        (r"^decoders\.(\w+)\.(.+)$", r"output_adapters.\1.\2"),
    ]
    for pattern, template in rules:
        match = re.match(pattern, name)
        if match:
            return match.expand(template)
    if name.startswith("head.") and task is None:
        raise MmtkError("the official layout names a finetuning head by its task; give it (semseg or depth; `mmtk weights --task`)")
    prefix = f"output_adapters.{task}"
    head_rules = [
        (r"^head\.reassemble\.(\d)\.(.+)$", lambda m: f"{prefix}.act_{int(m[1]) + 1}_postprocess.{m[2]}"),
        (r"^head\.project\.(\d)\.(.+)$", lambda m: f"{prefix}.scratch.layer{int(m[1]) + 1}_rn.{m[2]}"),
        (r"^head\.fusion\.(\d)\.res(\d)\.(.+)$",
         lambda m: f"{prefix}.scratch.refinenet{int(m[1]) + 1}.resConfUnit{m[2]}.{m[3]}"),
        (r"^head\.fusion\.(\d)\.out_conv\.(.+)$", lambda m: f"{prefix}.scratch.refinenet{int(m[1]) + 1}.out_conv.{m[2]}"),
        (r"^head\.output\.(.+)$", lambda m: f"{prefix}.head.{m[1]}"),
        (r"^head\.(.+)$", lambda m: f"{prefix}.{m[1]}"),
    ]
    for pattern, build in head_rules:
        match = re.match(pattern, name)
        if match:
            return build(match)
    return None


def _official_alias_of(official: str) -> str | None:
    match = re.match(r"^(output_adapters\.\w+)\.act_(\d)_postprocess\.(.+)$", official)
    if match:
        return f"{match[1]}.act_postprocess.{int(match[2]) - 1}.{match[3]}"
    match = re.match(r"^(output_adapters\.\w+)\.scratch\.layer(\d)_rn\.(.+)$", official)
    if match:
        return f"{match[1]}.scratch.layer_rn.{int(match[2]) - 1}.{match[3]}"
    return None


def timm_to_mmtk(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename timm/MAE ViT weights (encoder only) into mmtk names; the class token becomes the global token."""
    renamed, unknown = {}, []
    for name, tensor in state.items():
        if name == "cls_token":
            renamed["encoder.global_tokens"] = tensor
        elif name == "pos_embed":
            renamed["encoder.tokenizers.rgb.pos_emb"] = _timm_pos_embed_to_map(tensor)
        elif name.startswith("patch_embed.proj."):
            renamed["encoder.tokenizers.rgb.proj." + name.split(".")[-1]] = tensor
        elif name.startswith("blocks."):
            renamed["encoder." + name] = tensor
        else:
            unknown.append(name)  # final norm, classifier head, ...
    return renamed, unknown


def _timm_pos_embed_to_map(pos: Tensor) -> Tensor:
    """[1, 1 + h*w, D] (class position first) -> [1, D, h, w]."""
    tokens = pos[:, 1:] if int(pos.shape[1] ** 0.5) ** 2 != pos.shape[1] else pos
    side = int(tokens.shape[1] ** 0.5)
    return tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).contiguous()


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint file safely (`weights_only=True`), with a clear error when it is not one.

    ``mmap`` maps the tensors instead of reading them: cheap when only the plain values are wanted."""
    path = Path(path)
    if not path.is_file():
        raise MmtkError(f"checkpoint '{path}' does not exist; check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # corrupt, truncated, or pickled code objects
        raise MmtkError(f"cannot read checkpoint '{path}' ({type(err).__name__}): it is corrupt, truncated "
                        "or not a plain-weights PyTorch file") from None


def detect_format(state: dict[str, Tensor]) -> str:
    """'mmtk', 'official' (MultiMAE) or 'timm' (ViT/MAE), from the parameter names."""
    names = set(state)
    if any(n.startswith(("encoder.tokenizers.", "encoder.blocks.")) for n in names):
        return "mmtk"
    if "global_tokens" in names or any(n.startswith(("input_adapters.", "output_adapters.")) for n in names):
        return "official"
    if "patch_embed.proj.weight" in names or any(n.startswith("blocks.") for n in names):
        return "timm"
    raise MmtkError("checkpoint holds no known parameter layout (mmtk, official MultiMAE or timm ViT)")


def unwrap(checkpoint: dict) -> dict[str, Tensor]:
    """The state dict inside a checkpoint container ({'model': ...}, {'state_dict': ...} or bare)."""
    for key in ("model", "state_dict", "model_state"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def to_mmtk_names(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str]:
    """(state dict in mmtk names, names that could not be mapped, detected format)."""
    fmt = detect_format(state)
    if fmt == "official":
        renamed, unknown = official_to_mmtk(state)
    elif fmt == "timm":
        renamed, unknown = timm_to_mmtk(state)
    else:
        renamed, unknown = dict(state), []
    return renamed, unknown, fmt


def load_weights(model: nn.Module, source: str | Path | dict) -> LoadReport:
    """Load weights of any supported format into `model`; report unused, missing and resized keys."""
    checkpoint = read_state_dict(source) if not isinstance(source, dict) else source
    state, unknown, fmt = to_mmtk_names(unwrap(checkpoint))
    report = LoadReport(fmt, unused=list(unknown))
    own = model.state_dict()
    usable = {}
    for name, tensor in state.items():
        if name not in own:
            report.unused.append(name)
            continue
        if tensor.shape != own[name].shape and name.endswith("pos_emb") and tensor.dim() == 4:
            owner = model.get_submodule(name.rsplit(".", 1)[0])  # resized as the model itself would at run time
            tensor = resize_pos_embed(tensor.float(), tuple(own[name].shape[-2:]), owner.pos_mode)
            report.resized.append(name)
        if tensor.shape != own[name].shape:
            report.unused.append(f"{name} (shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)})")
            continue
        usable[name] = tensor
    model.load_state_dict(usable, strict=False)
    report.missing = [name for name in own if name not in usable]
    return report


def export_official(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights in the official MultiMAE layout (save as {'model': ...})."""
    task = getattr(getattr(model, "config", None), "task", None)
    return mmtk_to_official(model.state_dict(), task)
