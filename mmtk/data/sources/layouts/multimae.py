"""The MultiMAE prepared layout: ``{train,test,val}/{rgb,depth[,semseg]}/data/NNNN.png``, depth uint16 at
6553.6 units/m, labels as NYUv2 40-class ids (0 = unlabeled)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from mmtk.data.sources.depth_encoding import FORMAT_UNITS, DepthEncoding, read_depth_kept
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.image_files import read_colour, read_image
from mmtk.data.sources.layouts.depth_units import layout_checked
from mmtk.data.sources.layouts.frame_files import files_by_stem, report_unpaired
from mmtk.data.sources.nyuv2_meta import nyuv2_meta
from mmtk.errors import MmtkError

MULTIMAE_DEPTH = DepthEncoding("multimae", FORMAT_UNITS["multimae"])  # uint16: 10 m -> 65536


def _label_space(classes: int) -> tuple[list[str], np.ndarray | None]:
    """The class names of ``--classes`` and the map from MultiMAE's 40-class ids to them (None: kept as they are)."""
    meta = nyuv2_meta()
    if classes == 13:
        return list(meta["names13"]), np.asarray(meta["map40_to_13"], np.uint8)
    if classes == 40:
        return list(meta["names40"]), None
    raise MmtkError("MultiMAE's layout holds 40-class labels; use --classes 40 or 13")


@register_layout
class MultiMAE(Layout):
    name = "multimae"
    description = "MultiMAE prepared: {train,test}/{rgb,depth[,semseg]}/data/NNNN.png (depth uint16, 6553.6/m)"

    def detect(self, src: Path) -> str | None:
        splits = [s for s in ("train", "test", "val") if (src / s / "rgb" / "data").is_dir()]
        return f"{', '.join(f'{s}/rgb/data/' for s in splits)} folders" if splits else None

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        encoding = options.encoding(MULTIMAE_DEPTH)
        notes: list[str] = []
        plan: list[tuple[str, Path, Path, Path | None]] = []
        with_labels: set[bool] = set()
        for folder in ("train", "val", "test"):
            root = src / folder
            if not (root / "rgb" / "data").is_dir():
                continue
            split = "train" if folder == "train" else "test"
            rgb, depth = files_by_stem(root / "rgb" / "data"), files_by_stem(root / "depth" / "data")
            semseg = files_by_stem(root / "semseg" / "data")
            has_semseg = (root / "semseg" / "data").is_dir()
            with_labels.add(has_semseg)
            needed = [rgb, depth] + ([semseg] if has_semseg else [])
            common = sorted(set.intersection(*(set(d) for d in needed)))
            if not common:
                raise MmtkError(f"{root}: split {folder!r} has no frame with rgb and depth"
                                f"{' and semseg' if has_semseg else ''} of the same name; the split would be empty")
            for name, files in (("rgb", rgb), ("depth", depth), ("semseg", semseg)):
                report_unpaired(notes, f"{folder}/{name} files without all other modalities",
                                 sorted(set(files) - set(common)))
            plan += [(split, rgb[s], depth[s], semseg.get(s) if has_semseg else None) for s in common]
        classes, label_map = _label_space(options.classes) if True in with_labels else (None, None)
        if classes is not None:
            notes.append(f"semseg PNGs read as NYUv2 40-class ids (0 = unlabeled) -> {len(classes)} classes")

        def frames() -> Iterator[Frame]:
            for split, rgb_path, depth_path, label_path in plan:
                rgb = read_colour(rgb_path)
                depth = read_depth_kept(depth_path, encoding)
                semseg = None
                if label_path is not None:
                    semseg = read_image(label_path)
                    if semseg.ndim == 3:
                        semseg = semseg[..., 0]
                    if label_map is not None:
                        if semseg.max(initial=0) >= label_map.size:
                            raise MmtkError(f"{label_path}: label {semseg.max()} is beyond the 40-class map")
                        semseg = label_map[semseg]
                arrays = {"rgb": rgb, "depth": depth} | ({"semseg": semseg} if semseg is not None else {})
                yield Frame(split, arrays, frame_id=str(rgb_path.relative_to(src)))

        frames = layout_checked(frames, options, encoding)
        return RgbdSource("multimae", f"MultiMAE prepared layout (depth {encoding.text})", len(plan), frames,
                          classes, notes)
