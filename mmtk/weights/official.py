"""The official MultiMAE layout (pretraining files, ConvNeXt and DPT finetuning heads): read and written.

Facts of the layout only (parameter names as the released files hold them); no code of the official repository.
The DPT head registers some tensors twice under two names: both are written, one is read.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from mmtk.errors import MmtkError
from mmtk.weights.foreign import Renamed, WeightFormat

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


def official_to_mmtk(state: dict[str, Tensor]) -> Renamed:
    """Rename an official MultiMAE state dict: mmtk names, the names that have none, a finetuning head's task."""
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
    return Renamed(renamed, unknown, task=official_task(state))


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
        raise MmtkError("the official layout names a finetuning head by its task; give it (semseg or depth; "
                       "`mmtk weights --set task=...`)")
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


def official_task(state: dict[str, Tensor]) -> str | None:
    """The task of an official finetuning head (its output adapter's name), or None for pretraining files."""
    for name in state:
        match = re.match(r"^output_adapters\.(\w+)\.(proj_dec|final_layer|scratch|act_\d_postprocess|head)\.", name)
        if match:
            return match[1]
    return None


def export_official(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights in the official MultiMAE layout (save as {'model': ...})."""
    task = getattr(getattr(model, "config", None), "task", None)
    return mmtk_to_official(model.state_dict(), task)


def is_official(state: dict[str, Tensor]) -> bool:
    """Whether the names are the official layout's (global tokens, input and output adapters)."""
    return "global_tokens" in state or any(n.startswith(("input_adapters.", "output_adapters.")) for n in state)


OFFICIAL = WeightFormat("official", "official MultiMAE", is_official, official_to_mmtk)
