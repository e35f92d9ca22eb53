"""Conversion driver: stream frames from a source reader into an :class:`H5Writer` with progress."""

from __future__ import annotations

import collections
import itertools
import json
import os
import pickle
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Full
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mmtk.data.codecs import plain
from mmtk.data.format import H5Writer, check_out_path
from mmtk.data.shard_index import CONVERT_STATE, DONE_FOLDER, PLAN_FILE, finished_inputs, read_plan
from mmtk.data.resize import cover_window, resize_stored, window_intrinsics
from mmtk.data.sources.frame import Frame, RgbdSource
from mmtk.data.transforms import CropWindow
from mmtk.data.sources.open_source import check_options, open_source
from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text, check_free_space, discard, disk_errors
from mmtk.modality import stored_array
from mmtk.progress import frame_bar

Log = Callable[[str], None]


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    out_path: Path
    frames: dict[str, int]
    metrics: dict[str, dict[str, float]]  # per metric array (depth): valid_fraction, min_m, median_m, max_m, ...


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    """Parse "HxW" (e.g. "240x320") into (H, W) pixels, given with ``option``; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 8 or int(match.group(2)) < 8:
        raise MmtkError(f"{option} {text!r} is not HxW in pixels (e.g. 240x320, each at least 8)")
    return int(match.group(1)), int(match.group(2))


def _resized(frame: Frame, size: tuple[int, int] | None) -> Frame:
    """The frame at ``size`` (H, W), its aspect ratio kept: the centred window of that aspect ratio
    (:func:`~mmtk.data.resize.cover_window`) of each array resized as its kind needs, intrinsics moved and scaled to
    match. A frame of that size already is kept as it is (JPEG bytes included)."""
    first = next(iter(frame.arrays.values()))
    if size is None or first.shape[:2] == size:
        return frame
    window = CropWindow(*cover_window(first.shape[:2], size))
    arrays = {name: resize_stored(stored_array(name)[1].kind, plain(value)[window.rows, window.cols], size)
              for name, value in frame.arrays.items()}
    k = None if frame.intrinsics is None else window_intrinsics(frame.intrinsics, window, size).astype(np.float32)
    return Frame(frame.split, arrays, k, frame.timestamp, frame.frame_id)


def write_frames(frames: Iterable[Frame], out_path: str | os.PathLike, *, source: str, total: int | None,
                 classes: list[str] | None = None, size: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, log: Log | None = None, jpeg_quality: int | None = None) -> ConvertResult:
    """Write ``frames`` to ``out_path`` atomically, each at ``size`` (H, W) if given: resized to cover it, its aspect
    ratio kept, and centre-cropped (``jpeg_quality``: store raw colour as JPEG at that quality instead of
    losslessly; see :class:`H5Writer`).

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
        try:  # the queue pickles in a background thread, where a failure would go unseen: try it here
            pickle.dumps(err)
        except Exception:  # an exception that does not pickle
            err = RuntimeError(f"{type(err).__name__}: {err}")
        put(err)


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
    from mmtk.data.sources.image_files import read_image

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
                 parts: int | None = None, jpeg_quality: int | None = None) -> ConvertResult:
    """Convert an RGB-D dataset folder (layout auto-detected) into an mmtk HDF5 file.

    Args:
        src: folder (or NYUv2 .mat) to convert.
        out_path: the .h5 to create (never overwritten unless ``force``).
        classes: NYUv2 label space, 40, 13 or 894.
        depth_scale: stored depth units per metre, overriding the layout's (e.g. 1000 for mm).
        depth_format: a named depth encoding (``mmtk.data.sources.depth_encoding.DEPTH_FORMATS``), overriding the layout's.
        depth_range: the sensor's plausible range, "indoor" (default, 0.2-12 m), "outdoor", "lidar" or
            "MIN-MAX" metres; depth whose units were not given must fall inside it.
        layout: a layout name to use instead of detecting one.
        size: optional (H, W) to store the frames at (resized to cover it, aspect ratio kept, centre-cropped).
        streams: extra stored arrays, name -> glob under ``src`` (matched to frames by file stem).
        parts: frames per part: split the output into ``OUT-00000.h5``, ``OUT-00001.h5``, ... instead; parts
            already there are kept (a resumed input: their frames are read, not written again).
        jpeg_quality: store colour that arrives raw as JPEG at this quality (lossy; default: lossless).
    """
    check_out_path(out_path, force)  # before reading any input
    source = open_source("rgbd", src, classes=classes, depth_scale=depth_scale, depth_format=depth_format,
                         depth_range=depth_range, layout=layout)
    provenance = f"mmtk convert --rgbd {Path(src).name}: {source.description}"
    if size:
        provenance += f", resized to {size[0]}x{size[1]}"

    def decoded() -> Iterator[Frame]:  # extra streams are decoded with the frames, in the reader process
        return _with_streams(source.frames(), Path(src), streams) if streams else source.frames()

    frames = read_ahead(decoded) if source.decode_apart else decoded()
    return _write_source(source, frames, out_path, provenance, size=size, force=force, progress=progress, log=log,
                         parts=parts, jpeg_quality=jpeg_quality)


