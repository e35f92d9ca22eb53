"""Conversion driver: stream frames from a source reader into an :class:`H5Writer` with progress."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Full
from typing import Any, Callable, Iterable, Iterator

from mmtk.data.codecs import plain
from mmtk.data.format import H5Writer, check_out_path
from mmtk.data.resize import resize_intrinsics, resize_stored
from mmtk.data.sources.base import Frame, RgbdSource
from mmtk.errors import MmtkError
from mmtk.io import check_free_space
from mmtk.modality import stored_array
from mmtk.progress import frame_bar

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
    arrays = {name: resize_stored(stored_array(name)[1].kind, plain(value), size) for name, value in frame.arrays.items()}
    k = None if frame.intrinsics is None else resize_intrinsics(frame.intrinsics, first.shape[:2], size)
    return Frame(frame.split, arrays, k, frame.timestamp, frame.frame_id)


def write_frames(frames: Iterable[Frame], out_path: str | os.PathLike, *, source: str, total: int | None,
                 classes: list[str] | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None, jpeg_quality: int | None = None) -> ConvertResult:
    """Write ``frames`` to ``out_path`` atomically, resizing to ``size`` (H, W) if given (``jpeg_quality``: store raw
    colour as JPEG at that quality instead of losslessly; see :class:`H5Writer`).

    The one conversion path: every source's frames are resized here once and validated and written once by
    :class:`H5Writer`. Shows a rich progress bar (frames/s) when ``progress`` is true. Returns a summary
    whose depth statistics let the caller show the user the effect of the depth units.
    """
    with H5Writer(out_path, source=source, force=force, classes=classes, jpeg_quality=jpeg_quality) as writer:
        for index, frame in enumerate(_with_progress(frames, total, progress)):
            frame = _resized(frame, size)
            if index == 0 and total:  # a full disk is refused before the write, not midway
                check_free_space(out_path, _stored_bytes(frame) * total, f"converting {total} frames")
            writer.add_frame(frame.split, frame.arrays, intrinsics=frame.intrinsics, timestamp=frame.timestamp,
                             frame_id=frame.frame_id)
        result = ConvertResult(Path(out_path), writer.frame_counts, writer.metric_summary())
    if log:
        frames_text = ", ".join(f"{split} {n}" for split, n in result.frames.items())
        log(f"wrote {out_path}: {frames_text} frames" + "".join(
            f"; {name} {s['min_m']:.3f}-{s['max_m']:.3f} m (median {s['median_m']:.3f} m), "
            f"{100 * s['valid_fraction']:.1f} % valid" for name, s in result.metrics.items()))
    return result


def read_ahead(frames: Callable[[], Iterable[Frame]], depth: int = 8) -> Iterator[Frame]:
    """The frames of ``frames()``, decoded in a second process while this one resizes, validates and writes them.

    Decoding (JPEG/PNG, HDF5, bag messages) and writing take about the same time, so two cores convert about
    twice as fast. At most ``depth`` decoded frames wait in between; an error in the reader is raised here.
    Without fork (not Linux) the frames are read inline.
    """
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        yield from frames()
        return
    context = multiprocessing.get_context("fork")  # the frame generator is a closure: it cannot be pickled
    queue = context.Queue(maxsize=depth)
    reader = context.Process(target=_produce, args=(frames, queue, os.getpid()), daemon=True)
    reader.start()
    try:
        while True:
            try:
                item = queue.get(timeout=2.0)
            except Empty:
                if not reader.is_alive():
                    raise MmtkError(f"the frame reader process stopped (exit code {reader.exitcode}) before the "
                                    f"last frame; rerun, or check free memory") from None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # SIGKILL: the reader holds nothing to clean up, and must not run the parent's signal handlers
        reader.kill()
        reader.join()


def _produce(frames: Callable[[], Iterable[Frame]], queue: Any, parent: int) -> None:
    """The reader process: put every frame (then None, or the error) on ``queue``; stop if the parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handlers unwind the parent, not this copy
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process

    def put(item: object) -> None:
        while True:
            try:
                queue.put(item, timeout=1.0)
                return
            except Full:
                if os.getppid() != parent:
                    os._exit(1)

    try:
        for frame in frames():
            put(frame)
        put(None)
    except BaseException as err:  # raised again in the parent, which owns the one-line error reporting
        try:
            put(err)
        except Exception:  # an exception that does not pickle
            put(RuntimeError(f"{type(err).__name__}: {err}"))


def _stored_bytes(frame: Frame) -> int:
    """Bytes one frame takes in the HDF5 file (its arrays as given; labels are stored in <= 16 bits), plus 1 %."""
    return int(sum(array.nbytes for array in frame.arrays.values()) * 1.01) + 256


