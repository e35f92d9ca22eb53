"""Plugins: Python files (``--plugin FILE.py``, a recipe's ``plugins:``) and installed packages (entry-point group
``mmtk.modalities``) that register modalities, task families, source layouts, learning-rate schedules or weights formats.

Every registry calls :func:`record_registration` when an entry registers, so each entry knows where it came from
(for checkpoints: "pass --plugin FILE") and a plugin file that registers nothing is refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from mmtk.errors import MmtkError

ENTRY_POINT_GROUP = "mmtk.modalities"
_LOADING: list[str] = ["mmtk"]  # the origin of what registers right now: "mmtk", "package:<module>", "file:<path>"
_REGISTERED_BY: dict[str, list[str]] = {}  # origin -> the names its code registered


def record_registration(name: str) -> str:
    """Note that the code being loaded now registered ``name`` (a modality, a task family, a source layout, ...);
    returns its origin ("mmtk", "package:<module>" or "file:<path>")."""
    origin = _LOADING[-1]
    _REGISTERED_BY.setdefault(origin, []).append(name)
    return origin


def load_adapters() -> None:
    """Register mmtk's own adapters and task families, then installed plugins (once; imported by name, so the core
    never imports an adapter)."""
    importlib.import_module("mmtk.adapters")


def load_plugin(path: str | Path) -> list[str]:
    """Register what a plugin file defines (``--plugin FILE.py``); returns the names it registered, sorted.

    Loading a plugin runs its code, as importing any Python module does: load only files you trust.
    """
    path = Path(path).expanduser().resolve()
    origin = f"file:{path}"
    if origin in _REGISTERED_BY:
        return sorted(_REGISTERED_BY[origin])
    if not path.is_file() or path.suffix != ".py":
        raise MmtkError(f"plugin {path} is not a Python file; pass --plugin path/to/adapter.py")
    load_adapters()  # mmtk's own first, so a plugin may build on them
    module_name = f"mmtk_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so that its classes pickle into DataLoader workers
    _LOADING.append(origin)
    try:
        spec.loader.exec_module(module)
    except MmtkError:
        raise
    except Exception as err:  # a user's file: any error it raises is reported in one line
        raise MmtkError(f"plugin {path} failed to load: {type(err).__name__}: {err}") from None
    finally:
        _LOADING.pop()
    if origin not in _REGISTERED_BY:
        raise MmtkError(f"plugin {path} registers nothing; decorate its classes with @register_modality, "
                        f"@register_task_family or @register_layout (a function with @register_schedule, a format with "
                        f"register_format)")
    return sorted(_REGISTERED_BY[origin])


def load_entry_points() -> None:
    """Register the plugins of installed packages (entry-point group ``mmtk.modalities``)."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _LOADING.append(f"package:{point.value}")
        try:
            point.load()
        except Exception as err:  # a broken third-party package must not break mmtk itself
            print(f"warning: plugin {point.value} failed to load: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            _LOADING.pop()