@dataclass
class ImagesResult:
    """What :func:`convert_images` wrote: frames per split, frame size (H, W), files skipped as unreadable."""

    frames: dict[str, int]
    size: tuple[int, int]
    skipped: list[str]


def convert_images(root: str | os.PathLike, out_path: str | os.PathLike, size: tuple[int, int] | None = None, *,
                   force: bool = False, progress: bool = True, jpeg_quality: int | None = None) -> ImagesResult:
    """Convert a folder of RGB images (:func:`mmtk.data.sources.images.list_images`) to an RGB-only mmtk file.

    Every frame is stored at ``size`` (default: the first readable image's), resized and cropped like every
    source's frames (:func:`write_frames`); a JPEG that has that size already is stored as its own bytes.
    Unreadable files are skipped and listed.
    """
    from mmtk.data.sources.images import open_image_folder

    check_out_path(out_path, force)  # before reading any input
    folder = open_image_folder(root)
    size = size or folder.first_size
    result = write_frames(folder.source.frames(), out_path, source=folder.source.description,
                          total=folder.source.total, size=size, force=force, progress=progress,
                          jpeg_quality=jpeg_quality)
    return ImagesResult(result.frames, size, folder.skipped)


def _write_source(source: RgbdSource, frames: Iterable[Frame], out_path: str | os.PathLike, provenance: str, *,
                  size: tuple[int, int] | None, force: bool, progress: bool, log: Log | None,
                  parts: int | None = None, jpeg_quality: int | None = None) -> ConvertResult:
    """What every `mmtk convert` source goes through: its notes, the one write path, its closing summary.

    With ``parts`` (frames per part), the frames go to ``OUT-00000.h5``, ``OUT-00001.h5``, ... (:func:`part_path`);
    a part already there is kept (its frames are read, not written again: a resumed input).
    """
    if log:
        log(f"layout: {source.layout} - {source.description}; {source.total} frames")
        for note in source.notes:
            log(f"  {note}")
    if parts is None:
        result = write_frames(frames, out_path, source=provenance, total=source.total, classes=source.classes,
                              size=size, force=force, progress=progress, log=log, jpeg_quality=jpeg_quality)
    else:
        result = _write_parts(frames, Path(out_path), provenance, source.total, source.classes, parts,
                              size=size, force=force, progress=progress, log=log, jpeg_quality=jpeg_quality)
    if log and source.summary is not None:
        log(f"  {source.summary(sum(result.frames.values()))}")
    return result


def part_path(out_path: Path, part: int) -> Path:
    """Where part ``part`` of an input split every N frames goes: ``OUT.h5`` -> ``OUT-00003.h5``."""
    return out_path.with_name(f"{out_path.stem}-{part:05d}{out_path.suffix}")


