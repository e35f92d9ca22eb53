"""The modality interface and its registry.

A modality is one file: a subclass of :class:`Modality` decorated with :func:`register_modality`.
It says how its prepared tensor becomes tokens (tokenizer), how many values each output pixel has
(the generic decoder un-patchifies to that), where its training target comes from, and its
per-pixel loss. The core model never names a modality; it looks them up here.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from mmtk.errors import MmtkError

_REGISTRY: dict[str, type["Modality"]] = {}


class Modality:
    """One modality: tokenizer, decoder output layout, target and loss.

    Class attributes a subclass sets:
      name:          registry key, also the key of the prepared tensor in `inputs`.
      channels:      channels of the prepared tensor, and the decoder's values per output pixel unless
                     `out_channels` says otherwise (semseg: 1 label per pixel in, the class count out).
      stride:        the prepared tensor is at 1/stride of the image resolution (semseg: 4).
      is_input:      whether it can be encoded (False for target-only tasks such as norm_rgb).
      mask_source:   the input whose positions give the decoder's queries and whose token mask
                     decides which pixels the loss sees (default: itself; norm_rgb uses rgb).
      pos_mode:      interpolation of its positional grid at other image sizes.
      stored_from:   HDF5 datasets of a split it is read or computed from, when those are not just
                     `name` (xyz: depth and intrinsics; depth_pseudo: its own dataset); see :meth:`load`.
    """

    name: ClassVar[str]
    channels: ClassVar[int] = 1
    stride: ClassVar[int] = 1
    is_input: ClassVar[bool] = True
    mask_source: ClassVar[str | None] = None
    pos_mode: ClassVar[str] = "bicubic"
    stored_from: ClassVar[tuple[str, ...]] = ()

    def __init__(self, patch_size: int = 16, num_classes: int = 0) -> None:
        self.patch_size = patch_size
        self.num_classes = num_classes

    @property
    def loss_mask_source(self) -> str:
        return self.mask_source or self.name

    @property
    def out_channels(self) -> int:
        """Values per output pixel predicted by the decoder."""
        return self.channels

    def tokenizer(self, dim: int, grid: tuple[int, int]) -> nn.Module:
        """A module mapping the prepared tensor [B, ...] to tokens [B, gh*gw, dim] (positions included).

        Default: patches of the dense [B, channels, H, W] map (rgb, depth, xyz, ...).
        """
        if not self.is_input:
            raise MmtkError(f"modality '{self.name}' is target-only; remove it from the model inputs")
        from mmtk.layers import PatchTokenizer

        return PatchTokenizer(self.channels, dim, self.patch_size, grid, stride=self.stride, pos_mode=self.pos_mode)

    def target(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """The training target in the decoder's output layout, or None when the batch lacks it."""
        return inputs.get(self.name)

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        """[B, h, w] bool of pixels whose target is meaningful, or None when all are."""
        return None

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-pixel loss [B, h, w] of a prediction [B, C, h, w] against its target."""
        raise NotImplementedError

    def load(self, read: Callable[[str], Any], window: Any, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Prepared tensors of one frame for `mmtk.data.H5Dataset` (modalities with `stored_from`).

        `read(name)` returns the frame's stored array `name` cropped to `window` (a
        `mmtk.data.transforms.CropWindow`: top, left, height, width, flip); per-frame matrices such as
        "intrinsics" come whole. Return the modality's tensor plus an optional "<name>_valid" map.
        """
        raise MmtkError(f"modality '{self.name}' cannot be loaded from an mmtk HDF5 file")


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make a modality available to `mmtk.create_model` by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_modality(name: str) -> type[Modality]:
    """Look up a registered modality class by name."""
    if name not in _REGISTRY:
        raise MmtkError(f"unknown modality '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_modalities() -> list[str]:
    """Names of all registered modalities."""
    return sorted(_REGISTRY)
