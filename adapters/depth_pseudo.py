"""depth_pseudo: depth predicted by a network (`mmtk pseudo-label`), a modality of its own beside sensor depth.

Prepared like sensor depth (robust per-image standardisation, which removes the unknown scale and shift of
relative predictions) from the HDF5 dataset `depth_pseudo` (float32 [H, W], 0 = invalid). Its ``units``
attribute says what it holds: ``m`` (a metric network), ``relative`` (depth up to scale and shift, 1 = the
frame's median) or ``relative-inverse`` (inverse depth up to scale and shift, 1 = the frame's median; prepared
as standardised negative inverse depth, see adapters/depth.py). With both in a recipe, a model pretrains on
sensor and pseudo depth at once.
"""

from __future__ import annotations

from mmtk.modality import StoredArray, register_modality
from mmtk.adapters.depth import METRES, Depth


@register_modality
class PseudoDepth(Depth):
    name = "depth_pseudo"
    stores = (StoredArray("depth_pseudo", "metric", METRES, "m, relative or relative-inverse (units attr)"),)
