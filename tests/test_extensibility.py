"""A new modality is one registered class: nothing in the core changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import mmtk
from helpers import TINY, random_batch
from mmtk.modality import Modality, register_modality


@register_modality
class SurfaceNormals(Modality):
    """Unit surface normals [B, 3, H, W]; cosine loss."""

    name = "test_normals"
    channels = 3

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return 1 - F.cosine_similarity(pred, target, dim=1)  # [B, H, W]


def test_registered_modality_trains_a_step():
    torch.manual_seed(0)
    model = mmtk.create_model("multimae-tiny", **TINY, image_size=64, num_visible=16,
                              inputs=("rgb", "test_normals"), outputs=("rgb", "test_normals"))
    batch = random_batch(2)
    batch["test_normals"] = F.normalize(torch.randn(2, 3, 64, 64), dim=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model({"rgb": batch["rgb"], "test_normals": batch["test_normals"]})
    assert set(out.losses) == {"rgb", "test_normals"} and out.preds["test_normals"].shape == (2, 3, 64, 64)
    before = model.encoder.tokenizers["test_normals"].proj.weight.detach().clone()
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.encoder.tokenizers["test_normals"].proj.weight)
    assert "test_normals" in mmtk.modality.list_modalities()
