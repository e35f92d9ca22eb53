"""timm ViT weights (ViT, DeiT, MAE's encoder; `.pth` or safetensors) read into mmtk's encoder."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from mmtk.errors import MmtkError
from mmtk.weights.foreign import FOREIGN_MODALITIES, Renamed, WeightFormat

# timm ViT parameters that act after the last block (final norm, pooling norm, classifiers) or belong to
# MAE's pretraining decoder: not part of the encoder mmtk rebuilds, reported as unused.
_TIMM_AFTER_BLOCKS = ("norm.", "fc_norm.", "head.", "head_dist.", "pre_logits.", "attn_pool.", "decoder_",
                      "mask_token")
# Prefix tokens in the order timm puts them before the patch tokens (VisionTransformer, DeiT distilled).
_TIMM_PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def timm_to_mmtk(state: dict[str, Tensor]) -> Renamed:
    """Rename timm/MAE ViT weights (encoder only) into mmtk names, with the unused names and notes.

    timm's prefix tokens (class token, DeiT's distillation token, register tokens) become mmtk's global
    tokens, each with its own positional embedding added when the file has one (``pos_embed`` then holds
    one row per prefix token before the patch grid), so mmtk's encoder computes what timm's blocks compute.
    A class-token-free ViT has no global token. Parameters that change the blocks' function and have no
    mmtk counterpart (layer scale, a norm before the blocks, q/k norms) are refused.
    """
    if "pos_embed" not in state:
        raise MmtkError("timm ViT without an absolute positional embedding (pos_embed): mmtk's encoder adds one "
                        "per patch and cannot reproduce this model")
    renamed, unused, notes = {}, [], []
    prefix = [name for name in _TIMM_PREFIX_TOKENS if name in state]
    tokens = torch.cat([state[name] for name in prefix], dim=1) if prefix else state["pos_embed"][:, :0]
    pos = state["pos_embed"]
    count = tokens.shape[1]
    if count and _is_square(pos.shape[1] - count):  # rows for the prefix tokens, then the patch grid
        tokens, pos = tokens + pos[:, :count], pos[:, count:]
        if "dist_token" in state:
            notes.append("DeiT distillation token kept as a second global token (with its position)")
    elif not _is_square(pos.shape[1]):
        raise MmtkError(f"timm pos_embed has {pos.shape[1]} positions for {count} prefix token(s): not a square "
                        "patch grid; mmtk cannot place these positions")
    if not count:
        notes.append("class-token-free ViT: no global token")
    renamed["encoder.global_tokens"] = tokens
    image = FOREIGN_MODALITIES["vit_image"]
    renamed[f"encoder.tokenizers.{image}.pos_emb"] = _timm_pos_embed_to_map(pos)
    for name, tensor in state.items():
        if name in prefix or name == "pos_embed":
            continue
        if name.startswith("patch_embed.proj."):
            renamed[f"encoder.tokenizers.{image}.proj." + name.split(".")[-1]] = tensor
        elif re.match(r"^blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12])\.(weight|bias)$", name):
            renamed["encoder." + name] = tensor
        elif name.startswith(_TIMM_AFTER_BLOCKS):
            unused.append(name)
        else:
            raise MmtkError(f"timm parameter '{name}' has no counterpart in mmtk's encoder (it would compute "
                            "another function); only plain ViT blocks load (no layer scale, pre-norm or q/k norm)")
    return Renamed(renamed, unused, notes)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _timm_pos_embed_to_map(pos: Tensor) -> Tensor:
    """[1, h*w, D] patch positions (square grid) -> [1, D, h, w]."""
    side = math.isqrt(pos.shape[1])
    return pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).contiguous()


def is_timm(state: dict[str, Tensor]) -> bool:
    """Whether the names are a timm ViT's (a patch embedding, blocks at the top level)."""
    return "patch_embed.proj.weight" in state or any(n.startswith("blocks.") for n in state)


TIMM = WeightFormat("timm", "timm ViT", is_timm, timm_to_mmtk)