def _with_progress(frames: Iterable[Frame], total: int | None, enabled: bool) -> Iterator[Frame]:
    with frame_bar("converting", total, enabled) as advance:
        for frame in frames:
            yield frame
            advance(1)


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
                 depth_scale: float | None = None, depth_format: str | None = None, depth_range: str | None = None,
                 layout: str | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None, streams: dict[str, str] | None = None,
                 jpeg_quality: int | None = None) -> ConvertResult:
    """Convert an RGB-D dataset folder (layout auto-detected) into an mmtk HDF5 file.

    Args:
        src: folder (or NYUv2 .mat) to convert.
        out_path: the .h5 to create (never overwritten unless ``force``).
        classes: NYUv2 label space, 40, 13 or 894.
        depth_scale: stored depth units per metre, overriding the layout's (e.g. 1000 for mm).
        depth_format: a named depth encoding (``mmtk.data.sources.base.DEPTH_FORMATS``), overriding the layout's.
        depth_range: the sensor's plausible range, "indoor" (default, 0.2-12 m), "outdoor", "lidar" or
            "MIN-MAX" metres; depth whose units were not given must fall inside it.
        layout: a layout name to use instead of detecting one.
        size: optional (H, W) to resize to on the way in.
        streams: extra stored arrays, name -> glob under ``src`` (matched to frames by file stem).
        jpeg_quality: store colour that arrives raw as JPEG at this quality (lossy; default: lossless).
    """
    from mmtk.data.sources.base import ConvertOptions, DepthEncoding, encoding_for, parse_depth_range
    from mmtk.data.sources.folders import open_rgbd_source

    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    options = ConvertOptions(classes=classes, depth_scale=depth_scale, depth_format=depth_format,
                             depth_range=parse_depth_range(depth_range), layout=layout)
    encoding_for(depth_format, depth_scale, DepthEncoding())  # refuses unknown or conflicting flags early
    check_out_path(out_path, force)  # before reading any input
    source = open_rgbd_source(src, options)
    provenance = f"mmtk convert --rgbd {Path(src).name}: {source.description}"
    if size:
        provenance += f", resized to {size[0]}x{size[1]}"

    def decoded() -> Iterator[Frame]:  # extra streams are decoded with the frames, in the reader process
        return _with_streams(source.frames(), Path(src), streams) if streams else source.frames()

    frames = read_ahead(decoded) if source.decode_apart else decoded()
    return _write_source(source, frames, out_path, provenance, size=size, force=force, progress=progress, log=log,
                         jpeg_quality=jpeg_quality)


def _write_source(source: RgbdSource, frames: Iterable[Frame], out_path: str | os.PathLike, provenance: str, *,
                  size: tuple[int, int] | None, force: bool, progress: bool, log: Log | None,
                  jpeg_quality: int | None = None) -> ConvertResult:
    """What every `mmtk convert` source goes through: its notes, the one write path, its closing summary."""
    if log:
        log(f"layout: {source.layout} - {source.description}; {source.total} frames")
        for note in source.notes:
            log(f"  {note}")
    result = write_frames(frames, out_path, source=provenance, total=source.total, classes=source.classes,
                          size=size, force=force, progress=progress, log=log, jpeg_quality=jpeg_quality)
    if log and source.summary is not None:
        log(f"  {source.summary(sum(result.frames.values()))}")
    return result


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
                   extra_topics: dict[str, str] | None = None, jpeg_quality: int | None = None) -> ConvertResult:
    """Convert a ROS1 .bag or ROS2 bag (sqlite3/mcap) to an mmtk HDF5 file (colour/depth paired by stamp).

    Depth comes from ``depth_topic`` (Image/CompressedImage) or ``cloud_topic`` (PointCloud2, turned into
    depth aligned with the colour image; a cloud of another layout needs the colour camera's CameraInfo).
    ``extra_topics`` maps a stored array name (e.g. "ir") to a further image topic, paired by stamp like depth.
    """
    from mmtk.data.sources.rosbag import open_rosbag_source

    check_out_path(out_path, force)  # before reading any input
    source = open_rosbag_source(bag, rgb_topic, depth_topic, camera_info_topic, max_dt, depth_scale,
                                cloud_topic=cloud_topic, extra_topics=extra_topics)
    frames = read_ahead(source.frames) if source.decode_apart else source.frames()
    return _write_source(source, frames, out_path, f"mmtk convert --rosbag {source.description}",
                         size=size, force=force, progress=progress, log=log, jpeg_quality=jpeg_quality)
