"""Finding a folder layout's frame files: files by stem, the split a path names, folders by name, and the notes
that list files left unpaired."""

from __future__ import annotations

from pathlib import Path

from mmtk.data.sources.depth_encoding import DEPTH_SUFFIXES
from mmtk.data.sources.image_files import IMAGE_SUFFIXES

LABEL_DIRS = ("label", "labels", "semseg")


def report_unpaired(notes: list[str], what: str, names: list[str]) -> None:
    """Add a note listing (the first five of) ``names``, files skipped because they lack a partner."""
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"skipped {len(names)} {what}: {shown}")


def split_of(parts: tuple[str, ...]) -> str:
    """The split a relative path names: a train folder -> "train", test/val/validation -> "test", else "all"."""
    lowered = [p.lower() for p in parts]
    if "train" in lowered:
        return "train"
    if any(p in ("test", "val", "validation") for p in lowered):
        return "test"
    return "all"


def files_by_stem(folder: Path) -> dict[str, Path]:
    """The image and depth files of ``folder`` by file stem (none when it is not a folder)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in {*IMAGE_SUFFIXES, *DEPTH_SUFFIXES}}


def child_folder(src: Path, names: tuple[str, ...]) -> Path | None:
    """The first sub-folder of ``src`` whose lower-case name is one of ``names``."""
    for path in sorted(src.iterdir()) if src.is_dir() else []:
        if path.is_dir() and path.name.lower() in names:
            return path
    return None


def note_unread_labels(src: Path, layout: str, notes: list[str]) -> None:
    """For a layout without labels: say that a labels folder beside its frames is not converted, and how to."""
    if (labels := child_folder(src, LABEL_DIRS)) is not None:
        notes.append(f"NOT converted: labels in {labels.name}/ (the {layout} layout has none; name the "
                     f"frames alike and pass --layout paired to keep them)")
