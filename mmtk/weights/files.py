"""Weights files read and written safely: PyTorch (``weights_only=True``) or safetensors, told apart by their bytes.

Loading never executes code. An mmtk checkpoint's recorded SHA-256 is checked on every full read
(:mod:`mmtk.weights.integrity`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmtk.errors import CorruptCheckpoint, MmtkError
from mmtk.io import atomic_path
from mmtk.weights.integrity import verify

CONTAINER_KEYS = ("model", "state_dict", "model_state")  # where a checkpoint container keeps its state dict


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


def unwrap(checkpoint: dict) -> dict[str, Tensor]:
    """The state dict inside a checkpoint container ({'model': ...}, {'state_dict': ...} or bare)."""
    for key in CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint
