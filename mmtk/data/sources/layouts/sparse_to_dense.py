"""The sparse-to-dense layout: ``*.h5`` files, each one frame with ``rgb`` uint8 [3, H, W] and ``depth`` [H, W] in
metres."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from mmtk.data.format import check_dataset_size
from mmtk.data.sources.depth_encoding import DepthEncoding, decode_depth
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.layouts.depth_units import layout_checked
from mmtk.data.sources.layouts.frame_files import note_unread_labels, split_of
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics
from mmtk.errors import MmtkError


@register_layout
class SparseToDense(Layout):
    name = "sparse-to-dense"
    description = "sparse-to-dense: *.h5 files with rgb [3,H,W] and depth [H,W] in metres"

    def detect(self, src: Path) -> str | None:
        first = next((p for p in sorted(src.rglob("*.h5"))), None)
        if first is None:
            return None
        evidence = f"*.h5 files with rgb and depth datasets (e.g. {first.relative_to(src)})"
        try:
            with h5py.File(first, "r") as handle:
                return evidence if "rgb" in handle and "depth" in handle and "mmtk_format" not in handle.attrs else None
        except OSError:
            return evidence  # looks like this layout; the corrupt file is reported while reading

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        encoding = options.encoding(DepthEncoding())  # stored in metres already
        files = sorted(src.rglob("*.h5"))

        def frames() -> Iterator[Frame]:
            for path in files:
                try:
                    with h5py.File(path, "r") as handle:
                        for key in ("rgb", "depth"):  # declared sizes, before memory follows them
                            check_dataset_size(handle[key], f"{path}:{key}", "re-export the file")
                        rgb, depth_units = handle["rgb"][()], handle["depth"][()]
                except (OSError, KeyError) as err:
                    raise MmtkError(f"{path} is corrupt, truncated or lacks rgb/depth ({err})") from None
                if rgb.ndim == 3:
                    rgb = np.ascontiguousarray(np.transpose(rgb, (1, 2, 0)))
                if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                    raise MmtkError(f"{path}: rgb is {rgb.dtype} {rgb.shape}, expected uint8 [3, H, W]")
                depth = decode_depth(depth_units, encoding, path)
                k = nyuv2_intrinsics() if rgb.shape[:2] == (480, 640) else None
                yield Frame(split_of(path.relative_to(src).parts), {"rgb": rgb, "depth": depth}, intrinsics=k,
                            frame_id=str(path.relative_to(src)))

        notes = [f"depth read as {encoding.text}", "intrinsics: NYUv2 RGB camera for 480x640 frames, none otherwise"]
        frames = layout_checked(frames, options, encoding)
        note_unread_labels(src, self.name, notes)
        return RgbdSource("sparse-to-dense", "sparse-to-dense .h5 files", len(files), frames, None, notes)
