"""Modality adapters (one file per modality) and sensor readers.

Importing this package registers every modality file in it (rgb, depth, semseg, norm_rgb, xyz, ...):
a new modality is one new file with a `@register_modality` class; nothing else changes.
"""

import importlib
import pkgutil

from mmtk.adapters.base import Modality, get_modality, list_modalities, register_modality

for _module in pkgutil.iter_modules(__path__):
    if not _module.ispkg and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Modality", "get_modality", "list_modalities", "register_modality"]
