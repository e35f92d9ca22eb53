"""The TUM RGB-D layout: ``rgb/`` and ``depth/`` named by time stamp (depth 5000 units/m), paired by
``associations.txt`` or by nearest stamp."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from mmtk.data.sources.depth_encoding import FORMAT_UNITS, DepthEncoding, read_depth_kept
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.image_files import IMAGE_SUFFIXES, read_colour
from mmtk.data.sources.intrinsics import find_intrinsics, frame_intrinsics
from mmtk.data.sources.layouts.depth_units import layout_checked
from mmtk.data.sources.layouts.frame_files import note_unread_labels, report_unpaired
from mmtk.data.sources.pairing import associate_by_time
from mmtk.errors import MmtkError

TUM_DEPTH = DepthEncoding("tum", FORMAT_UNITS["tum"])
TUM_MAX_DT_S = 0.02  # TUM's associate.py default


_TIMESTAMP = re.compile(r"^\d+(\.\d+)?$")
_UNIX_TIME = re.compile(r"^\d{9,}\.\d+$")  # what TUM names its frames: seconds since 1970 with a fraction
_TUM_LISTS = ("associations.txt", "rgb.txt", "depth.txt")


@register_layout
class Tum(Layout):
    name = "tum"
    description = "TUM RGB-D: rgb/ and depth/ with timestamp names (depth 5000/m), optional associations.txt"

    def detect(self, src: Path) -> str | None:
        """TUM: rgb/ and depth/ with numeric names, and either TUM's list files or Unix-time names (0000.png
        is a frame number, not a time)."""
        rgb, depth = _timestamped(src / "rgb"), _timestamped(src / "depth")
        if not rgb or not depth:
            return None
        lists = [name for name in _TUM_LISTS if (src / name).is_file()]
        if lists:
            return f"rgb/ and depth/ with numeric names and {', '.join(lists)}"
        first = next(iter(rgb.values()))
        if all(_UNIX_TIME.match(p.stem) for p in (*rgb.values(), *depth.values())):
            return f"rgb/ and depth/ named by Unix time (e.g. rgb/{first.name})"
        return None

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        encoding = options.encoding(TUM_DEPTH)
        notes: list[str] = []
        intrinsics = find_intrinsics(src)
        if intrinsics is not None:
            notes.append(f"intrinsics from {intrinsics.path.name}")
        assoc = src / "associations.txt"
        if assoc.is_file():
            rows = _read_associations(assoc, src)
            notes.append(f"pairs from {assoc.name}")
        else:
            rgb, depth = _timestamped(src / "rgb"), _timestamped(src / "depth")
            rgb_t, depth_t = sorted(rgb), sorted(depth)
            pairs = associate_by_time(rgb_t, depth_t, TUM_MAX_DT_S)
            rows = [(rgb_t[i], rgb[rgb_t[i]], depth[depth_t[j]]) for i, j in pairs]
            paired_rgb, paired_depth = {i for i, _ in pairs}, {j for _, j in pairs}
            notes.append(f"pairs by nearest timestamp within {TUM_MAX_DT_S * 1000:g} ms (no associations.txt)")
            report_unpaired(notes, "rgb frames without depth", [rgb[t].name for k, t in enumerate(rgb_t) if k not in paired_rgb])
            report_unpaired(notes, "depth frames without rgb", [depth[t].name for k, t in enumerate(depth_t) if k not in paired_depth])
        if not rows:
            raise MmtkError(f"{src}: no rgb frame has a depth frame within {TUM_MAX_DT_S * 1000:g} ms")

        def frames() -> Iterator[Frame]:
            for stamp, rgb_path, depth_path in rows:
                arrays = {"rgb": read_colour(rgb_path), "depth": read_depth_kept(depth_path, encoding)}
                yield Frame("all", arrays, frame_intrinsics(intrinsics, arrays["rgb"]), stamp,
                            str(rgb_path.relative_to(src)))

        frames = layout_checked(frames, options, encoding)
        note_unread_labels(src, self.name, notes)
        return RgbdSource("tum", f"TUM RGB-D folder (depth {encoding.text})", len(rows), frames, None, notes)


def _timestamped(folder: Path) -> dict[float, Path]:
    out = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES and _TIMESTAMP.match(path.stem):
            out[float(path.stem)] = path
    return out


def _read_associations(path: Path, src: Path) -> list[tuple[float, Path, Path]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        if len(fields) < 4:
            raise MmtkError(f"{path}:{number}: expected 'time rgb/file time depth/file', got {line!r}")
        first, second = src / fields[1], src / fields[3]
        rgb_path, depth_path = (first, second) if "depth" not in fields[1] else (second, first)
        try:
            stamp = float(fields[0] if rgb_path is first else fields[2])
        except ValueError:
            raise MmtkError(f"{path}:{number}: the time stamps must be numbers (seconds), got {line!r}") from None
        rows.append((stamp, rgb_path, depth_path))
    return rows
