"""RGB-D dataset folders: the layout interface, the registry of layouts, and detecting which layout a folder has.

A layout (MultiMAE, BTS sync, TUM, a plugin's ...) is one :class:`Layout` subclass decorated with
:func:`register_layout`: mmtk's own are the files of ``mmtk/data/sources/layouts/``, a plugin file
(``--plugin FILE.py``) adds more. :func:`open_rgbd_source` asks every registered layout whether ``src`` holds it,
in registration order (mmtk's in :data:`mmtk.data.sources.layouts.DETECTION_ORDER`, then plugins'), and returns
the one match's :class:`RgbdSource`, whose ``frames()`` generator streams :class:`Frame` objects in metres (one
frame in memory at a time). No match, or several, is a one-line error listing the layouts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar

from mmtk.data.sources.depth_encoding import DEPTH_SUFFIXES
from mmtk.data.sources.frame import ConvertOptions, RgbdSource
from mmtk.data.sources.image_files import IMAGE_SUFFIXES
from mmtk.errors import MmtkError
from mmtk.plugins import record_registration

UNREAD_FRAME_SUFFIXES = {".gif": "GIF files (256 colours of 8 bits, no 16-bit depth)"}


class Layout:
    """How an RGB-D dataset lays out its frames on disk: recognised by :meth:`detect`, read by :meth:`open`.

    Subclasses set ``name`` (what ``--layout NAME`` takes) and ``description`` (one line: what a folder of the
    layout holds, listed when no layout matches), and are registered with :func:`register_layout`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    reads_a_file: ClassVar[bool] = False  # whether ``src`` may be a file; layouts of folders are asked of folders only

    def detect(self, src: Path) -> str | None:
        """The evidence that ``src`` (a folder or file) holds this layout, in a few words shown to the user, or
        None. Cheap: it looks at names, not at pixels."""
        raise NotImplementedError

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        """Plan reading ``src`` (pair its files, read its units and camera) and return the frame stream; a folder
        that cannot be read raises MmtkError in one line."""
        raise NotImplementedError


_LAYOUTS: dict[str, Layout] = {}
_ORIGINS: dict[str, str] = {}  # layout -> "mmtk" or "file:<plugin path>"


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: make a :class:`Layout` detectable and available as ``--layout NAME``."""
    _load_layouts()  # mmtk's own first: they are detected first, and their names are taken
    if not getattr(cls, "name", "") or not getattr(cls, "description", ""):
        raise MmtkError(f"layout class {cls.__name__} needs a name and a description (class attributes)")
    if cls.name in _LAYOUTS:
        raise MmtkError(f"layout {cls.name!r} is already registered (from {_ORIGINS[cls.name]}); give "
                        f"{cls.__name__} another name")
    _LAYOUTS[cls.name] = cls()
    _ORIGINS[cls.name] = record_registration(cls.name)
    return cls


def _load_layouts() -> None:
    """Register mmtk's own layouts (once; imported by name, as mmtk.modality imports the adapters)."""
    importlib.import_module("mmtk.data.sources.layouts")


def list_layouts() -> dict[str, str]:
    """Registered layouts, name -> description, in detection order."""
    _load_layouts()
    return {name: layout.description for name, layout in _LAYOUTS.items()}


def open_rgbd_source(src: str | Path, options: ConvertOptions | None = None) -> RgbdSource:
    """Detect the layout of ``src`` (or take ``options.layout``) and prepare a frame stream.

    Each layout's detector states its evidence, which the source's notes repeat. No layout, or more than
    one, raises MmtkError (the latter listing the candidates, one per line, and ``--layout``).
    """
    options = options or ConvertOptions()
    src = Path(src)
    if not src.exists():
        raise MmtkError(f"{src} does not exist")
    _load_layouts()
    if options.layout is not None and options.layout not in _LAYOUTS:
        raise MmtkError(f"--layout {options.layout!r} is unknown; use one of {', '.join(_LAYOUTS)}")
    names = [options.layout] if options.layout else list(_LAYOUTS)
    asked = [_LAYOUTS[name] for name in names if src.is_dir() or _LAYOUTS[name].reads_a_file]
    found = {layout.name: evidence for layout in asked if (evidence := layout.detect(src))}
    if options.layout and not found:
        raise MmtkError(f"--layout {options.layout}: {src} does not hold that layout "
                        f"({_LAYOUTS[options.layout].description})")
    if not found:
        _refuse_unread_frames(src)
        supported = "".join(f"\n  {name}: {layout.description}" for name, layout in _LAYOUTS.items())
        raise MmtkError(f"cannot tell the layout of {src}; the supported layouts, one per line:{supported}")
    if len(found) > 1:
        listing = "\n".join(f"  {name}: {evidence}" for name, evidence in found.items())
        raise MmtkError(f"{src} matches {len(found)} layouts; pick one with --layout NAME:\n{listing}")
    name, evidence = next(iter(found.items()))
    source = _LAYOUTS[name].open(src, options)
    source.notes.insert(0, f"layout evidence: {evidence}")
    return source


def _refuse_unread_frames(src: Path) -> None:
    """Where no layout matched because the frames are in an image format mmtk does not read, say so."""
    files = src.rglob("*") if src.is_dir() else iter(())
    first = next((path for path in files if path.suffix.lower() in UNREAD_FRAME_SUFFIXES), None)
    if first is not None:
        raise MmtkError(f"{src} holds {UNREAD_FRAME_SUFFIXES[first.suffix.lower()]} (e.g. {first.relative_to(src)}), "
                        f"which mmtk does not read as frames; convert them to colour "
                        f"{'/'.join(IMAGE_SUFFIXES)} and depth {'/'.join(DEPTH_SUFFIXES)} files first")
