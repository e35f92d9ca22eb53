"""`mmtk convert` (RGB-D folders, NYUv2 .mat, ROS bags, RGB image folders -> mmtk HDF5) and `mmtk info`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.app import PLUGIN_HELP, app, load_plugins
from mmtk.errors import MmtkError


def _log(message: str) -> None:
    typer.echo(message, err=True)


@app.command("convert")
def convert(
    out: Optional[Path] = typer.Argument(None, help="Output .h5 file (written atomically)."),
    rgbd: Optional[Path] = typer.Option(None, "--rgbd", help="RGB-D dataset folder (layout auto-detected) or NYUv2 .mat."),
    rosbag: Optional[Path] = typer.Option(None, "--rosbag", help="ROS1 .bag or ROS2 bag directory (sqlite3/mcap)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of RGB images (flat, class folders, or "
                                          "train/val/test above them); RGB only, add depth with `mmtk pseudo-label`."),
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
    jpeg_quality: Optional[int] = typer.Option(None, "--jpeg-quality", help="Store colour that arrives raw (PNG, "
                                               "raw Image) as JPEG at this quality, 1-100: smaller, lossy. Default: "
                                               "lossless; JPEG input is always kept as its own bytes."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Convert RGB-D data, ROS bags or RGB image folders into one mmtk HDF5 file (metres, labels, intrinsics)."""
    from mmtk.data.convert import convert_rgbd, parse_named, parse_size

    load_plugins(plugin)
    if sum(source is not None for source in (rgbd, rosbag, images)) != 1:
        raise MmtkError("give exactly one source: --rgbd FOLDER, --rosbag BAG or --images FOLDER")
    if topic and rosbag is None:
        raise MmtkError("--topic NAME=/topic is for --rosbag; folders take --stream NAME=GLOB")
    if stream and rgbd is None:
        raise MmtkError("--stream NAME=GLOB is for --rgbd; bags take --topic NAME=/topic")
    shape = parse_size(size)
    rgbd_only = [flag for flag, value in (("--depth-format", depth_format), ("--depth-range", depth_range),
                                          ("--layout", layout)) if value is not None]
    if rgbd is None and rgbd_only:
        raise MmtkError(f"{', '.join(rgbd_only)} only apply to --rgbd folders; remove them")
    if images is not None:
        if out is None:
            raise MmtkError("missing OUT.h5: mmtk convert --images FOLDER OUT.h5")
        _convert_images(images, out, shape, force, progress, jpeg_quality)
    elif rgbd is not None:
        if out is None:
            raise MmtkError("missing OUT.h5: mmtk convert --rgbd SRC OUT.h5")
        convert_rgbd(rgbd, out, classes=classes, depth_scale=depth_scale, depth_format=depth_format,
                     depth_range=depth_range, layout=layout, size=shape, force=force, progress=progress, log=_log,
                     streams=parse_named(stream, "--stream"), jpeg_quality=jpeg_quality)
    else:
        assert rosbag is not None
        _convert_rosbag(rosbag, out, rgb_topic, depth_topic, cloud_topic, camera_info_topic, max_dt, depth_scale,
                        shape, force, progress, parse_named(topic, "--topic"), jpeg_quality)


def _convert_images(images: Path, out: Path, size: Optional[tuple[int, int]], force: bool, progress: bool,
                    jpeg_quality: Optional[int]) -> None:
    from mmtk.data.sources.images import convert_images

    result = convert_images(images, out, size, force=force, progress=progress, jpeg_quality=jpeg_quality)
    counts = ", ".join(f"{split}: {n}" for split, n in result.frames.items())
    typer.echo(f"{out}: {counts} frames at {result.size[0]}x{result.size[1]} px"
               + (f"; skipped {len(result.skipped)} unreadable file(s), first: {result.skipped[0]}"
                  if result.skipped else ""))


def _convert_rosbag(bag: Path, out: Optional[Path], rgb_topic: Optional[str], depth_topic: Optional[str],
                    cloud_topic: Optional[str], camera_info_topic: Optional[str], max_dt: float,
                    depth_scale: Optional[float], size: Optional[tuple[int, int]], force: bool, progress: bool,
                    extra_topics: dict[str, str], jpeg_quality: Optional[int]) -> None:
    from mmtk.data.sources.rosbag import image_topics

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
        return
    if out is None:
        raise MmtkError("missing OUT.h5: mmtk convert --rosbag BAG OUT.h5 --rgb-topic T --depth-topic T "
                        "(or --cloud-topic T)")
    if max_dt <= 0:
        raise MmtkError(f"--max-dt must be positive seconds, got {max_dt}")
    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    from mmtk.data import convert_rosbag

    convert_rosbag(bag, out, rgb_topic, depth_topic, camera_info_topic, max_dt, depth_scale, size=size,
                   force=force, progress=progress, log=_log, cloud_topic=cloud_topic, extra_topics=extra_topics,
                   jpeg_quality=jpeg_quality)


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="An mmtk .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Summarise an mmtk HDF5 file: splits, frames, shapes, units, depth range, classes, intrinsics."""
    from mmtk.data.info import format_info, info_json, read_info

    summary = read_info(path)
    typer.echo(info_json(summary) if as_json else format_info(summary))


@app.command("check")
def check(
    path: Path = typer.Argument(..., help="An mmtk .h5 file."),
) -> None:
    """Read every frame of an mmtk file and list each bad one (checksum, non-finite or > 1000 m depth,
    class ids beyond the classes); exit 1 when any is bad."""
    from mmtk.data.check import check_file

    report = check_file(path)
    for bad in report.bad:
        typer.echo(bad.line(report.path))
    total = sum(report.frames.values())
    checksums = "" if report.checksummed else " (no checksums in this file: flipped image bytes go unnoticed)"
    typer.echo(f"{report.path}: {total} frames checked, {report.bad_frames} bad{checksums}")
    if report.bad:
        raise typer.Exit(1)
