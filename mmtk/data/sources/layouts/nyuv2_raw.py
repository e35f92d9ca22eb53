"""NYUv2 raw Kinect dumps: ``r-TIME-N.ppm`` colour + ``d-TIME-N.pgm`` raw disparity, one scene folder or a folder
of them; depth registered to the colour image with the NYU Depth v2 calibration (:mod:`mmtk.data.sources.kinect_nyu`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from mmtk.data.sources.depth_encoding import DepthEncoding, read_depth
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.image_files import read_rgb
from mmtk.data.sources.intrinsics import find_intrinsics
from mmtk.data.sources.kinect_nyu import kinect_registration
from mmtk.data.sources.layouts.depth_units import layout_checked
from mmtk.data.sources.layouts.frame_files import report_unpaired
from mmtk.errors import MmtkError


_NYU_RAW_NAME = re.compile(r"^([rd])-(\d+(?:\.\d+)?)-\d+\.(ppm|pgm)$")  # r-1294439283.377657-2857868057.ppm
NYU_RAW_DEPTH = DepthEncoding("kinect-disparity")
NYU_RAW_MAX_DT_S = 1 / 30  # one Kinect frame period: a farther colour frame shows another moment


@register_layout
class NyuRaw(Layout):
    name = "nyuv2-raw"
    description = "NYUv2 raw Kinect dumps: r-TIME-N.ppm + d-TIME-N.pgm (disparity), one scene or scene folders"

    def detect(self, src: Path) -> str | None:
        scenes = _nyu_raw_scenes(src)
        if not scenes:
            return None
        example = next(iter(_nyu_raw_files(scenes[0])[1].values()))
        return f"{len(scenes)} raw Kinect dump(s) of r-*.ppm and d-*.pgm files (e.g. {example.relative_to(src)})"

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        encoding = options.encoding(NYU_RAW_DEPTH)
        if encoding.format != NYU_RAW_DEPTH.format:
            raise MmtkError(f"{src}: NYUv2 raw dumps hold raw Kinect disparity, but the depth was given as "
                            f"{encoding.text}; drop --depth-format/--depth-scale, or rename the files for --layout paired")
        notes = ["pairs: each depth frame with the nearest colour frame in time (the NYU toolbox's "
                 "get_synched_frames.m); accelerometer a-*.dump files are not converted"]
        scenes = _nyu_raw_scenes(src)
        rows = [row for scene in scenes for row in _nyu_raw_pairs(scene, notes)]
        if not rows:
            raise MmtkError(f"{src}: no depth frame has a colour frame within {NYU_RAW_MAX_DT_S * 1000:.0f} ms")
        cameras = [camera for folder in dict.fromkeys([src, *scenes]) if (camera := find_intrinsics(folder))]
        register = kinect_registration(src, cameras[0] if cameras else None, notes)

        def frames() -> Iterator[Frame]:
            for stamp, colour, depth in rows:
                arrays = register({"rgb": read_rgb(colour), "depth": read_depth(depth, encoding)}, depth.relative_to(src))
                yield Frame("all", arrays, register.calibration.rgb_matrix.astype(np.float32), stamp,
                            str(depth.relative_to(src)))

        frames = layout_checked(frames, options, encoding)
        return RgbdSource("nyuv2-raw", f"NYUv2 raw Kinect dumps (depth {encoding.text})", len(rows), frames, None, notes)


def _nyu_raw_files(folder: Path) -> tuple[dict[float, Path], dict[float, Path]]:
    """Colour (r-*.ppm) and depth (d-*.pgm) files of one raw scene dump by their time (s, from the name)."""
    found: dict[str, dict[float, Path]] = {"r": {}, "d": {}}
    for path in sorted(folder.iterdir()):
        match = _NYU_RAW_NAME.match(path.name)
        if match and path.is_file() and (match[1], match[3]) in (("r", "ppm"), ("d", "pgm")):
            found[match[1]][float(match[2])] = path
    return found["r"], found["d"]


def _nyu_raw_scenes(src: Path) -> list[Path]:
    """``src`` itself when it is one scene dump, else its sub-folders that are."""
    if all(_nyu_raw_files(src)):
        return [src]
    return [sub for sub in sorted(src.iterdir()) if sub.is_dir() and all(_nyu_raw_files(sub))]


def _nyu_raw_pairs(scene: Path, notes: list[str]) -> list[tuple[float, Path, Path]]:
    """(depth time, colour, depth) per depth frame with the nearest colour frame in time, as the NYU toolbox's
    get_synched_frames.m pairs them (a colour frame may serve two depth frames), within one frame period."""
    colour, depth = _nyu_raw_files(scene)
    colour_t = np.array(sorted(colour))
    rows, far = [], []
    for t, path in sorted(depth.items()):
        after = int(np.searchsorted(colour_t, t))
        nearest = min((colour_t[i] for i in (after - 1, after) if 0 <= i < len(colour_t)), key=lambda c: abs(c - t))
        if abs(nearest - t) <= NYU_RAW_MAX_DT_S:
            rows.append((t, colour[nearest], path))
        else:
            far.append(path.name)
    report_unpaired(notes, f"depth frames in {scene.name}/ without a colour frame within "
                            f"{NYU_RAW_MAX_DT_S * 1000:.0f} ms", far)
    return rows
