"""Conversion driver: stream frames from a source reader into an :class:`H5Writer` with progress."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


from mmtk.data.sources.base import Frame
from mmtk.data.format import H5Writer, check_out_path
from mmtk.data.resize import resize_frame_arrays
from mmtk.errors import MmtkError
from mmtk.io import check_free_space

Log = Callable[[str], None]


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    out_path: Path
    frames: dict[str, int]
    depth_range_m: tuple[float, float]
    valid_fraction: float


def parse_size(text: str | None) -> tuple[int, int] | None:
    """Parse "HxW" (e.g. "240x320") into (H, W); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 8 or int(match.group(2)) < 8:
        raise MmtkError(f"--size {text!r} is not HxW in pixels (e.g. 240x320, each at least 8)")
    return int(match.group(1)), int(match.group(2))


def _resized(frame: Frame, size: tuple[int, int] | None) -> Frame:
    if size is None or frame.rgb.shape[:2] == size:
        return frame
    out = resize_frame_arrays(size, frame.rgb, frame.depth, frame.depth_raw, frame.semseg, frame.intrinsics)
    return Frame(frame.split, out["rgb"], out["depth"], out["depth_raw"], out["semseg"], out["intrinsics"],
                 frame.timestamp, frame.frame_id)


def _check_sizes(frame: Frame) -> None:
    size = frame.rgb.shape[:2]
    for key in ("depth", "depth_raw", "semseg"):
        value = getattr(frame, key)
        if value is not None and value.shape[:2] != size:
            raise MmtkError(f"frame {frame.frame_id}: rgb is {size[0]}x{size[1]} but {key} is "
                            f"{value.shape[0]}x{value.shape[1]}; RGB and depth must be registered at the same size")


def write_frames(frames: Iterable[Frame], out_path: str | os.PathLike, *, source: str, total: int | None,
                 classes: list[str] | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None) -> ConvertResult:
    """Write ``frames`` to ``out_path`` atomically, resizing to ``size`` (H, W) if given.

    Shows a rich progress bar (frames/s) when ``progress`` is true. Returns a summary whose depth range
    lets the caller show the user the effect of the depth units.
    """
    with H5Writer(out_path, source=source, force=force, classes=classes) as writer:
        for index, frame in enumerate(_with_progress(frames, total, progress)):
            _check_sizes(frame)
            frame = _resized(frame, size)
            if index == 0 and total:  # a full disk is refused before the write, not midway
                check_free_space(out_path, _stored_bytes(frame) * total, f"converting {total} frames")
            writer.add_frame(frame.split, rgb=frame.rgb, depth=frame.depth, depth_raw=frame.depth_raw,
                             semseg=frame.semseg, intrinsics=frame.intrinsics, timestamp=frame.timestamp,
                             frame_id=frame.frame_id)
        result = ConvertResult(Path(out_path), writer.frame_counts, *writer.depth_summary())
    if log:
        frames_text = ", ".join(f"{split} {n}" for split, n in result.frames.items())
        log(f"wrote {out_path}: {frames_text} frames; depth {result.depth_range_m[0]:.3f}-"
            f"{result.depth_range_m[1]:.3f} m, {100 * result.valid_fraction:.1f} % valid")
    return result


def _stored_bytes(frame: Frame) -> int:
    """Bytes one frame takes in the HDF5 file (uint8 rgb, float32 depth, <= 16-bit labels), plus 1 % overhead."""
    size = frame.rgb.nbytes
    size += sum(4 * d.size for d in (frame.depth, frame.depth_raw) if d is not None)
    size += 2 * frame.semseg.size if frame.semseg is not None else 0
    return int(size * 1.01) + 256


def _with_progress(frames: Iterable[Frame], total: int | None, enabled: bool) -> Iterator[Frame]:
    if not enabled:
        yield from frames
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("converting", total=total, rate="")
        for frame in frames:
            yield frame
            bar.advance(task)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f} frames/s" if speed else "")


def convert_rgbd(src: str | os.PathLike, out_path: str | os.PathLike, *, classes: int = 40,
                 depth_scale: float | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None) -> ConvertResult:
    """Convert an RGB-D dataset folder (layout auto-detected) into an mmtk HDF5 file.

    Args:
        src: folder (or NYUv2 .mat) to convert.
        out_path: the .h5 to create (never overwritten unless ``force``).
        classes: NYUv2 label space, 40, 13 or 894.
        depth_scale: stored depth units per metre, overriding the layout's (e.g. 1000 for mm).
        size: optional (H, W) to resize to on the way in.
    """
    from mmtk.data.sources.base import ConvertOptions
    from mmtk.data.sources.folders import open_rgbd_source

    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    check_out_path(out_path, force)  # before reading any input
    source = open_rgbd_source(src, ConvertOptions(classes=classes, depth_scale=depth_scale))
    if log:
        log(f"layout: {source.layout} - {source.description}; {source.total} frames")
        for note in source.notes:
            log(f"  {note}")
    provenance = f"mmtk convert --rgbd {Path(src).name}: {source.description}"
    if size:
        provenance += f", resized to {size[0]}x{size[1]}"
    return write_frames(source.frames(), out_path, source=provenance, total=source.total, classes=source.classes,
                        size=size, force=force, progress=progress, log=log)


def samples_dir() -> Path:
    """The repository's ``samples/`` folder (real frames shipped with mmtk's source checkout)."""
    folder = Path(__file__).resolve().parents[2] / "samples"
    if not folder.is_dir():
        raise MmtkError(f"{folder} not found: the demo samples ship with the mmtk source repository, not the wheel")
    return folder


def build_demo_file(out_path: str | os.PathLike, *, force: bool = False, size: tuple[int, int] | None = None,
                    progress: bool = False, log: Log | None = None) -> ConvertResult:
    """Convert ``samples/nyuv2_multimae`` (real NYUv2 labeled frame, train + test, 40 classes) to ``out_path``.

    Equivalent to ``mmtk convert --rgbd samples/nyuv2_multimae OUT.h5``.
    """
    return convert_rgbd(samples_dir() / "nyuv2_multimae", out_path, size=size, force=force, progress=progress,
                        log=log)


def convert_rosbag(bag: str | os.PathLike, out_path: str | os.PathLike, rgb_topic: str, depth_topic: str | None = None,
                   camera_info_topic: str | None = None, max_dt: float = 0.02, depth_scale: float | None = None,
                   size: tuple[int, int] | None = None, force: bool = False, progress: bool = True,
                   log: Log | None = None, cloud_topic: str | None = None) -> ConvertResult:
    """Convert a ROS1 .bag or ROS2 bag (sqlite3/mcap) to an mmtk HDF5 file (colour/depth paired by stamp).

    Depth comes from ``depth_topic`` (Image/CompressedImage) or ``cloud_topic`` (PointCloud2, turned into
    depth aligned with the colour image; a cloud of another layout needs the colour camera's CameraInfo).
    """
    from mmtk.data.sources.rosbag import open_rosbag_source

    check_out_path(out_path, force)  # before reading any input
    source = open_rosbag_source(bag, rgb_topic, depth_topic, camera_info_topic, max_dt, depth_scale,
                                cloud_topic=cloud_topic)
    if log:
        log(f"layout: rosbag - {source.description}; {source.total} frames")
        for note in source.notes:
            log(f"  {note}")
    return write_frames(source.frames(), out_path, source=f"mmtk convert --rosbag {source.description}",
                        total=source.total, size=size, force=force, progress=progress, log=log)
