"""Conversion driver: stream frames from a source reader into an :class:`H5Writer` with progress."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmtk.modality import stored_array
from mmtk.data.format import H5Writer, check_out_path
from mmtk.data.resize import resize_intrinsics, resize_stored
from mmtk.data.sources.base import Frame
from mmtk.errors import MmtkError

Log = Callable[[str], None]


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    out_path: Path
    frames: dict[str, int]
    metrics: dict[str, dict[str, float]]  # per metric array (depth): valid_fraction, min_m, median_m, max_m, ...


def parse_size(text: str | None) -> tuple[int, int] | None:
    """Parse "HxW" (e.g. "240x320") into (H, W); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 8 or int(match.group(2)) < 8:
        raise MmtkError(f"--size {text!r} is not HxW in pixels (e.g. 240x320, each at least 8)")
    return int(match.group(1)), int(match.group(2))


def _resized(frame: Frame, size: tuple[int, int] | None) -> Frame:
    """The frame at ``size`` (H, W): each array resized as its kind needs, intrinsics scaled to match."""
    first = next(iter(frame.arrays.values()))
    if size is None or first.shape[:2] == size:
        return frame
    arrays = {name: resize_stored(stored_array(name)[1].kind, value, size) for name, value in frame.arrays.items()}
    k = None if frame.intrinsics is None else resize_intrinsics(frame.intrinsics, first.shape[:2], size)
    return Frame(frame.split, arrays, k, frame.timestamp, frame.frame_id)


def write_frames(frames: Iterable[Frame], out_path: str | os.PathLike, *, source: str, total: int | None,
                 classes: list[str] | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None) -> ConvertResult:
    """Write ``frames`` to ``out_path`` atomically, resizing to ``size`` (H, W) if given.

    The one conversion path: every source's frames are resized here once and validated and written once by
    :class:`H5Writer`. Shows a rich progress bar (frames/s) when ``progress`` is true. Returns a summary
    whose depth statistics let the caller show the user the effect of the depth units.
    """
    with H5Writer(out_path, source=source, force=force, classes=classes) as writer:
        for frame in _with_progress(frames, total, progress):
            frame = _resized(frame, size)
            writer.add_frame(frame.split, frame.arrays, intrinsics=frame.intrinsics, timestamp=frame.timestamp,
                             frame_id=frame.frame_id)
        result = ConvertResult(Path(out_path), writer.frame_counts, writer.metric_summary())
    if log:
        frames_text = ", ".join(f"{split} {n}" for split, n in result.frames.items())
        log(f"wrote {out_path}: {frames_text} frames" + "".join(
            f"; {name} {s['min_m']:.3f}-{s['max_m']:.3f} m (median {s['median_m']:.3f} m), "
            f"{100 * s['valid_fraction']:.1f} % valid" for name, s in result.metrics.items()))
    return result


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


def parse_named(values: list[str] | None, option: str) -> dict[str, str]:
    """["ir=/camera/ir/image", ...] -> {"ir": "/camera/ir/image"}; each NAME must be a stored array of an adapter."""
    named: dict[str, str] = {}
    for text in values or []:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise MmtkError(f"{option} {text!r} is not NAME=VALUE (e.g. {option} ir=...)")
        if name.strip() in named:
            raise MmtkError(f"{option} names {name.strip()!r} twice")
        stored_array(name.strip())  # an unknown name is refused before any input is read
        named[name.strip()] = value.strip()
    return named


def _with_streams(frames: Iterable[Frame], src: Path, streams: dict[str, str]) -> Iterator[Frame]:
    """Add each extra stream's image (files matching GLOB under ``src``, matched to a frame by file stem)."""
    from mmtk.data.sources.base import read_image

    files = {name: {path.stem: path for path in sorted(src.glob(pattern)) if path.is_file()}
             for name, pattern in streams.items()}
    for name, found in files.items():
        if not found:
            raise MmtkError(f"--stream {name}={streams[name]}: no file under {src} matches")
    for frame in frames:
        stem = Path(str(frame.frame_id)).stem
        for name, found in files.items():
            if stem not in found:
                raise MmtkError(f"--stream {name}: no file named {stem}.* for frame {frame.frame_id} (matched by "
                                f"file stem among {len(found)} files of {streams[name]})")
            frame.arrays[name] = read_image(found[stem])
        yield frame


def convert_rgbd(src: str | os.PathLike, out_path: str | os.PathLike, *, classes: int = 40,
                 depth_scale: float | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None, streams: dict[str, str] | None = None) -> ConvertResult:
    """Convert an RGB-D dataset folder (layout auto-detected) into an mmtk HDF5 file.

    Args:
        src: folder (or NYUv2 .mat) to convert.
        out_path: the .h5 to create (never overwritten unless ``force``).
        classes: NYUv2 label space, 40, 13 or 894.
        depth_scale: stored depth units per metre, overriding the layout's (e.g. 1000 for mm).
        size: optional (H, W) to resize to on the way in.
        streams: extra stored arrays, name -> glob under ``src`` (matched to frames by file stem).
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
    frames = _with_streams(source.frames(), Path(src), streams) if streams else source.frames()
    return write_frames(frames, out_path, source=provenance, total=source.total, classes=source.classes,
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
                   log: Log | None = None, cloud_topic: str | None = None,
                   extra_topics: dict[str, str] | None = None) -> ConvertResult:
    """Convert a ROS1 .bag or ROS2 bag (sqlite3/mcap) to an mmtk HDF5 file (colour/depth paired by stamp).

    Depth comes from ``depth_topic`` (Image/CompressedImage) or ``cloud_topic`` (PointCloud2, turned into
    depth aligned with the colour image; a cloud of another layout needs the colour camera's CameraInfo).
    ``extra_topics`` maps a stored array name (e.g. "ir") to a further image topic, paired by stamp like depth.
    """
    from mmtk.data.sources.rosbag import open_rosbag_source

    check_out_path(out_path, force)  # before reading any input
    source = open_rosbag_source(bag, rgb_topic, depth_topic, camera_info_topic, max_dt, depth_scale,
                                cloud_topic=cloud_topic, extra_topics=extra_topics)
    if log:
        log(f"layout: rosbag - {source.description}; {source.total} frames")
        for note in source.notes:
            log(f"  {note}")
    return write_frames(source.frames(), out_path, source=f"mmtk convert --rosbag {source.description}",
                        total=source.total, size=size, force=force, progress=progress, log=log)