def _write_parts(frames: Iterable[Frame], out_path: Path, provenance: str, total: int | None,
                 classes: list[str] | None, per_part: int, **write: Any) -> ConvertResult:
    """Write ``frames`` as parts of ``per_part`` frames each (each part atomic), keeping parts already there."""
    stream = iter(frames)
    counts: dict[str, int] = {}
    metrics: dict[str, dict[str, float]] = {}
    part = 0
    while (head := next(stream, None)) is not None:
        chunk = itertools.chain([head], itertools.islice(stream, per_part - 1))
        if part_path(out_path, part).exists():  # published, so complete: its frames are read, not written again
            collections.deque(chunk, maxlen=0)
            part += 1
            continue
        left = None if total is None else max(1, min(per_part, total - part * per_part))
        result = write_frames(chunk, part_path(out_path, part), source=f"{provenance}, frames {part * per_part} on",
                              total=left, classes=classes, **write)
        for split, count in result.frames.items():
            counts[split] = counts.get(split, 0) + count
        metrics = metrics or result.metrics
        part += 1
    if part == 0:
        raise MmtkError(f"{out_path.name}: the input gave no frames; check it (or drop it from the inputs)")
    return ConvertResult(out_path, counts, metrics)


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
                   extra_topics: dict[str, str] | None = None, parts: int | None = None,
                   jpeg_quality: int | None = None) -> ConvertResult:
    """Convert a ROS1 .bag or ROS2 bag (sqlite3/mcap) to an mmtk HDF5 file (colour/depth paired by stamp).

    Depth comes from ``depth_topic`` (Image/CompressedImage) or ``cloud_topic`` (PointCloud2, turned into
    depth aligned with the colour image; a cloud of another layout needs the colour camera's CameraInfo).
    ``extra_topics`` maps a stored array name (e.g. "ir") to a further image topic, paired by stamp like depth.
    ``parts`` splits the output as in :func:`convert_rgbd`.
    """
    check_out_path(out_path, force)  # before reading any input
    source = open_source("rosbag", bag, rgb_topic=rgb_topic, depth_topic=depth_topic,
                         camera_info_topic=camera_info_topic, max_dt=max_dt, depth_scale=depth_scale,
                         cloud_topic=cloud_topic, extra_topics=extra_topics)
    frames = read_ahead(source.frames) if source.decode_apart else source.frames()
    return _write_source(source, frames, out_path, f"mmtk convert --rosbag {source.description}",
                         size=size, force=force, progress=progress, log=log, parts=parts,
                         jpeg_quality=jpeg_quality)


# -- scale-out: several inputs into a shard folder (mmtk.data.shards) ---------------------------------------
# OUT/.convert/plan.json holds the source kind, the options and the inputs (by key); OUT/.convert/done/KEY.json
# marks an input whose shards are all published, listing them. Both are what a rerun, another machine's part
# and `mmtk index` agree on.

PLAN_VERSION = 1


def expand_inputs(values: Iterable[str | os.PathLike], option: str) -> list[Path]:
    """The inputs of a source option: each value a path or a quoted glob (``'bags/*.bag'``), in the order given,
    each glob's matches sorted, duplicates dropped."""
    import glob

    found: list[Path] = []
    for value in values:
        text = os.path.expanduser(str(value))
        if any(char in text for char in "*?[") and not Path(text).exists():  # an existing name is taken as is
            matches = sorted(glob.glob(text))
            if not matches:
                raise MmtkError(f"{option} {text!r} matches nothing; check the pattern (quote it, so that mmtk, not "
                                f"the shell, expands it)")
            found += [Path(match) for match in matches]
        elif not Path(text).exists():
            raise MmtkError(f"{option} {text}: no such file or folder")
        else:
            found.append(Path(text))
    return list(dict.fromkeys(found))


