"""Semantic segmentation: class indices [B, H/4, W/4] (0-based, 255 = ignore).

As an input, each pixel's class is embedded (64 values), and a 4x4 patch convolution turns the
1/4-resolution map into tokens on the same grid as the other modalities. Ignored pixels embed to
zero. As an output, the decoder predicts logits [B, C, H/4, W/4]; the loss is cross-entropy on
hidden, labelled pixels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmtk.adapters.base import Modality, register_modality
from mmtk.layers import PatchTokenizer

IGNORE_INDEX = 255
CLASS_EMBED_DIM = 64


class SemsegTokenizer(PatchTokenizer):
    """Class embedding followed by patch tokens from the 1/4-resolution map."""

    def __init__(self, num_classes: int, dim: int, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(CLASS_EMBED_DIM, dim, patch_size, grid, stride=4, pos_mode="bilinear")
        self.class_emb = nn.Embedding(num_classes, CLASS_EMBED_DIM)

    def forward(self, labels: Tensor) -> Tensor:
        known = labels != IGNORE_INDEX  # labels: [B, h, w]
        emb = self.class_emb(labels.clamp(0, self.class_emb.num_embeddings - 1))  # [B, h, w, 64]
        emb = emb * known.unsqueeze(-1).to(emb.dtype)
        return super().forward(emb.permute(0, 3, 1, 2))


@register_modality
class Semseg(Modality):
    name = "semseg"
    stride = 4
    pos_mode = "bilinear"

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def tokenizer(self, dim: int, grid: tuple[int, int]) -> nn.Module:
        if self.num_classes < 1:
            raise ValueError("semseg needs num_classes >= 1")
        return SemsegTokenizer(self.num_classes, dim, self.patch_size, grid)

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        labels = inputs.get(self.name)
        return None if labels is None else labels != IGNORE_INDEX

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # Cross-entropy in fp32 even under autocast: logits over many classes lose too much in bf16.
        return F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
