"""depth_pseudo: depth predicted by a network (`mmtk pseudo-label`), a modality of its own beside sensor depth.

Prepared like sensor depth (robust per-image standardisation, so relative depth works too) from the
HDF5 dataset `depth_pseudo`; with both in a recipe, a model pretrains on sensor and pseudo depth at once.
"""

from __future__ import annotations

from torch import Tensor

from mmtk.adapters.base import register_modality
from mmtk.adapters.depth import Depth


@register_modality
class PseudoDepth(Depth):
    name = "depth_pseudo"
    stored_from = ("depth_pseudo",)

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        from mmtk.data.transforms import prepare_depth

        prepared = prepare_depth(read("depth_pseudo"), image_size, window.flip)
        return {"depth_pseudo": prepared["depth"], "depth_pseudo_valid": prepared["depth_valid"]}