def input_keys(inputs: list[Path]) -> list[str]:
    """A shard name stem per input, the same on every machine: its path below the inputs' common folder, with
    ``/`` as ``__`` (``/data/day1/run.bag`` and ``/data/day2/run.bag`` -> ``day1__run.bag``, ``day2__run.bag``)."""
    absolute = [Path(os.path.abspath(path)) for path in inputs]
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    keys = [re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(path.relative_to(root).parts)).lstrip(".") or "_"
            for path in absolute]
    if len(set(keys)) < len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise MmtkError(f"two inputs would both write shard {twice!r} (their names differ only in characters "
                        f"shard names replace by _); rename one of them")
    return keys


@dataclass
class ShardRun:
    """What one ``mmtk convert`` into a shard folder did."""

    folder: Path
    inputs: int  # of the whole plan
    mine: int  # this part's inputs (all, without --num-shards)
    kept: int  # of mine, already finished by an earlier run
    converted: int  # of mine, converted now
    indexed: bool  # whether index.json was written (every input of the plan is finished)


def convert_to_shards(kind: str, inputs: list[Path], out: str | os.PathLike, options: dict[str, Any], *,
                      shard_frames: int | None = None, workers: int = 1, shard_index: int | None = None,
                      num_shards: int | None = None, force: bool = False, progress: bool = True,
                      log: Log | None = None) -> ShardRun:
    """Convert each input into its own shard(s) of the folder ``out`` and index the folder when all are done.

    ``kind`` is "rgbd", "rosbag" or "images"; ``options`` the converter's keyword arguments (the same for every
    input; recorded in the plan, which reruns and other machines must match). Input ``KEY`` (:func:`input_keys`)
    becomes ``KEY.h5``, or ``KEY-00000.h5``, ... split every ``shard_frames`` frames. ``workers`` inputs are
    converted at once, in processes. Finished inputs are kept: a rerun converts only the rest, and of a split
    input only its missing parts. ``shard_index``/``num_shards`` take the inputs ``i`` (in key order) with
    ``i % num_shards == shard_index``, so that ``num_shards`` machines share the work.
    """
    folder = Path(out)
    _check_scale_out(kind, folder, shard_frames, workers, shard_index, num_shards)
    check_options(**options)
    keys = input_keys(inputs)
    by_key = dict(sorted(zip(keys, inputs)))
    plan = json.loads(json.dumps({"version": PLAN_VERSION, "source": kind, "shard_frames": shard_frames,
                                  "options": options, "inputs": sorted(keys)}))
    _start_folder(folder, plan, force, partitioned=num_shards is not None)
    mine = [key for number, key in enumerate(by_key) if num_shards is None or number % num_shards == shard_index]
    finished = finished_inputs(folder)
    for key in mine:  # published just before a kill, not yet marked: complete all the same
        if shard_frames is None and key not in finished and (folder / f"{key}.h5").exists():
            finished[key] = _mark_finished(folder, key, [f"{key}.h5"])
    todo = [key for key in mine if key not in finished]
    if log and len(todo) < len(mine):
        log(f"{len(mine) - len(todo)} of {len(mine)} inputs already converted in {folder}: kept")
    failures = _run_jobs([(kind, str(by_key[key]), str(folder), key, options, shard_frames) for key in todo],
                         workers, progress, log)
    if failures:
        key, error = failures[0]
        raise MmtkError(f"{len(failures)} of {len(todo)} inputs failed (first, {by_key[key]}: {error}); the "
                        f"finished shards are kept: fix or drop those inputs and run the same command again")
    finished = finished_inputs(folder)
    indexed = all(key in finished for key in plan["inputs"])
    if indexed:
        from mmtk.data.shards import write_index

        index = write_index(folder)
        if log:
            frames = ", ".join(f"{split} {part['frames']}" for split, part in index["splits"].items())
            log(f"indexed {folder}: {len(index['shards'])} shards, {frames} frames")
    elif log:
        log(f"part {shard_index} of {num_shards} done ({len(mine)} inputs); once every part is done, run "
            f"`mmtk index {folder}`")
    return ShardRun(folder, len(keys), len(mine), len(mine) - len(todo), len(todo), indexed)


