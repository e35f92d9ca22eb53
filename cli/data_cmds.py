"""`mmtk convert` (RGB-D folders, NYUv2 .mat, ROS bags, RGB image folders -> mmtk HDF5) and `mmtk info`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.app import PLUGIN_HELP, app, load_plugins
from mmtk.errors import MmtkError


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _require_stdout(command: str) -> None:
    """Refuse to run a command whose result is its output when standard output is closed (`>&-`): click would
    drop every line silently and the command would exit 0 having shown nothing."""
    if sys.stdout is None or sys.stdout.closed:
        raise MmtkError(f"standard output is closed, so `mmtk {command}` has nowhere to print its result; "
                        f"redirect it to a file (> FILE) or to /dev/null instead of closing it")


@app.command("convert")
def convert(
    out: Optional[Path] = typer.Argument(None, help="Output .h5 file (written atomically); with several inputs or "
                                         "--shard-frames, a folder of shards."),
    rgbd: Optional[list[str]] = typer.Option(None, "--rgbd", help="RGB-D dataset folder (layout auto-detected) or "
                                             "NYUv2 .mat; repeat it or give a quoted glob for several."),
    rosbag: Optional[list[str]] = typer.Option(None, "--rosbag", help="ROS1 .bag or ROS2 bag directory "
                                               "(sqlite3/mcap); repeat it or give a quoted glob for several."),
    images: Optional[list[str]] = typer.Option(None, "--images", help="Folder of RGB images (flat, class folders, or "
                                               "train/val/test above them); RGB only, add depth with `mmtk "
                                               "pseudo-label`; repeat it or give a quoted glob for several."),
    rgb_topic: Optional[str] = typer.Option(None, "--rgb-topic", help="Colour Image/CompressedImage topic."),
    depth_topic: Optional[str] = typer.Option(None, "--depth-topic", help="Depth Image topic (16UC1 mm, 32FC1 m)."),
    cloud_topic: Optional[str] = typer.Option(None, "--cloud-topic", help="Or a PointCloud2 topic (metres; moved into "
                                              "the colour camera's frame with /tf_static and /tf) as the depth source."),
    camera_info_topic: Optional[str] = typer.Option(None, "--camera-info-topic", help="CameraInfo topic for intrinsics."),
    max_dt: float = typer.Option(0.02, "--max-dt", help="Max colour/depth stamp difference for a pair, seconds."),
    classes: int = typer.Option(40, "--classes", help="NYUv2 label space: 40, 13 or 894."),
    depth_scale: Optional[float] = typer.Option(None, "--depth-scale", help="Stored depth units per metre (1000 = mm)."),
    depth_format: Optional[str] = typer.Option(None, "--depth-format", help="--rgbd: depth encoding instead of the "
                                               "layout's or a guess: m, mm, 0.1mm, tum, multimae, sun (bit-rotated "
                                               "mm), kinect-disparity (raw 11-bit Kinect v1)."),
    depth_range: Optional[str] = typer.Option(None, "--depth-range", help="--rgbd: plausible sensor range for depth "
                                              "whose units were not given: indoor (0.2-12 m, default), outdoor "
                                              "(0.5-120 m), lidar (0.3-250 m) or MIN-MAX metres."),
    layout: Optional[str] = typer.Option(None, "--layout", help="--rgbd: use this layout instead of detecting one: "
                                         "nyuv2-mat, multimae, bts-sync, sparse-to-dense, tum, nyuv2-raw, paired."),
    size: Optional[str] = typer.Option(None, "--size", help="Resize on the way in, HxW pixels (e.g. 240x320); "
                                       "--images: default the first image's size, others resized to cover and "
                                       "centre-cropped."),
    topic: Optional[list[str]] = typer.Option(None, "--topic", help="--rosbag: a further image topic stored as "
                                              "modality NAME, paired by time like depth: NAME=/topic (repeatable)."),
    stream: Optional[list[str]] = typer.Option(None, "--stream", help="--rgbd: a further image stream stored as "
                                               "modality NAME, matched to colour by file stem: NAME=GLOB "
                                               "(e.g. ir='ir/*.png'; repeatable)."),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
    shard_frames: Optional[int] = typer.Option(None, "--shard-frames", help="Write OUT as a folder of shards, "
                                               "starting a new shard every N frames of an input."),
    workers: int = typer.Option(1, "--workers", help="Inputs converted at once (processes), into a shard folder."),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="With --num-shards N: convert only the "
                                              "inputs i (sorted) with i % N == I; N machines build one folder."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help="How many parts the inputs are split into "
                                             "(see --shard-index)."),
    jpeg_quality: Optional[int] = typer.Option(None, "--jpeg-quality", help="Store colour that arrives raw (PNG, "
                                               "raw Image) as JPEG at this quality, 1-100: smaller, lossy. Default: "
                                               "lossless; JPEG input is always kept as its own bytes."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists (a shard folder: convert every "
                                                      "input again)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Convert RGB-D data, ROS bags or RGB image folders into one mmtk HDF5 file (metres, labels, intrinsics), or
    several inputs into a folder of shards (one per input; kept on a rerun, so a killed run resumes)."""
    from mmtk.data.convert import convert_rgbd, convert_rosbag, expand_inputs, parse_named, parse_size

    load_plugins(plugin)
    given = [(flag, values) for flag, values in (("--rgbd", rgbd), ("--rosbag", rosbag), ("--images", images))
             if values]
    if len(given) != 1:
        raise MmtkError("give exactly one source: --rgbd FOLDER, --rosbag BAG or --images FOLDER")
    if topic and not rosbag:
        raise MmtkError("--topic NAME=/topic is for --rosbag; folders take --stream NAME=GLOB")
    if stream and not rgbd:
        raise MmtkError("--stream NAME=GLOB is for --rgbd; bags take --topic NAME=/topic")
    shape = parse_size(size)
    rgbd_only = [flag for flag, value in (("--depth-format", depth_format), ("--depth-range", depth_range),
                                          ("--layout", layout)) if value is not None]
    if not rgbd and rgbd_only:
        raise MmtkError(f"{', '.join(rgbd_only)} only apply to --rgbd folders; remove them")
    kind = given[0][0].removeprefix("--")
    inputs = expand_inputs(given[0][1], given[0][0])
    if kind == "rosbag" and not _rosbag_ready(inputs[0], rgb_topic, depth_topic, cloud_topic, max_dt, depth_scale):
        return
    options = {"rgbd": dict(classes=classes, depth_scale=depth_scale, depth_format=depth_format,
                            depth_range=depth_range, layout=layout, size=shape,
                            streams=parse_named(stream, "--stream")),
               "rosbag": dict(rgb_topic=rgb_topic, depth_topic=depth_topic, camera_info_topic=camera_info_topic,
                              max_dt=max_dt, depth_scale=depth_scale, size=shape, cloud_topic=cloud_topic,
                              extra_topics=parse_named(topic, "--topic")),
               "images": dict(size=shape)}[kind]
    options["jpeg_quality"] = jpeg_quality
    if len(inputs) > 1 or shard_frames is not None or shard_index is not None or num_shards is not None:
        if out is None:
            raise MmtkError(f"missing OUT: mmtk convert --{kind} SRC --{kind} SRC ... OUT_FOLDER (several inputs "
                            f"write a folder of shards)")
        _convert_shards(kind, inputs, out, options, shard_frames, workers, shard_index, num_shards, force, progress)
    elif out is None:
        raise MmtkError(f"missing OUT.h5: mmtk convert --{kind} {'BAG' if kind == 'rosbag' else 'SRC'} OUT.h5"
                        + (" --rgb-topic T --depth-topic T (or --cloud-topic T)" if kind == "rosbag" else ""))
    elif kind == "images":
        _convert_images(inputs[0], out, shape, force, progress, jpeg_quality)
    else:
        convert = convert_rgbd if kind == "rgbd" else convert_rosbag
        convert(inputs[0], out, **options, force=force, progress=progress, log=_log)


