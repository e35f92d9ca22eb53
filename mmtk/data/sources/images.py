"""Folders of RGB images alone (flat, class folders, or train/ val/ test/ above them): a source of RGB-only frames,
written like every source's by :func:`mmtk.data.convert.convert_images`.

Depth and semantics can be added afterwards with `mmtk pseudo-label`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.data.sources.image_files import IMAGE_SUFFIXES, read_colour
from mmtk.errors import MmtkError

SPLIT_FOLDERS = {"train": "train", "val": "test", "test": "test"}


@dataclass
class ImageFolder:
    """A folder of RGB images as a frame source, the size its frames are stored at unless another is given (the
    first readable image's, H x W) and the files skipped as unreadable (filled while the frames are read)."""

    source: RgbdSource
    first_size: tuple[int, int]
    skipped: list[str]


def list_images(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """Images under ``root`` per split, each with its frame id (path relative to the split folder).

    ``root/{train,val,test}/...`` become the train/test splits (val -> test); otherwise everything is
    ``train``. Below a split, images may sit flat or in class folders (ImageNet style): the class folder
    is kept in the frame id ("<class>/<file>"). Files are sorted for a reproducible order.
    """
    splits = {name: root / name for name in SPLIT_FOLDERS if (root / name).is_dir()}
    if not splits:
        splits = {"train": root}
    found: dict[str, list[tuple[Path, str]]] = {}
    for folder_name, folder in splits.items():
        split = SPLIT_FOLDERS[folder_name] if folder != root else "train"
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        found.setdefault(split, []).extend((p, p.relative_to(folder).as_posix()) for p in files)
    return {split: files for split, files in found.items() if files}


def open_image_folder(root: str | os.PathLike) -> ImageFolder:
    """The RGB images under ``root`` as a frame source (RGB only; see :func:`list_images`).

    A JPEG of 8-bit RGB is handed over as its own bytes (stored as they are when no resize is needed), any other
    image decoded to RGB. Unreadable files are skipped and listed in the result's ``skipped`` as the frames are
    read (in this process: the source is not decoded apart).
    """
    root = Path(root)
    if not root.is_dir():
        raise MmtkError(f"{root}: no such folder of images")
    images = list_images(root)
    total = sum(len(files) for files in images.values())
    if total == 0:
        raise MmtkError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    skipped: list[str] = []

    def frames() -> Iterator[Frame]:
        for split, files in images.items():
            for path, frame_id in files:
                try:
                    rgb = read_colour(path)
                except MmtkError:
                    skipped.append(str(path))
                    continue
                yield Frame(split, {"rgb": rgb}, frame_id=frame_id)

    source = RgbdSource("images", f"images from {root.resolve()}", total, frames, decode_apart=False)
    return ImageFolder(source, _first_size(root, images), skipped)


def _first_size(root: Path, images: dict[str, list[tuple[Path, str]]]) -> tuple[int, int]:
    """(H, W) of the first readable image, the size an image folder is stored at unless one is given."""
    for files in images.values():
        for path, _ in files:
            with contextlib.suppress(MmtkError):
                return tuple(read_colour(path).shape[:2])
    raise MmtkError(f"{root}: none of its image files can be read (e.g. {next(iter(images.values()))[0][0]}); "
                    f"re-export them as PNG or JPEG")
