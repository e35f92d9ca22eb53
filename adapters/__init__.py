"""mmtk's modality adapters: one file per modality (rgb, depth, semseg, norm_rgb, xyz, ...), and its task families
(tasks/: segmentation, depth).

Importing this package registers every modality file in it and every task family in tasks/, then the modalities
(and families) of installed packages that declare the entry-point group ``mmtk.modalities``; `mmtk.modality` and
`mmtk.task` import it on the first registry lookup. A new modality is one new file with a `@register_modality`
class (see `mmtk.modality`), a new task family one file with a `@register_task_family` class (see `mmtk.task`);
nothing in mmtk changes.
"""

import importlib
import pkgutil

from mmtk.plugins import load_entry_points

_FIRST = ("rgb", "depth", "semseg")  # registration order is the order modalities are listed in (rgb first)
for _name in _FIRST + tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
    importlib.import_module(f"{__name__}.{_name}")
importlib.import_module(f"{__name__}.tasks")
load_entry_points()
