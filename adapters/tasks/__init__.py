"""mmtk's task families: one file per family (segmentation, depth), registered when mmtk.adapters is imported.

A new family is one new file with a `@register_task_family` class (see `mmtk.task`); nothing in mmtk changes.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
