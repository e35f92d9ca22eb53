"""Depth units of a folder layout: checking frames read with a layout's (or a guessed) encoding against the
sensor range, and the refusal's hint of which other units would fit.

A layout reads depth with its own encoding (MultiMAE's 1/6553.6 m, BTS's millimetres, ...) unless the user gave
``--depth-format``/``--depth-scale``; units the user did not give are checked frame by frame against
``--depth-range``, so a wrong guess is refused in one line instead of becoming a dataset in the wrong units.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from mmtk.data.codecs import plain
from mmtk.data.sources.depth_encoding import DEPTH_FORMATS, FORMAT_UNITS, DepthEncoding, decode_depth
from mmtk.data.sources.frame import ConvertOptions, Frame
from mmtk.data.values import Percentiles, check_plausible_metres, depth_percentiles
from mmtk.errors import MmtkError


def checked_frames(frames: Callable[[], Iterator[Frame]], options: ConvertOptions, guessed: bool,
                   fix: str) -> Callable[[], Iterator[Frame]]:
    """``frames`` with every frame's depth checked against the sensor range when the units were not given."""
    if not guessed:
        return frames

    def checked() -> Iterator[Frame]:
        for frame in frames():
            check_plausible_metres("depth", plain(frame.arrays["depth"]), frame.frame_id, options.depth_range, fix)
            yield frame

    return checked


def units_given(options: ConvertOptions) -> bool:
    """Whether the user gave the depth units (--depth-format or --depth-scale)."""
    return options.depth_scale is not None or options.depth_format is not None


def layout_checked(frames: Callable[[], Iterator[Frame]], options: ConvertOptions,
                   encoding: DepthEncoding) -> Callable[[], Iterator[Frame]]:
    """``frames`` of a layout with its own depth units: checked against the sensor range unless the user gave
    the units."""
    return checked_frames(frames, options, not units_given(options),
                          units_fix(None, encoding, "the layout's units", options))


Decodings = dict[DepthEncoding, tuple[np.ndarray, Percentiles | None]]


def decodings(raw: np.ndarray) -> Decodings:
    """A frame's stored depth read by every named format that can read it, in metres, with its percentiles
    (computed once here, for the units guess, the refusal's hint and the first frame's check)."""
    decoded = {}
    for name in DEPTH_FORMATS:
        encoding = DepthEncoding(name, FORMAT_UNITS.get(name))
        try:
            depth = decode_depth(raw, encoding, "")
        except MmtkError:
            continue
        decoded[encoding] = (depth, depth_percentiles(depth))
    return decoded


def units_fix(decoded: Decodings | None, encoding: DepthEncoding, how: str, options: ConvertOptions) -> str:
    """The end of a refusal: what the units were taken as, which formats (of the first frame's ``decoded``)
    would be plausible, the flags."""
    plausible = [f"{other.format} gives median {reading_median(reading):.2f} m"
                 for other, reading in (decoded or {}).items()
                 if other.format != encoding.format and reading_plausible(reading, options.depth_range)]
    hint = f" ({'; '.join(plausible)})" if plausible else ""
    return (f"depth read as {encoding.text} ({how}); pass --depth-format {'|'.join(DEPTH_FORMATS)}{hint} or "
            f"--depth-scale UNITS_PER_METRE, or --depth-range outdoor|lidar|MIN-MAX for another sensor")


def reading_plausible(decoding: tuple[np.ndarray, Percentiles | None] | None, depth_range: tuple[float, float]) -> bool:
    """Whether one reading of a frame (depth, percentiles) passes the sensor range check."""
    if decoding is None or decoding[1] is None:
        return False
    try:
        check_plausible_metres("depth", decoding[0], "", depth_range, stats=decoding[1])
    except MmtkError:
        return False
    return True


def reading_median(decoding: tuple[np.ndarray, Percentiles | None] | None) -> float:
    """The median (m) of one reading of a frame, 0 when it has no valid depth."""
    return decoding[1][1] if decoding is not None and decoding[1] is not None else 0.0
