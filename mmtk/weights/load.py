"""Reading weights of any known format as mmtk's, with the model they describe, and loading them into a model.

:func:`read_weights` also reads what model a file describes: recorded in mmtk checkpoints and folders, else
inferred from the tensors' names and shapes (:mod:`mmtk.weights.infer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mmtk.errors import MmtkError
from mmtk.model.layers import resize_pos_embed
from mmtk.weights.files import CONTAINER_KEYS, read_state_dict, unwrap
from mmtk.weights.folders import CONFIG_TYPE, locate_weights, read_config_json
from mmtk.weights.foreign import Renamed
from mmtk.weights.infer import infer_config
from mmtk.weights.sources import to_mmtk_names


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


@dataclass
class Weights:
    """A weights file understood: its tensors in mmtk names and the model they determine."""

    source: str
    format: str  # the name of its format in mmtk.weights.sources: "mmtk", "official", "timm", ...
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
            config_json = read_config_json(config_path)
    _require_recorded_modalities(container, name)
    weight_format, renamed = to_mmtk_names(unwrap(container))
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
        inferred = infer_config(renamed.state, renamed.task, name)
    except MmtkError:
        raise
    except Exception as err:  # shapes from a file: a tensor of the wrong rank or type is the file's fault
        raise MmtkError(f"{name}: its tensors do not describe a model ({type(err).__name__}: {err}); the file is "
                        "corrupt or not a model checkpoint") from None
    config = {**inferred, **recorded}
    extra = {k: v for k, v in container.items() if k not in CONTAINER_KEYS}
    return Weights(name, weight_format.name, renamed.state, renamed.unused, config, frozenset(recorded), model_name,
                   renamed.notes, extra)


def _require_recorded_modalities(container: dict[str, Any], source: str) -> None:
    """The modalities an mmtk checkpoint records ({name: origin}) are registered, checked before its tensors are
    read by modality: a missing one names its plugin file."""
    from mmtk.modality import require_registered

    origins = container.get("modalities", {})
    if not isinstance(origins, dict) or not all(isinstance(v, str) for v in origins.values()):
        raise MmtkError(f"{source}: its 'modalities' entry is not a mapping of names to origins; the checkpoint is "
                        "corrupt or forged")
    require_registered(origins, f"checkpoint {source}")


def _config_fields() -> set[str]:
    from mmtk.model.multimae import ModelConfig

    return {f.name for f in fields(ModelConfig)}


def load_weights(model: nn.Module, source: str | Path | dict | Weights) -> LoadReport:
    """Load weights of any supported format into `model`; report unused, missing and resized keys.

    The model is taken as it is; :func:`mmtk.create_model` with ``pretrained=`` builds the model the file describes.
    """
    if isinstance(source, Weights):
        format_name, renamed = source.format, Renamed(source.state, source.unused, source.notes)
    else:
        container = read_state_dict(locate_weights(source)[0]) if not isinstance(source, dict) else source
        weight_format, renamed = to_mmtk_names(unwrap(container))
        format_name = weight_format.name
    report = LoadReport(format_name, unused=list(renamed.unused), notes=list(renamed.notes))
    own = model.state_dict()
    usable = {}
    for name, tensor in renamed.state.items():
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