def _convert_shards(kind: str, inputs: list[Path], out: Path, options: dict, shard_frames: Optional[int],
                    workers: int, shard_index: Optional[int], num_shards: Optional[int], force: bool,
                    progress: bool) -> None:
    from mmtk.data.convert import convert_to_shards

    run = convert_to_shards(kind, inputs, out, options, shard_frames=shard_frames, workers=workers,
                            shard_index=shard_index, num_shards=num_shards, force=force, progress=progress, log=_log)
    part = "" if num_shards is None else f" (part {shard_index} of {num_shards}: {run.mine} inputs)"
    typer.echo(f"{out}: {run.converted} inputs converted, {run.kept} kept from an earlier run{part}; "
               + ("index written" if run.indexed else f"not indexed yet: run `mmtk index {out}` when every part "
                                                      f"is done"))


def _convert_images(images: Path, out: Path, size: Optional[tuple[int, int]], force: bool, progress: bool,
                    jpeg_quality: Optional[int]) -> None:
    from mmtk.data.sources.images import convert_images

    result = convert_images(images, out, size, force=force, progress=progress, jpeg_quality=jpeg_quality)
    counts = ", ".join(f"{split}: {n}" for split, n in result.frames.items())
    typer.echo(f"{out}: {counts} frames at {result.size[0]}x{result.size[1]} px"
               + (f"; skipped {len(result.skipped)} unreadable file(s), first: {result.skipped[0]}"
                  if result.skipped else ""))


