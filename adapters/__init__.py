"""Modality adapters (one file per modality) and sensor readers.

Importing this package registers the built-in modalities: rgb, depth, semseg, norm_rgb.
A new modality is one new file with a `@register_modality` class; nothing else changes.
"""

from mmtk.adapters import depth, norm_rgb, rgb, semseg  # noqa: F401  (registers the built-ins)
from mmtk.adapters.base import Modality, get_modality, list_modalities, register_modality

__all__ = ["Modality", "get_modality", "list_modalities", "register_modality"]