def _check_scale_out(kind: str, folder: Path, shard_frames: int | None, workers: int, shard_index: int | None,
                     num_shards: int | None) -> None:
    if (shard_index is None) != (num_shards is None):
        raise MmtkError("--shard-index I and --num-shards N go together (this machine converts inputs i with "
                        "i % N == I); give both or neither")
    if num_shards is not None and (num_shards < 1 or not 0 <= shard_index < num_shards):  # type: ignore[operator]
        raise MmtkError(f"--shard-index {shard_index} --num-shards {num_shards}: need N >= 1 and 0 <= I < N")
    if workers < 1:
        raise MmtkError(f"--workers {workers}: must be at least 1")
    if shard_frames is not None and shard_frames < 1:
        raise MmtkError(f"--shard-frames {shard_frames}: must be at least 1 frame")
    if shard_frames is not None and kind == "images":
        raise MmtkError("--shard-frames splits --rgbd and --rosbag inputs; each --images folder becomes one shard "
                        "(give several folders, or drop --shard-frames)")
    if folder.is_file() or (not folder.exists() and folder.suffix.lower() in (".h5", ".hdf5")):
        raise MmtkError(f"OUT {folder} {'is a file' if folder.is_file() else 'ends in .h5'}, but several inputs "
                        f"or --shard-frames write a folder of shards; name a folder (e.g. {folder.with_suffix('')})")