def _rosbag_ready(bag: Path, rgb_topic: Optional[str], depth_topic: Optional[str], cloud_topic: Optional[str],
                  max_dt: float, depth_scale: Optional[float]) -> bool:
    """Whether the topics and numbers to convert ``bag`` are given; without topics, list the bag's and say so."""
    from mmtk.data.sources.ros.bag import image_topics

    if depth_topic is not None and cloud_topic is not None:
        raise MmtkError("--depth-topic and --cloud-topic both give depth; pass only one of them")
    if rgb_topic is None or (depth_topic is None and cloud_topic is None):
        topics = image_topics(bag)
        typer.echo(f"image and point-cloud topics in {bag} (pass --rgb-topic and --depth-topic or --cloud-topic "
                   f"to convert):")
        for topic in topics:
            typer.echo(f"  {topic.topic:<45} {topic.msgtype:<35} {topic.count} messages")
        if not topics:
            typer.echo("  (none)")
        return False
    if max_dt <= 0:
        raise MmtkError(f"--max-dt must be positive seconds, got {max_dt}")
    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    return True


@app.command("index")
def index(
    folder: Path = typer.Argument(..., help="A folder of mmtk .h5 shards."),
    partial: bool = typer.Option(False, "--partial", help="Index the finished shards even when inputs of the "
                                                          "conversion plan are not converted yet (they are left out)."),
) -> None:
    """Write (or rebuild) FOLDER/index.json from its shards: after `mmtk convert --shard-index` parts, or when
    readers say the index is missing or stale. Reads each shard once."""
    from mmtk.data.shards import write_index
    from mmtk.io import format_bytes

    summary = write_index(folder, partial=partial, log=_log)
    frames = ", ".join(f"{split} {part['frames']}" for split, part in summary["splits"].items())
    typer.echo(f"{folder}/index.json: {len(summary['shards'])} shards, {frames} frames, "
               f"{format_bytes(summary['bytes'])}")


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="An mmtk .h5 file or shard folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Summarise an mmtk HDF5 file: splits, frames, shapes, units, depth range, classes, intrinsics."""
    from mmtk.data.info import format_info, info_json, read_info

    _require_stdout("info")
    summary = read_info(path)
    typer.echo(info_json(summary) if as_json else format_info(summary))


@app.command("check")
def check(
    path: Path = typer.Argument(..., help="An mmtk .h5 file or shard folder."),
) -> None:
    """Read every frame of an mmtk file (or of each shard of a folder) and list each bad one (checksum,
    non-finite or > 1000 m depth, class ids beyond the classes); exit 1 when any is bad."""
    from mmtk.data.shards import check_files
    from mmtk.progress import counted

    _require_stdout("check")
    frames = bad_frames = unreadable = 0
    checksummed = True
    for _, report in check_files(path):
        if isinstance(report, MmtkError):  # a shard that cannot be opened: its one line, then the others
            typer.echo(f"error: {report}")
            unreadable += 1
            continue
        for bad in report.bad:
            typer.echo(bad.line(report.path))
        frames += sum(report.frames.values())
        bad_frames += report.bad_frames
        checksummed &= report.checksummed
    checksums = "" if checksummed else " (no checksums in this file: flipped image bytes go unnoticed)"
    shards = f", {unreadable} shard(s) unreadable" if unreadable else ""
    typer.echo(f"{path}: {counted(frames, 'frame')} checked, {bad_frames} bad{shards}{checksums}")
    if bad_frames or unreadable:
        raise typer.Exit(1)
