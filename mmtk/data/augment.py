"""Whole-frame augmentations of the paper's finetuning (torchvision.transforms.v2): one random draw for every
stored array of a sample, chosen by ``data.augmentation``.

Geometry applies to every array by its StoredArray kind (images bilinear, metric depth and labels nearest, so no
invalid or unlabelled pixel is blended in; padding is grey 128 for 8-bit images, 0 = invalid / unlabelled
otherwise); colour applies only to the arrays of modalities whose adapter says ``colour = True``. Imported only
when such an augmentation is used (torchvision takes seconds to import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mmtk.errors import MmtkError
from mmtk.modality import stored_array


class PadBottomRight(v2.Transform):
    """Pad at the bottom and right up to ``size`` (albumentations PadIfNeeded with position top_left): 8-bit
    images with ``fill``, everything else with 0."""

    def __init__(self, size: tuple[int, int], fill: int = 128) -> None:
        super().__init__()
        self.size, self.fill = tuple(size), fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.functional.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.TVTensor)))
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.fill if isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8 else 0
        return v2.functional.pad(inpt, params["padding"], fill=fill)


@dataclass(frozen=True)
class FrameAugmentation:
    """Steps applied in order to whole frames; each step is (``"all"`` or ``"colour"``, a v2 transform)."""

    name: str
    steps: tuple[tuple[str, v2.Transform], ...]

    def __call__(self, arrays: dict[str, np.ndarray], kinds: dict[str, str], colour: set[str]) -> dict[str, np.ndarray]:
        """Augment one sample's stored arrays (name -> [H, W] or [H, W, C]) of StoredArray ``kinds``; ``colour``:
        the names colour steps apply to. Returns arrays of the same dtypes and layouts."""
        frames = {name: _to_tv(array, kinds[name]) for name, array in arrays.items()}
        for target, step in self.steps:
            names = [n for n in frames if target == "all" or n in colour]
            if names:
                frames.update(zip(names, step(*(frames[n] for n in names)) if len(names) > 1
                                  else (step(frames[names[0]]),)))
        return {name: _from_tv(frame, arrays[name]) for name, frame in frames.items()}


def _to_tv(array: np.ndarray, kind: str) -> tv_tensors.TVTensor:
    """A stored array as a torchvision tensor: 8-bit images as images, everything else as float32 (exact for
    labels below 2^24); metric and label maps as masks (nearest, padding 0)."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]  # [C, H, W]
    if kind == "image":
        return tv_tensors.Image(x if x.dtype == torch.uint8 else x.to(torch.float32))
    return tv_tensors.Mask(x.to(torch.float32))


def _from_tv(frame: torch.Tensor, like: np.ndarray) -> np.ndarray:
    x = frame.as_subclass(torch.Tensor)
    x = x.permute(1, 2, 0) if like.ndim == 3 else x[0]
    if np.issubdtype(like.dtype, np.integer) and x.is_floating_point():
        x = x.round()
    return x.numpy().astype(like.dtype, copy=False)


def multimae_semseg(size: tuple[int, int]) -> FrameAugmentation:
    """The official NYUv2 semseg training augmentation (EPFL-VILAB/MultiMAE utils/datasets_semseg.py
    simple_transform, train): flip p 0.5; ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.5 (colour only); scale jitter
    0.1-2.0 of the frame fitted into ``size`` (LongestMaxSize + RandomScale); pad bottom/right to ``size`` (grey
    128, labels unlabelled); random crop ``size``."""
    return FrameAugmentation("multimae-semseg", (
        ("all", v2.RandomHorizontalFlip(0.5)),
        ("colour", v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.5)),
        ("all", v2.Compose([v2.ScaleJitter(size, scale_range=(0.1, 2.0)), PadBottomRight(size, 128),
                            v2.RandomCrop(size)])),
    ))


def multimae_depth(size: tuple[int, int]) -> FrameAugmentation:
    """The official NYUv2 depth training augmentation (EPFL-VILAB/MultiMAE utils/dataset_regression.py
    nyu_transform, train, color_augs): short side resized to ``min(size)``; flip p 0.5; ColorJitter(brightness
    0.1255, contrast 0.4, saturation 0.5-1.5, hue -0.2-0.2) with p 0.5 and grayscale p 0.3 (colour only); random
    crop ``size`` without rescaling."""
    return FrameAugmentation("multimae-depth", (
        ("all", v2.Compose([v2.Resize(min(size)), v2.RandomHorizontalFlip(0.5)])),
        ("colour", v2.Compose([v2.RandomApply([v2.ColorJitter(brightness=0.1255, contrast=0.4, saturation=(0.5, 1.5),
                                                              hue=(-0.2, 0.2))], p=0.5),
                               v2.RandomGrayscale(p=0.3)])),
        ("all", v2.RandomCrop(size)),
    ))


# data.augmentation -> builder(image size) of whole-frame augmentations; None: mmtk's crop window chosen before
# reading (random resized crop, data.crop_scale, data.hflip), which reads only the pixels it needs.
AUGMENTATIONS: dict[str, Callable[[tuple[int, int]], FrameAugmentation] | None] = {
    "random-resized-crop": None,
    "multimae-semseg": multimae_semseg,
    "multimae-depth": multimae_depth,
}


@dataclass(frozen=True)
class BoundAugmentation:
    """A whole-frame augmentation and the stored arrays of a dataset it transforms."""

    augmentation: FrameAugmentation
    kinds: dict[str, str]  # source name (as adapters read it) -> StoredArray kind
    colour: set[str]  # source names colour steps apply to

    def read(self, read: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
        """From a reader of whole stored frames, a reader of the augmented ones (all drawn together)."""
        arrays = self.augmentation({name: read(name) for name in self.kinds}, self.kinds, self.colour)
        return arrays.__getitem__


def bind_augmentation(name: str, size: tuple[int, int], sources: dict[str, tuple[str, bool]]) -> BoundAugmentation:
    """Augmentation ``name`` for arrays ``sources`` (source name -> (stored dataset name, colour)); refuses
    arrays it cannot transform (per-frame matrices such as camera intrinsics) in one line."""
    builder = AUGMENTATIONS.get(name)
    if builder is None:
        raise MmtkError(f"data.augmentation: {name!r} is not a whole-frame augmentation; choose one of "
                        f"{', '.join(n for n, b in AUGMENTATIONS.items() if b is not None)}")
    kinds = {}
    for source, (stored, _) in sources.items():
        try:
            kinds[source] = stored_array(stored)[1].kind
        except MmtkError:
            raise MmtkError(f"data.augmentation {name} transforms whole images but the data reads {stored!r}, "
                            f"which it cannot adjust (e.g. camera intrinsics for xyz); use data.augmentation "
                            f"random-resized-crop") from None
    return BoundAugmentation(builder(size), kinds, {source for source, (_, colour) in sources.items() if colour})
