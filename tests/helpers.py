"""Small shared helpers for the tests: tiny model configs and prepared batches."""

from __future__ import annotations

import pytest
import torch

import mmtk

# Tests of the GPU paths run where CUDA is present (a lent GPU machine) and are skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

TINY = dict(dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4, num_classes=5)


def tiny_model(**overrides) -> mmtk.MultiMAE:
    return mmtk.create_model("multimae-tiny", **{**TINY, "image_size": 64, "num_visible": 12, **overrides})


def random_batch(batch: int = 2, size: tuple[int, int] = (64, 64), num_classes: int = 5, seed: int = 0) -> dict:
    """Prepared tensors of the right layout (random values, for shape and masking tests)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    return {
        "rgb": torch.randn(batch, 3, h, w, generator=gen),
        "depth": torch.randn(batch, 1, h, w, generator=gen),
        "semseg": torch.randint(0, num_classes, (batch, h // 4, w // 4), generator=gen),
    }
