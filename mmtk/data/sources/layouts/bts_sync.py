"""The BTS "sync" layout: ``rgb_XXXXX.jpg`` + ``sync_depth_XXXXX.png`` (uint16 millimetres), NYUv2 raw frames
registered to the colour camera."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from mmtk.data.sources.depth_encoding import FORMAT_UNITS, DepthEncoding, read_depth_kept
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.image_files import read_colour
from mmtk.data.sources.layouts.depth_units import layout_checked
from mmtk.data.sources.layouts.frame_files import note_unread_labels, report_unpaired, split_of
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics
from mmtk.errors import MmtkError

BTS_DEPTH = DepthEncoding("mm", FORMAT_UNITS["mm"])


_BTS_RGB = re.compile(r"^rgb_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_BTS_DEPTH = re.compile(r"^sync_depth_(\d+)\.png$", re.IGNORECASE)


def _bts_key(path: Path, src: Path, number: str) -> tuple[str, str]:
    parts = [p for p in path.parent.relative_to(src).parts if p.lower() not in ("rgb", "depth")]
    return "/".join(parts), number


@register_layout
class BtsSync(Layout):
    name = "bts-sync"
    description = "BTS/sync: rgb_XXXXX.jpg + sync_depth_XXXXX.png (uint16 mm)"

    def detect(self, src: Path) -> str | None:
        first = next(src.rglob("sync_depth_*.png"), None)
        return f"sync_depth_*.png files (e.g. {first.relative_to(src)})" if first else None

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        encoding = options.encoding(BTS_DEPTH)
        rgb, depth = {}, {}
        for path in sorted(src.rglob("*")):
            if (m := _BTS_RGB.match(path.name)):
                rgb[_bts_key(path, src, m.group(1))] = path
            elif (m := _BTS_DEPTH.match(path.name)):
                depth[_bts_key(path, src, m.group(1))] = path
        common = sorted(set(rgb) & set(depth))
        notes: list[str] = []
        report_unpaired(notes, "rgb files without sync_depth",
                        [str(rgb[k].relative_to(src)) for k in sorted(set(rgb) - set(depth))])
        report_unpaired(notes, "depth files without rgb",
                        [str(depth[k].relative_to(src)) for k in sorted(set(depth) - set(rgb))])
        if not common:
            raise MmtkError(f"{src}: no rgb_XXXXX.jpg has a matching sync_depth_XXXXX.png")
        notes.append("intrinsics: NYUv2 RGB camera (BTS sync frames are NYUv2 raw frames registered to RGB)")

        def frames() -> Iterator[Frame]:
            for key in common:
                image = read_colour(rgb[key])
                d = read_depth_kept(depth[key], encoding)
                k = nyuv2_intrinsics() if image.shape[:2] == (480, 640) else None
                yield Frame(split_of(rgb[key].relative_to(src).parts), {"rgb": image, "depth": d}, intrinsics=k,
                            frame_id=str(rgb[key].relative_to(src)))

        frames = layout_checked(frames, options, encoding)
        note_unread_labels(src, self.name, notes)
        return RgbdSource("bts-sync", f"BTS sync layout (depth {encoding.text})", len(common), frames, None, notes)
