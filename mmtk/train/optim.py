"""AdamW with weight-decay groups and layer-wise lr decay, and its lr schedule per optimizer step."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from mmtk.train.schedules import LrSchedule
from mmtk.train.settings import OptimSettings

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
class Optimization:
    """A run's optimizer, its per-step lr scheduler and the number of optimizer steps the schedule spans."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int


def build_optimizer(model: nn.Module, optim: OptimSettings, steps_per_epoch: int) -> Optimization:
    """AdamW over ``model``'s groups and ``optim.schedule`` stepped per optimizer step (``steps_per_epoch`` of them
    an epoch)."""
    total_steps = max(1, math.ceil(optim.epochs * steps_per_epoch))
    groups = param_groups(model, optim.lr, optim.weight_decay, optim.layer_decay, optim.weight_decay_on)
    for group in groups:
        group.pop("names")
    # fused: one kernel for all parameters (on a CPU about 3x faster than the default per-parameter loop)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    schedule = LrSchedule(optim.schedule, round(optim.warmup_epochs * steps_per_epoch), total_steps,
                          optim.min_lr / optim.lr if optim.lr > 0 else 0.0)
    return Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), total_steps)
