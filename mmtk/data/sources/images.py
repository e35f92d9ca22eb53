"""Folders of RGB images alone (flat, class folders, or train/ val/ test/ above them) -> RGB-only mmtk files.

Depth and semantics can be added afterwards with `mmtk pseudo-label`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmtk.data.sources.image_files import IMAGE_SUFFIXES, encoded_colour
from mmtk.errors import MmtkError
from mmtk.progress import frame_bar

if TYPE_CHECKING:
    from PIL import Image

SPLIT_FOLDERS = {"train": "train", "val": "test", "test": "test"}


@dataclass
class ImagesResult:
    """What ``convert_images`` wrote: frames per split, frame size (H, W), files skipped as unreadable."""

    frames: dict[str, int]
    size: tuple[int, int]
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


def fit_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize so the image covers (H, W) keeping its aspect ratio, then centre-crop: uint8 [H, W, 3]."""
    from PIL import Image

    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return np.array(resized.crop((left, top, left + width, top + height)))


def convert_images(root: str | os.PathLike, out: str | os.PathLike, size: tuple[int, int] | None = None,
                   force: bool = False, progress: bool = True, jpeg_quality: int | None = None) -> ImagesResult:
    """Write the RGB images under ``root`` to an mmtk HDF5 file (RGB only; see :func:`list_images`).

    Every frame gets the size ``size`` (default: the first readable image's) by resize-to-cover and centre
    crop. Unreadable files are skipped and listed; the output appears only once complete (H5Writer). A JPEG that
    already has that size is stored as its own bytes; other images losslessly, or as JPEG at ``jpeg_quality``.
    """
    from PIL import Image, UnidentifiedImageError

    from mmtk.data import H5Writer

    root = Path(root)
    if not root.is_dir():
        raise MmtkError(f"{root}: no such folder of images")
    images = list_images(root)
    total = sum(len(files) for files in images.values())
    if total == 0:
        raise MmtkError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    skipped: list[str] = []
    with H5Writer(out, source=f"images from {root.resolve()}", force=force, jpeg_quality=jpeg_quality) as writer, \
            frame_bar("images", total, progress) as advance:
        for split, files in images.items():
            for path, frame_id in files:
                advance(1)
                try:
                    with Image.open(path) as image:
                        rgb_image = image.convert("RGB")
                    encoded = encoded_colour(path.read_bytes(), path)
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                    skipped.append(str(path))
                    continue
                size = size or (rgb_image.height, rgb_image.width)
                kept = encoded is not None and encoded.shape[:2] == tuple(size)  # the JPEG as it is, no resampling
                writer.add_frame(split, {"rgb": encoded if kept else fit_image(rgb_image, size)}, frame_id=frame_id)
    return ImagesResult(writer.frame_counts, tuple(size), skipped)
