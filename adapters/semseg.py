"""Semantic segmentation: class indices [B, H/4, W/4] (0-based, 255 = ignore).

Stored as ``semseg`` [H, W] uint8 (uint16 beyond 255 classes): 0 = unlabeled, k = classes[k-1].

As an input, each pixel's class is embedded (64 values), and a 4x4 patch convolution turns the
1/4-resolution map into tokens on the same grid as the other modalities. Ignored pixels embed to
zero. As an output, the decoder predicts logits [B, C, H/4, W/4]; the loss is cross-entropy on
hidden, labelled pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtk.data.resize import resize_labels
from mmtk.data.transforms import flip_width
from mmtk.data.values import check_label_ids
from mmtk.modality import Modality, StoredArray, register_modality

IGNORE_INDEX = 255
CLASS_EMBED_DIM = 64


@register_modality
class Semseg(Modality):
    name = "semseg"
    stride = 4
    pos_mode = "bilinear"
    ignore_index = IGNORE_INDEX
    task_family = "segmentation"
    fp32_decoder = True  # logits over many classes lose too much in bf16
    stores = (StoredArray("semseg", "labels", ("uint8", "uint16", "int32", "int64", "uint32"),
                          "class id, 0 = unlabeled, k = classes[k-1]"),)

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Labels at 1/4 resolution (the model's) and at full resolution (``<name>_full``, for metrics).

        Ids beyond the class count (``num_classes``, when known) are refused: they would index past the
        class embedding and the loss."""
        labels = read(self.name)
        check_label_ids(self.name, labels, self.num_classes)
        return prepare_semseg(labels, image_size, window.flip, self.stride)

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def tokenizer(self, dim: int, grid: tuple[int, int]) -> nn.Module:
        if self.num_classes < 1:
            raise ValueError("semseg needs num_classes >= 1")
        from mmtk.model.layers import ClassMapTokenizer  # (timm) only when a model is built, not when data is read

        return ClassMapTokenizer(self.num_classes, CLASS_EMBED_DIM, dim, self.patch_size, grid, IGNORE_INDEX,
                                 stride=self.stride, pos_mode=self.pos_mode)

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        labels = inputs.get(self.name)
        return None if labels is None else labels != IGNORE_INDEX

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # Cross-entropy in fp32 even under autocast: logits over many classes lose too much in bf16.
        return F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="none")


def prepare_semseg(labels: np.ndarray, size: tuple[int, int], flip: bool, stride: int = 4) -> dict[str, Tensor]:
    """Stored labels [h, w] (0 = unlabeled, k = class k-1) -> semseg [H/4, W/4] and semseg_full [H, W], int64.

    Output classes are 0-based; IGNORE_INDEX (255) marks unlabeled pixels.
    """
    lab = torch.from_numpy(np.ascontiguousarray(labels))[None, None]
    full = flip_width(resize_labels(lab, size), flip)
    small = resize_labels(full, (size[0] // stride, size[1] // stride))

    def shift(x: Tensor) -> Tensor:
        x = x[0, 0].to(torch.int64) - 1
        return torch.where(x < 0, torch.full_like(x, IGNORE_INDEX), x)

    return {"semseg": shift(small), "semseg_full": shift(full)}