def _start_folder(folder: Path, plan: dict[str, Any], force: bool, partitioned: bool) -> None:
    """Create ``folder`` with ``plan``, or check that its plan has the same source and options (and, for one part
    of a ``--num-shards`` run, the same inputs: parts given different inputs would skip or repeat some)."""
    from mmtk.data.shard_index import INDEX_NAME, shard_names

    old = read_plan(folder) if folder.is_dir() else None
    if folder.is_dir() and old is None and any(folder.iterdir()):
        raise MmtkError(f"{folder} is a folder that `mmtk convert` did not make and it is not empty; convert into "
                        f"a new or empty folder")
    if old is not None and force:
        for name in [*shard_names(folder), INDEX_NAME]:
            discard(folder / name)
        shutil.rmtree(folder / CONVERT_STATE)
        old = None
    if old is not None:
        same = ("version", "source", "shard_frames", "options") + (("inputs",) if partitioned else ())
        changed = [key for key in same if old.get(key) != plan[key]]
        if changed:
            raise MmtkError(f"{folder} was converted with other {', '.join(changed)} ({_plan_text(old, changed)}); "
                            f"use those (every --shard-index part the same inputs), convert into a new folder, or "
                            f"add --force to convert it all again")
    with disk_errors(folder):
        (folder / CONVERT_STATE / DONE_FOLDER).mkdir(parents=True, exist_ok=True)
    if old != plan:  # the inputs may grow (or shrink) between runs; every machine writes the same plan
        atomic_write_text(folder / CONVERT_STATE / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    if (folder / INDEX_NAME).exists() and old is not None and old["inputs"] != plan["inputs"]:
        discard(folder / INDEX_NAME)  # it describes other inputs: rewritten when they are all done


def _plan_text(plan: dict[str, Any], keys: list[str]) -> str:
    """The plan's values of ``keys``, shortened to fit a one-line message."""
    text = ", ".join(f"{key} {json.dumps(plan.get(key))}" for key in keys)
    return text if len(text) <= 300 else text[:297] + "..."


def _run_jobs(jobs: list[tuple], workers: int, progress: bool, log: Log | None) -> list[tuple[str, str]]:
    """Run :func:`_convert_input` over ``jobs``, ``workers`` at once; returns (key, error) of each failed one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    failures: list[tuple[str, str]] = []

    def finished(number: int, key: str, outcome: tuple[list[str], dict[str, int]] | MmtkError) -> None:
        if isinstance(outcome, MmtkError):
            failures.append((key, str(outcome)))
        if log:
            text = f"failed: {outcome}" if isinstance(outcome, MmtkError) else \
                f"{', '.join(f'{s} {n}' for s, n in outcome[1].items()) or 'no new'} frames -> " \
                f"{', '.join(outcome[0][:3])}{' ...' if len(outcome[0]) > 3 else ''}"
            log(f"[{number}/{len(jobs)}] {key}: {text}")

    if workers == 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for number, job in enumerate(jobs, 1):
            try:
                outcome: Any = _convert_input(*job, progress=progress, log=log)
            except MmtkError as err:
                outcome = err
            finished(number, job[3], outcome)
        return failures
    # fork: the workers inherit the plugins this process loaded (--plugin), which a spawned process would not
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool, \
            frame_bar(f"converting {len(jobs)} inputs", None, progress) as advance:
        futures = {pool.submit(_convert_input, *job, progress=False, log=None): job[3] for job in jobs}
        for number, future in enumerate(as_completed(futures), 1):
            try:
                outcome = future.result()
                advance(sum(outcome[1].values()))
            except MmtkError as err:
                outcome = err
            except BrokenProcessPool:
                raise MmtkError("a conversion worker process died (out of memory?); run the same command again "
                                "(finished shards are kept), with fewer --workers") from None
            finished(number, futures[future], outcome)
    return failures


def _convert_input(kind: str, src: str, folder: str, key: str, options: dict[str, Any], shard_frames: int | None,
                   *, progress: bool, log: Log | None) -> tuple[list[str], dict[str, int]]:
    """Convert one input into its shard(s) in ``folder``, then mark it finished; returns (shards, frames written).

    A shard already published is complete (every shard is written atomically) and is kept."""
    out = Path(folder) / f"{key}.h5"
    converter = _CONVERTERS[kind]
    if shard_frames is None:
        frames = converter(src, out, progress=progress, log=log, **options)
        shards = [out.name]
    else:
        frames = converter(src, out, progress=progress, log=log, parts=shard_frames, **options)
        shards = [part_path(out, part).name for part in range(_published_parts(out))]
    return _mark_finished(Path(folder), key, shards), frames


def _mark_finished(folder: Path, key: str, shards: list[str]) -> list[str]:
    """Record that input ``key``'s shards are all published (what reruns and `mmtk index` go by)."""
    atomic_write_text(folder / CONVERT_STATE / DONE_FOLDER / f"{key}.json", json.dumps({"shards": shards}) + "\n")
    return shards


def _published_parts(out: Path) -> int:
    """How many parts ``OUT-00000.h5``, ``OUT-00001.h5``, ... of an input are published (consecutive from 0)."""
    count = 0
    while part_path(out, count).exists():
        count += 1
    return count


def _rgbd_frames(src: str, out: Path, **options: Any) -> dict[str, int]:
    return convert_rgbd(src, out, **options).frames


def _rosbag_frames(src: str, out: Path, **options: Any) -> dict[str, int]:
    return convert_rosbag(src, out, **options).frames


def _images_frames(src: str, out: Path, *, progress: bool, log: Log | None, size: list[int] | None = None,
                   jpeg_quality: int | None = None) -> dict[str, int]:
    result = convert_images(src, out, tuple(size) if size else None, progress=progress, jpeg_quality=jpeg_quality)
    if log and result.skipped:
        log(f"{src}: skipped {len(result.skipped)} unreadable file(s), first: {result.skipped[0]}")
    return result.frames


_CONVERTERS: dict[str, Callable[..., dict[str, int]]] = {"rgbd": _rgbd_frames, "rosbag": _rosbag_frames,
                                                         "images": _images_frames}
