"""Named model sizes and `create_model`, the one way to build a model (from a name, a weights file, or both)."""

from __future__ import annotations

import reprlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtk.errors import MmtkError
from mmtk.weights.infer import default_hooks
from mmtk.weights.load import Weights, load_weights, read_weights
from mmtk.weights.sources import get_format
from mmtk.model.multimae import DenseModel, ModelConfig, MultiMAE
from mmtk.model.sizes import NAMED_MODELS, reported_name, size_name
# What a weights file fixes and no argument can change: the encoder's trunk.
TRUNK = ("dim", "depth", "mlp_ratio", "patch_size", "num_global_tokens")
HEAD_DIM = 64  # width per attention head of every released ViT and MultiMAE (heads are not in the shapes)
DECODER_HEADS = 8  # the official MultiMAE decoders'


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(NAMED_MODELS)


def named_model(name: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a named model declares: its size and its modalities."""
    if name not in NAMED_MODELS:
        raise MmtkError(f"unknown model '{name}'; choose one of {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[name]


def _check_options(options: dict[str, Any]) -> None:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MmtkError(f"unknown model option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named model with `overrides` applied (any :class:`ModelConfig` field)."""
    _check_options(overrides)
    values = {**named_model(name), **overrides}
    if "main_inputs" not in overrides:  # the named model's, where its inputs are kept; else the first input's
        values["main_inputs"] = tuple(m for m in values["main_inputs"] if m in values["inputs"])
    if values.get("head") == "dpt" and "hooks" not in values:
        values["hooks"] = default_hooks(values.get("depth", ModelConfig.depth))
    return ModelConfig(**values)


def build_model(config: ModelConfig) -> nn.Module:
    """A pretraining MultiMAE, or a DenseModel when the config names a finetuning head.

    Sizes beyond :data:`MODEL_ARG_LIMITS` or a model larger than the available memory are refused in one line
    before anything is allocated (the model is first built on the meta device: shapes only)."""
    if torch.get_default_device().type != "meta":
        for key, value in vars(config).items():
            if _outside_limits(key, value):
                raise MmtkError(f"model option {key} = {reprlib.repr(value)} is outside the plausible "
                                f"0..{MODEL_ARG_LIMITS[key]}; give a smaller value")
        with torch.device("meta"):
            _, needed = _values_and_bytes(_construct(config))
        _refuse_beyond_memory(needed, f"a model of width {config.dim}, {config.depth} blocks, "
                                      f"{config.num_classes} classes at {config.image_size[0]}x{config.image_size[1]} px")
    return _construct(config)


def _construct(config: ModelConfig) -> nn.Module:
    return MultiMAE(config) if config.head is None else DenseModel(config)


def _values_and_bytes(model: nn.Module) -> tuple[int, int]:
    """How many values a model's parameters and buffers hold, and their bytes."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def _refuse_beyond_memory(needed: int, what: str) -> None:
    from mmtk.io import available_ram, format_bytes

    free = available_ram()
    if needed > free:
        raise MmtkError(f"{what}: the model needs {format_bytes(needed)} of memory but only {format_bytes(free)} "
                        f"are available; check its sizes, free memory or use a machine with more")


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_from_weights(weights: Weights, name: str | None = None, **overrides: Any) -> tuple[ModelConfig, list[str]]:
    """The config of the model a weights file describes, with `overrides` applied; (config, notes).

    The file fixes the encoder's trunk (width, blocks, MLP ratio, patch size, global tokens, and heads when it
    records them): a name or an argument that contradicts it is refused. Everything else the file determines
    (inputs, outputs, class count, head and task, image size) can be changed on purpose; the parameters that
    change then start fresh and :func:`create_model` names them.
    """
    _check_options(overrides)
    file = dict(weights.config)
    source = weights.source
    if name is not None:
        sizes = named_model(name)
        for key in ("dim", "depth"):
            if key not in overrides and sizes[key] != file[key]:
                match = size_name({"dim": file["dim"], "depth": file["depth"]})
                raise MmtkError(f"{source} holds a {file['dim']}-wide encoder of {file['depth']} blocks"
                                f"{f' ({match})' if match else ''}, not {name} ({sizes['dim']} wide, {sizes['depth']} "
                                f"blocks); use {repr(match) if match else 'no model name'} or leave the name out")
    fixed = set(TRUNK) | ({"num_heads"} & weights.recorded)
    for key in sorted(fixed & set(overrides)):
        if _plain(overrides[key]) != _plain(file.get(key)):
            raise MmtkError(f"{key}={overrides[key]!r} contradicts {source}, which holds {key}={file[key]!r}; its "
                            f"weights only fit that: drop the argument")
    notes = []
    if "num_heads" not in file and "num_heads" not in overrides:
        if weights.model_name in NAMED_MODELS and NAMED_MODELS[weights.model_name]["dim"] == file["dim"]:
            file["num_heads"] = NAMED_MODELS[weights.model_name]["num_heads"]  # the size the file records says it
        else:
            named = [n for n in (name,) if n in NAMED_MODELS and NAMED_MODELS[n]["dim"] == file["dim"]]
            file["num_heads"] = NAMED_MODELS[named[0]]["num_heads"] if named else max(file["dim"] // HEAD_DIM, 1)
            notes.append(f"num_heads={file['num_heads']} assumed (width {file['dim']} / {HEAD_DIM}; the file does "
                         "not record heads: if it was trained with others, pass num_heads=N, or record them once "
                         "with `mmtk weights FILE --to DIR --set num_heads=N`)")
    if file.get("outputs") and "decoder_heads" not in file and "decoder_heads" not in overrides:
        file["decoder_heads"] = DECODER_HEADS
        if not get_format(weights.format).native:  # an mmtk file without it was trained with the default
            notes.append(f"decoder_heads={DECODER_HEADS} assumed (the official decoders')")
    changed = [f"{key} {_show(file[key])} -> {_show(value)}" for key, value in overrides.items()
               if key in file and _plain(file[key]) != _plain(value)]
    if changed:
        notes.append("applied on purpose: " + ", ".join(changed))
    values = {**file, **overrides}
    if values.get("head") == "dpt" and file.get("head") != "dpt" and "hooks" not in overrides:  # a new DPT head
        values["hooks"] = default_hooks(values["depth"])
    return ModelConfig(**values), notes


def _show(value: Any) -> str:
    value = _plain(value)
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _model_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of the model `config` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in build_model(config).state_dict().items()}


# Plausible bounds of what a weights file says its model is, checked before anything is built from it (a
# 17 KB file must not make mmtk allocate 51 GB). Generous: MultiMAE-L is dim 1024, depth 24, 16 heads.
MODEL_ARG_LIMITS = {"dim": 16384, "depth": 256, "num_heads": 512, "patch_size": 512, "num_global_tokens": 1024,
                    "num_classes": 65535, "decoder_dim": 16384, "decoder_depth": 64, "decoder_heads": 512,
                    "num_visible": 1 << 20, "convnext_dim": 1 << 17, "convnext_depth": 64, "preds_per_patch": 1 << 16,
                    "dpt_dim": 16384, "mlp_ratio": 64, "image_size": 16384, "layer_dims": 16384, "hooks": 256}
MAX_LIST_LENGTH = 64
WEIGHTS_SLACK = 1.05  # parameters and buffers a file may lack (e.g. recomputed buffers)


def _check_plausible(weights: Weights) -> None:
    """Every size the file records (model_args) or implies (tensor names) is within MODEL_ARG_LIMITS."""
    for key, value in weights.config.items():
        where = f"model_args.{key}" if key in weights.recorded else f"{key} (read from its tensors)"
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LIST_LENGTH:
            raise MmtkError(f"{weights.source}: {where} has {len(values)} entries; at most {MAX_LIST_LENGTH} are "
                            f"plausible, the checkpoint is corrupt or forged")
        if _outside_limits(key, value):
            raise MmtkError(f"{weights.source}: {where} = {reprlib.repr(value)} is outside the plausible "
                            f"0..{MODEL_ARG_LIMITS[key]}; the checkpoint is corrupt or forged")


def _outside_limits(key: str, value: Any) -> bool:
    """Whether a model option (a number or a list of numbers) lies outside its MODEL_ARG_LIMITS bound."""
    limit = MODEL_ARG_LIMITS.get(key)
    values = value if isinstance(value, (list, tuple)) else [value]
    return limit is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= limit
                                         for v in values)


def _file_model(weights: Weights) -> tuple[ModelConfig, dict[str, tuple[int, ...]]]:
    """The model a weights file describes and its tensor shapes, refused in one line, before any allocation,
    when the file's sizes are implausible, do not build, describe more values than the file holds, lack a
    tensor, or need more memory than is available. Built once, on the meta device."""
    from mmtk.io import format_bytes

    _check_plausible(weights)
    what = "model_args" if weights.recorded else "tensors"
    try:
        config, _ = config_from_weights(weights)
        with torch.device("meta"):
            model = build_model(config)
    except Exception as err:  # sizes from a file: any failure to build is the file's fault
        detail = str(err) if isinstance(err, MmtkError) else f"{type(err).__name__}: {err}"
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."  # it may quote a forged value
        raise MmtkError(f"{weights.source}: its {what} do not describe a model ({detail})") from None
    count, needed = _values_and_bytes(model)
    held = sum(t.numel() for t in weights.state.values() if isinstance(t, torch.Tensor))
    if count > held * WEIGHTS_SLACK + 2**18:
        raise MmtkError(f"{weights.source}: {what} describe a model of {count:,} values ({format_bytes(needed)}) but "
                        f"the file holds {held:,}; the checkpoint is corrupt or forged")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    _check_complete(weights, shapes)
    _refuse_beyond_memory(needed, str(weights.source))
    return config, shapes


def _check_complete(weights: Weights, shapes: dict[str, tuple[int, ...]]) -> None:
    """The file holds every tensor of the model it describes (else that model would be partly random)."""
    lacking = [k for k, shape in shapes.items() if k not in weights.state or tuple(weights.state[k].shape) != shape]
    if lacking:
        raise MmtkError(f"{weights.source} lacks {len(lacking)} tensor(s) of the model it describes, or holds them "
                        f"in other shapes ({', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}): the file is "
                        "incomplete or inconsistent")


def describe_weights(source: str | Path | dict | Weights, **overrides: Any
                     ) -> tuple[Weights, ModelConfig, dict[str, torch.Tensor], list[str]]:
    """A weights file, the model it describes, the file's tensors that model uses (mmtk names, the model's
    order) and the notes on what was assumed, without building the model (shapes only, on the meta device:
    once, and once more only when `overrides` change the config).

    `overrides` may only state what the file cannot (attention heads, training settings): an override that
    would change a tensor is refused, since a conversion makes no new parameters.
    """
    weights = read_weights(source)
    own, shapes = _file_model(weights)
    config, notes = config_from_weights(weights, **overrides)
    if config != own and _model_tensors(config) != shapes:
        raise MmtkError(f"{', '.join(f'{k}={v}' for k, v in overrides.items())} changes the tensors of the model "
                        f"{weights.source} holds; a conversion only records what the file cannot say (e.g. num_heads)")
    return weights, config, {name: weights.state[name] for name in shapes}, notes


def _fresh_summary(missing: list[str], names: list[str]) -> str:
    """Missing parameters as the largest modules missing whole (head, encoder.tokenizers.depth, ...)."""
    absent = set(missing)
    groups: list[str] = []
    for name in missing:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            prefix = ".".join(parts[:n])
            if all(other in absent for other in names if other == prefix or other.startswith(prefix + ".")):
                break
        if prefix not in groups:
            groups.append(prefix)
    return ", ".join(groups)


def create_model(name: str | None = None, pretrained: str | Path | dict | Weights | None = None, verbose: bool = True,
                 **overrides: Any) -> nn.Module:
    """Build a model by name, or as a weights file describes it, and load the file's weights.

    Example::

        model = mmtk.create_model("multimae-base")                      # random weights
        model = mmtk.create_model(pretrained="multimae-b_98_rgb+-depth-semseg_1600e_multivit.pth")
        model = mmtk.create_model("multimae-base", head="convnext", task="semseg", num_classes=40,
                                  inputs=("rgb", "depth"), pretrained="run/checkpoint.pt")  # a new head

    Args:
        name: one of :func:`list_models`; optional with ``pretrained`` (the file says the size).
        pretrained: an mmtk checkpoint, an official MultiMAE checkpoint, timm/MAE/DeiT ViT weights (PyTorch or
            safetensors, any file name), a model folder (config.json + model.safetensors) or a huggingface_hub
            cache folder. The file determines the model; see :func:`config_from_weights` for arguments.
        verbose: print what was loaded, assumed, and which parameters start fresh.
        overrides: any :class:`mmtk.model.multimae.ModelConfig` field.
    """
    if pretrained is None:
        if name is None:
            raise MmtkError(f"give a model name ({', '.join(NAMED_MODELS)}) or pretrained=WEIGHTS")
        return build_model(model_config(name, **overrides))
    weights = read_weights(pretrained)
    _file_model(weights)
    config, notes = config_from_weights(weights, name, **overrides)
    model = build_model(config)
    report = load_weights(model, weights)
    report.notes += notes
    if report.missing:
        report.notes.append(f"start fresh (changed by the arguments): {_fresh_summary(report.missing, list(model.state_dict()))}")
    model.load_report = report
    model.model_name = reported_name(name or weights.model_name, config)
    if verbose:
        print(f"loaded {weights.source}: {report.summary()}")
    return model


def model_from_checkpoint(source: str | Path | dict | Weights) -> nn.Module:
    """The model a weights file describes, with its weights and the class names of the data it was trained on.

    Whatever ``create_model(pretrained=...)`` reads; ``model.class_names`` holds the checkpoint's
    ``data.class_names`` (empty when not recorded). What the file does not record and had to be assumed
    (attention heads of an official or timm file) is printed in one line.
    """
    weights = read_weights(source)  # names the plugin file of a modality not registered
    data = weights.container.get("data", {})
    class_names = data.get("class_names") or [] if isinstance(data, dict) else None
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
        raise MmtkError(f"{weights.source}: its data.class_names is not a list of names; the checkpoint is corrupt "
                        "or forged")
    model = create_model(pretrained=weights, verbose=False)  # checks the file's sizes before building
    model.class_names = tuple(class_names)
    if model.load_report.notes:
        print(f"{weights.source}: {'; '.join(model.load_report.notes)}")
    return model
