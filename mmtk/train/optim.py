"""AdamW with weight-decay groups and layer-wise lr decay; linear warm-up then cosine per optimizer step."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from mmtk.config import Recipe

BLOCK_PARAM = re.compile(r"encoder\.blocks\.(\d+)\.")  # a parameter of encoder block N


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 tokenizers/global tokens, i+1 block i, top the rest."""
    if name.startswith(("encoder.tokenizers.", "encoder.global_tokens", "encoder.pos_emb")):
        return 0
    match = BLOCK_PARAM.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def count_blocks(model: nn.Module) -> int:
    """Number of encoder blocks (``encoder.blocks.N``) among the parameter names; 0 when there are none."""
    ids = {int(m.group(1)) for n, _ in model.named_parameters() if (m := BLOCK_PARAM.match(n))}
    return max(ids) + 1 if ids else 0


# Parameters never decayed by name (the last part of the dotted name), as the official MultiMAE's
# ``no_weight_decay()`` lists them for its models: the global tokens, position embeddings (when learned) and
# decoder mask tokens.
NO_DECAY_NAMES = frozenset({"global_tokens", "pos_emb", "mask_token"})

# optim.weight_decay_on: which parameters AdamW decays.
#   weights: every weight of >= 2 dims except NO_DECAY_NAMES; never biases or 1-D parameters (norms). The
#            official finetuning's rule (utils/optim_factory.py get_parameter_groups with the model's
#            no_weight_decay list); input projections and class embeddings are decayed.
#   all:     every parameter (the official pretraining hands AdamW the model without groups).
#   weights-except-tokens: mmtk 0.1.0 before this rule (also skips every name containing "token", so the tokenizers'
#            projections and the class embedding); only so that runs started then resume as they began.


def decays(name: str, param: torch.Tensor, rule: str = "weights") -> bool:
    """Whether AdamW decays the parameter ``name`` under ``rule`` (a value of ``OptimConfig.weight_decay_on``)."""
    if rule == "all":
        return True
    if param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
        return False
    return rule == "weights" or not ("token" in name or "pos_emb" in name)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 rule: str = "weights") -> list[dict]:
    """AdamW groups: (decay / no decay) x layer, each with its own ``lr`` (layer-wise decay) and ``weight_decay``.

    ``rule`` says which parameters decay (:func:`decays`)."""
    num_blocks = count_blocks(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_blocks)
        decay = decays(name, param, rule)
        scale = layer_decay ** (num_blocks + 1 - lid)
        group = groups.setdefault((lid, decay), {
            "params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


@dataclass
class WarmupCosine:
    """lr multiplier at optimizer step s: linear warm-up to 1, then cosine down to ``min_ratio``."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, recipe: Recipe, total_steps: int,
                    warmup_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + per-step warm-up/cosine LambdaLR for ``model`` as the recipe says."""
    optim = recipe.optim
    lr = optim.lr * optim.batch_size / 256 if optim.scale_lr else optim.lr
    groups = param_groups(model, lr, optim.weight_decay, optim.layer_decay, optim.weight_decay_on)
    for group in groups:
        group.pop("names")
    # fused: one kernel for all parameters (on a CPU about 3x faster than the default per-parameter loop)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    schedule = WarmupCosine(warmup_steps, total_steps, optim.min_lr / lr if lr > 0 else 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
