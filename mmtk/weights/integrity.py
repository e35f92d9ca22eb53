"""Checkpoint integrity: a SHA-256 of a checkpoint's content, stored inside it when written and checked when read.

A flipped byte in a tensor of a PyTorch file still loads (its zip container keeps no checksum that torch checks),
so weights or optimizer moments would change silently. mmtk's checkpoints therefore carry ``sha256``: the digest
of everything else they hold (tensors by dtype, shape and bytes; other values by type and value, keys sorted), so
the digest is the same whichever way the dict was written (and wherever its tensors were). Files without one
(official, timm, older mmtk files) load as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from mmtk.errors import CorruptCheckpoint

DIGEST_KEY = "sha256"


def content_digest(state: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint's content, its ``sha256`` entry left out."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != DIGEST_KEY})
    return digest.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` on the host with its content digest added (what :func:`verify` checks when the file is read back).

    Each tensor on an accelerator is copied to the host once: the digest is taken of that copy and ``torch.save``
    writes it as it is (a save would otherwise copy every tensor off the device a second time). Host tensors are
    not copied; tensors that are the same view of the same memory stay one tensor. The copies are held until the
    sealed state is dropped: a checkpoint's size in host memory while it is written.
    """
    host = _on_host(state, {})
    return {**host, DIGEST_KEY: content_digest(host)}


def verify(state: Any, path: str | Path) -> None:
    """Raise :class:`CorruptCheckpoint` when ``state`` (read from ``path``) records a digest its content does not
    match. A state without a digest (official or foreign weights) passes."""
    recorded = state.get(DIGEST_KEY) if isinstance(state, dict) else None
    if recorded is None:
        return
    if not isinstance(recorded, str) or content_digest(state) != recorded:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its content no longer matches the SHA-256 recorded "
                                f"when it was written (a damaged disk or copy)", Path(path))


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def _on_host(value: Any, copies: dict[tuple, torch.Tensor]) -> Any:
    """``value`` with every tensor moved to the host (containers rebuilt, other values as they are)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type == "cpu":
            return tensor
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
                tuple(tensor.shape), tensor.stride())
        if view not in copies:
            copies[view] = tensor.to("cpu")
        return copies[view]
    if isinstance(value, dict):
        return {key: _on_host(item, copies) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_on_host(item, copies) for item in value)
    return value
