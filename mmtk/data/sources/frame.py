"""What every data source yields: a Frame, the user's reading options and a detected source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from mmtk.data.codecs import FrameArray
from mmtk.data.sources.depth_encoding import DEPTH_RANGES, DepthEncoding, encoding_for


@dataclass(frozen=True)
class MessageHeader:
    """The header of the message a frame was read from, as recorded (a ROS bag's colour image): its stamp (0 when
    the publisher never set it), its coordinate frame, and when the recorder logged it. A prediction of the frame
    is stamped and framed with it."""

    stamp_ns: int
    frame_id: str
    log_time_ns: int


@dataclass
class Frame:
    """One frame as a source yields it, in mmtk units or as the source got it.

    ``arrays`` maps stored array names to images of one size: "rgb" uint8 [H, W, 3], "depth" float32 [H, W]
    metres (0 = invalid), optional "depth_raw" (metres), "semseg" [H, W] (0 = unlabeled), and any further
    stream a source was asked for ("ir": ...). Each name is stored by a modality adapter, which validates it
    when the frame is written. Plus intrinsics [3, 3] (pixels, 0-based), timestamp (s, what the source paired by),
    frame_id (the frame's name in its source) and, from a bag, the colour message's ``header``.
    A source hands over what it got, so the file keeps it losslessly: colour a file or message holds as JPEG as
    :class:`~mmtk.data.codecs.Encoded` bytes (:func:`read_colour`), depth a file holds as integers with a scale
    as :class:`~mmtk.data.codecs.Quantized` (:func:`keep_depth`); ``mmtk.data.codecs.plain`` gives the numbers.
    """

    split: str
    arrays: dict[str, FrameArray]
    intrinsics: np.ndarray | None = None
    timestamp: float | None = None
    frame_id: str | None = None
    header: MessageHeader | None = None


@dataclass
class ConvertOptions:
    """User choices that affect reading: label space, depth units, plausible depth range, layout."""

    classes: int = 40
    depth_scale: float | None = None  # stored units per metre; None = the layout's own
    depth_format: str | None = None  # a DEPTH_FORMATS name; None = the layout's own
    depth_range: tuple[float, float] = DEPTH_RANGES["indoor"]  # metres, checked where units are guessed
    layout: str | None = None  # a layout name; None = detect

    def encoding(self, default: DepthEncoding) -> DepthEncoding:
        """The depth encoding to read with: the user's choice, else the layout's ``default``."""
        return encoding_for(self.depth_format, self.depth_scale, default)


@dataclass
class RgbdSource:
    """A detected source: what it is, how many frames (at most), class names, notes for the user, a frame stream,
    and what to tell the user once ``n`` frames were written (sources that learn it while streaming)."""

    layout: str
    description: str
    total: int
    frames: Callable[[], Iterator[Frame]]
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    summary: Callable[[int], str] | None = None
    decode_apart: bool = True  # decode in a second process (convert.read_ahead); False where moving a frame

