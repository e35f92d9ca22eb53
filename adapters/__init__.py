"""Modality adapters (one file per modality) and the plugins that add more.

Importing this package registers every modality file in it (rgb, depth, semseg, norm_rgb, xyz, ...),
then the modalities of installed packages that declare the entry-point group ``mmtk.modalities``. A loose
adapter file is registered with :func:`load_plugin` (the CLI's ``--plugin FILE.py``, a recipe's ``plugins:``).
A new modality is one new file with a `@register_modality` class; nothing in mmtk changes.
"""

import importlib
import pkgutil

from mmtk.adapters.base import (Modality, StoredArray, get_modality, list_modalities, load_entry_points, load_plugin,
                                modality_origins, register_modality, require_registered, stored_array)

_FIRST = ("rgb", "depth", "semseg")  # registration order is the order modalities are listed in (rgb first)
for _name in _FIRST + tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
    if _name != "base":
        importlib.import_module(f"{__name__}.{_name}")
load_entry_points()

__all__ = ["Modality", "StoredArray", "get_modality", "list_modalities", "load_plugin", "modality_origins",
           "register_modality", "require_registered", "stored_array"]
