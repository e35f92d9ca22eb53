"""Checkpoint formats: mmtk, the official MultiMAE layout, and timm/MAE ViT weights; files and folders.

In the spirit of timm's `checkpoint_filter_fn`: a foreign state dict is renamed into mmtk's
parameter names, positional embeddings are resized to the model's grid, and every key that could
not be used is reported. :func:`read_weights` also reads what model a file describes (recorded in
mmtk checkpoints and folders, else inferred from the tensors' names and shapes). Files are
PyTorch (`weights_only=True`) or safetensors, told apart by their bytes; folders are Hugging Face-style
(config.json + model.safetensors), huggingface_hub cache entries included. Loading never executes code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmtk.errors import CorruptCheckpoint, MmtkError
from mmtk.weights.integrity import verify
from mmtk.io import atomic_path, atomic_write_text
from mmtk.model.layers import resize_pos_embed

# The modalities foreign layouts imply, in one place (mmtk's own files record theirs): a timm/MAE ViT's patch
# embedding reads RGB; the official MultiMAE files hold the class map whose tokenizer embeds classes, and a
# head file that does not name its task is the paper's ConvNeXt semantic segmentation or, with one output
# channel, its DPT depth.
FOREIGN_MODALITIES = {"vit_image": "rgb", "class_map": "semseg", "convnext_task": "semseg", "dpt_task": "depth"}

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
    notes: list[str] = field(default_factory=list)  # how the file was read and what the model takes from it

    def summary(self) -> str:
        parts = [f"format {self.format}"]
        if self.unused:
            parts.append(f"{len(self.unused)} unused: {', '.join(self.unused[:8])}{' ...' if len(self.unused) > 8 else ''}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing[:8])}{' ...' if len(self.missing) > 8 else ''}")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        return "; ".join(parts + self.notes)


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


# timm ViT parameters that act after the last block (final norm, pooling norm, classifiers) or belong to
# MAE's pretraining decoder: not part of the encoder mmtk rebuilds, reported as unused.
_TIMM_AFTER_BLOCKS = ("norm.", "fc_norm.", "head.", "head_dist.", "pre_logits.", "attn_pool.", "decoder_",
                      "mask_token")
# Prefix tokens in the order timm puts them before the patch tokens (VisionTransformer, DeiT distilled).
_TIMM_PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def timm_to_mmtk(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename timm/MAE ViT weights (encoder only) into mmtk names: (renamed, unused names, notes).

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
    return renamed, unused, notes


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _timm_pos_embed_to_map(pos: Tensor) -> Tensor:
    """[1, h*w, D] patch positions (square grid) -> [1, D, h, w]."""
    side = math.isqrt(pos.shape[1])
    return pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).contiguous()


def is_safetensors(path: Path) -> bool:
    """Whether the file's bytes are a safetensors file (8-byte header length, then a JSON header)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint file safely (`weights_only=True`, or safetensors), with a clear error when it is not one.

    The format is told by the bytes, not the name: a safetensors file is read with the `safetensors` library
    under any name; the model description mmtk stores in its metadata comes back as ``model_name`` and
    ``model_args`` beside ``model``. ``mmap`` maps PyTorch tensors instead of reading them (a peek at a few
    entries: the content's SHA-256, which an mmtk checkpoint records, is checked on full reads only)."""
    path = Path(path)
    if not path.is_file():
        raise MmtkError(f"checkpoint '{path}' does not exist; check the path")
    try:
        if is_safetensors(path):
            return _read_safetensors(path, map_location)
        if mmap:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        with open(path, "rb") as handle:  # a handle, so torch.load cannot pick a reader by the file's name
            state = torch.load(handle, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickled code objects
        raise CorruptCheckpoint(f"cannot read checkpoint '{path}' ({type(err).__name__}): it is corrupt, truncated "
                                "or not a plain-weights PyTorch or safetensors file", path) from None
    verify(state, path)
    return state


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(map_location)) as handle:  # one open: metadata and tensors
        metadata = handle.metadata() or {}
        container: dict[str, Any] = {"model": {name: handle.get_tensor(name) for name in handle.keys()}}
    if "mmtk_model_args" in metadata:
        container["model_args"] = json.loads(metadata["mmtk_model_args"])
        container["model_name"] = metadata.get("mmtk_model_name")
    return container


def write_safetensors(state: dict[str, Tensor], path: str | Path, model_name: str | None = None,
                      model_args: dict[str, Any] | None = None) -> Path:
    """Write tensors as safetensors (atomically), with the model description in the metadata when given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if model_args is not None:
        metadata["mmtk_model_args"] = json.dumps(model_args)
        metadata["mmtk_model_name"] = model_name or ""
    # safetensors stores each tensor once: aliases (the official DPT names) are written as copies.
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        key = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# Files and folders: which file holds the weights, and what model they describe

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")  # in a model folder, first found wins
CONFIG_TYPE = "mmtk-multimae"  # config.json "model_type" of folders mmtk writes


def locate_weights(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a file, a model folder or a huggingface_hub cache folder.

    A cache folder is ``models--ORG--NAME`` (its ``refs/main`` snapshot, else its only one) or one of its
    ``snapshots/REV`` folders; nothing is downloaded.
    """
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise MmtkError(f"checkpoint '{path}' does not exist; check the path")
    folder = _hub_snapshot(path) or path
    config = folder / "config.json"
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name, config if config.is_file() else None
    if (folder / "model.safetensors.index.json").is_file():
        raise MmtkError(f"{folder} holds sharded safetensors; mmtk reads one model.safetensors per folder")
    raise MmtkError(f"folder {path} holds no {' or '.join(WEIGHT_FILES)}; give a weights file or a folder "
                    "written by `mmtk weights CKPT --to DIR`")


def _hub_snapshot(path: Path) -> Path | None:
    """The snapshot folder of a huggingface_hub cache entry (models--org--name), or None."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(revisions) != 1:
        raise MmtkError(f"{path}: {len(revisions)} snapshots and no refs/main; give the snapshot folder itself")
    return revisions[0]


def write_model_folder(state: dict[str, Tensor], folder: str | Path, model_name: str, model_args: dict[str, Any]
                       ) -> Path:
    """A Hugging Face-style model folder: config.json (the model description) + model.safetensors (mmtk names).

    The safetensors metadata repeats the description, so the weights file alone still says what model it is.
    Files are written beside their final names and renamed when complete.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MmtkError(f"{folder} is a file; --to takes a folder (created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    architecture = "DenseModel" if model_args.get("head") else "MultiMAE"
    config = {"model_type": CONFIG_TYPE, "architectures": [architecture], "model_name": model_name,
              "model_args": model_args}
    write_safetensors(state, folder / "model.safetensors", model_name, model_args)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    return folder


@dataclass
class Weights:
    """A weights file understood: its tensors in mmtk names and the model they determine."""

    source: str
    format: str  # "mmtk", "official" (MultiMAE) or "timm" (ViT, DeiT, MAE)
    state: dict[str, Tensor]  # mmtk names
    unused: list[str]  # file names with no mmtk meaning (classifier, final norm, MAE decoder, ...)
    config: dict[str, Any]  # ModelConfig fields the file determines
    recorded: frozenset[str]  # the fields the file states (the others are read from tensor shapes)
    model_name: str | None = None  # the mmtk size name the file records
    notes: list[str] = field(default_factory=list)
    container: dict[str, Any] = field(default_factory=dict)  # the rest of a training checkpoint (kind, data, ...)


def read_weights(source: str | Path | dict | Weights) -> Weights:
    """Read any supported weights file, folder or loaded checkpoint dict, and infer the model it describes."""
    if isinstance(source, Weights):
        return source
    config_json: dict[str, Any] = {}
    if isinstance(source, dict):
        name, container = "<state dict>", source
    else:
        path, config_path = locate_weights(source)
        name, container = str(source), read_state_dict(path)
        if config_path is not None:
            config_json = _read_config_json(config_path)
    _require_recorded_modalities(container, name)
    raw = unwrap(container)
    state, unused, fmt, notes = to_mmtk_names(raw)
    recorded: dict[str, Any] = {}
    if isinstance(container.get("model_args"), dict):
        recorded = dict(container["model_args"])
    if config_json.get("model_type") == CONFIG_TYPE:
        recorded = dict(config_json.get("model_args", {}))
    recorded = {k: v for k, v in recorded.items() if k in _config_fields()}
    model_name = config_json.get("model_name") or container.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise MmtkError(f"{name}: its model_name is not a string ({type(model_name).__name__}); the checkpoint is "
                        "corrupt or forged")
    try:
        inferred = infer_config(state, official_task(raw) if fmt == "official" else None, name)
    except MmtkError:
        raise
    except Exception as err:  # shapes from a file: a tensor of the wrong rank or type is the file's fault
        raise MmtkError(f"{name}: its tensors do not describe a model ({type(err).__name__}: {err}); the file is "
                        "corrupt or not a model checkpoint") from None
    config = {**inferred, **recorded}
    extra = {k: v for k, v in container.items() if k not in ("model", "state_dict", "model_state")}
    return Weights(name, fmt, state, unused, config, frozenset(recorded), model_name, notes, extra)


def _require_recorded_modalities(container: dict[str, Any], source: str) -> None:
    """The modalities an mmtk checkpoint records ({name: origin}) are registered, checked before its tensors are
    read by modality: a missing one names its plugin file."""
    from mmtk.modality import require_registered

    origins = container.get("modalities", {})
    if not isinstance(origins, dict) or not all(isinstance(v, str) for v in origins.values()):
        raise MmtkError(f"{source}: its 'modalities' entry is not a mapping of names to origins; the checkpoint is "
                        "corrupt or forged")
    require_registered(origins, f"checkpoint {source}")


def _read_config_json(path: Path) -> dict[str, Any]:
    """A model folder's config.json: a JSON object, whose model_args (when mmtk wrote it) are an object too."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MmtkError(f"{path} is not valid JSON ({err}); rewrite it with `mmtk weights CKPT --to DIR`") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_args", {}), dict):
        raise MmtkError(f"{path} is not a model description (a JSON object whose model_args is an object); rewrite "
                        "it with `mmtk weights CKPT --to DIR`")
    return config


def _config_fields() -> set[str]:
    from mmtk.model.multimae import ModelConfig

    return {f.name for f in fields(ModelConfig)}


def official_task(state: dict[str, Tensor]) -> str | None:
    """The task of an official finetuning head (its output adapter's name), or None for pretraining files."""
    for name in state:
        match = re.match(r"^output_adapters\.(\w+)\.(proj_dec|final_layer|scratch|act_\d_postprocess|head)\.", name)
        if match:
            return match[1]
    return None


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


def to_mmtk_names(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str, list[str]]:
    """(state dict in mmtk names, names that could not be mapped, detected format, notes on the conversion)."""
    fmt = detect_format(state)
    notes: list[str] = []
    if fmt == "official":
        renamed, unknown = official_to_mmtk(state)
    elif fmt == "timm":
        renamed, unknown, notes = timm_to_mmtk(state)
    else:
        renamed, unknown = dict(state), []
    return renamed, unknown, fmt, notes


def load_weights(model: nn.Module, source: str | Path | dict | Weights) -> LoadReport:
    """Load weights of any supported format into `model`; report unused, missing and resized keys.

    The model is taken as it is; :func:`mmtk.create_model` with ``pretrained=`` builds the model the file describes.
    """
    if isinstance(source, Weights):
        state, unknown, fmt, notes = source.state, source.unused, source.format, source.notes
    else:
        container = read_state_dict(locate_weights(source)[0]) if not isinstance(source, dict) else source
        state, unknown, fmt, notes = to_mmtk_names(unwrap(container))
    report = LoadReport(fmt, unused=list(unknown), notes=list(notes))
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
