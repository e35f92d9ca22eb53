"""depth_pseudo: depth predicted by a network (`mmtk pseudo-label`), a modality of its own beside sensor depth.

Prepared like sensor depth (robust per-image standardisation, so relative depth works too) from the
HDF5 dataset `depth_pseudo` (float32 [H, W], relative with 1 = the frame's median, or metres; its ``units``
attribute says which); with both in a recipe, a model pretrains on sensor and pseudo depth at once.
"""

from __future__ import annotations

from mmtk.modality import StoredArray, register_modality
from mmtk.adapters.depth import METRES, Depth


@register_modality
class PseudoDepth(Depth):
    name = "depth_pseudo"
    stores = (StoredArray("depth_pseudo", "metric", METRES, "relative (1 = frame median) or m"),)
