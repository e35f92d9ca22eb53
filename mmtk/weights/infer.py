"""What model a state dict describes (mmtk names), read from its tensors' names and shapes."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from mmtk.errors import MmtkError
from mmtk.weights.foreign import FOREIGN_MODALITIES


def default_hooks(depth: int) -> tuple[int, ...]:
    """DPT's hooked blocks spread evenly over the encoder: (2, 5, 8, 11) of 12 blocks, (5, 11, 17, 23) of 24."""
    step = max(depth // 4, 1)
    return tuple(min(step * (k + 1) - 1, depth - 1) for k in range(4))


def _indices(state: dict[str, Tensor], pattern: str) -> list[str]:
    """Distinct first groups of `pattern` over the names, in file order."""
    found = (re.match(pattern, name) for name in state)
    return list(dict.fromkeys(m[1] for m in found if m))


def infer_config(state: dict[str, Tensor], task: str | None = None, source: str = "checkpoint") -> dict[str, Any]:
    """The ModelConfig fields a state dict (mmtk names) determines, read from its names and shapes.

    Width, depth, MLP ratio, patch size, global tokens, image size (the stored positional grid), inputs,
    class count, decoders (outputs, width, depth), the finetuning head, its task and its sizes. Attention
    heads are not in the shapes (the registry sets them); DPT hooks follow :func:`default_hooks`.
    """
    from mmtk.modality import get_modality

    blocks = _indices(state, r"^encoder\.blocks\.(\d+)\.")
    inputs = _indices(state, r"^encoder\.tokenizers\.(\w+)\.")
    if not blocks or not inputs or "encoder.blocks.0.attn.qkv.weight" not in state:
        raise MmtkError(f"{source} holds no complete ViT encoder (blocks and a patch tokenizer); it is not a "
                        "model checkpoint mmtk can build")
    dim = state["encoder.blocks.0.attn.qkv.weight"].shape[1]
    kernel = state[f"encoder.tokenizers.{inputs[0]}.proj.weight"].shape[-1]
    patch = kernel * get_modality(inputs[0]).stride
    grid = state[f"encoder.tokenizers.{inputs[0]}.pos_emb"].shape[-2:]
    global_tokens = state.get("encoder.global_tokens")
    config: dict[str, Any] = dict(
        dim=dim, depth=max(int(i) for i in blocks) + 1, patch_size=patch,
        mlp_ratio=state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_global_tokens=0 if global_tokens is None else global_tokens.shape[1],
        image_size=(grid[0] * patch, grid[1] * patch), inputs=tuple(inputs))
    classes = FOREIGN_MODALITIES["class_map"]
    if f"encoder.tokenizers.{classes}.class_emb.weight" in state:
        config["num_classes"] = state[f"encoder.tokenizers.{classes}.class_emb.weight"].shape[0]
    outputs = _indices(state, r"^decoders\.(\w+)\.")
    config["outputs"] = tuple(outputs)
    if outputs:
        first = outputs[0]
        config["decoder_dim"] = state[f"decoders.{first}.proj_context.weight"].shape[0]
        config["decoder_depth"] = len(_indices(state, rf"^decoders\.{first}\.blocks\.(\d+)\."))
        if classes in outputs and "num_classes" not in config:
            per_token = (patch // get_modality(classes).stride) ** 2
            config["num_classes"] = state[f"decoders.{classes}.out_proj.weight"].shape[0] // per_token
    config.update(_infer_head(state, dim, config, task, source))
    return config


def _infer_head(state: dict[str, Tensor], dim: int, config: dict[str, Any], task: str | None,
                source: str) -> dict[str, Any]:
    from mmtk.modality import get_modality

    if "head.proj_dec.weight" in state:
        embed, in_dim = state["head.proj_dec.weight"].shape
        depth = len(_indices(state, r"^head\.blocks\.(\d+)\."))
        class_dim = state["head.final_layer.weight"].shape[1]
        out = state["head.final_layer.weight"].shape[0]
        head: dict[str, Any] = dict(head="convnext", task=task or FOREIGN_MODALITIES["convnext_task"],
                                    convnext_dim=embed, convnext_depth=depth, preds_per_patch=embed // class_dim)
    elif "head.reassemble.0.0.weight" in state:
        in_dim = state["head.reassemble.0.0.weight"].shape[1]
        out = state["head.output.4.weight"].shape[0]
        head = dict(head="dpt", task=task or (FOREIGN_MODALITIES["dpt_task"] if out == 1 else None),
                    dpt_dim=state["head.project.0.weight"].shape[0],
                    layer_dims=tuple(state[f"head.reassemble.{i}.0.weight"].shape[0] for i in range(4)),
                    hooks=default_hooks(config["depth"]))
        if head["task"] is None:
            raise MmtkError(f"{source}: a DPT head with {out} output channels; say its task (task=...)")
    else:
        return {"head": None}
    head["main_inputs"] = config["inputs"][: max(in_dim // dim, 1)]
    head["outputs"] = ()
    if get_modality(head["task"]).family().class_labels:  # one output channel per class
        head["num_classes"] = out
    return head
