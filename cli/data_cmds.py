"""`mmtk convert` (RGB-D folders, NYUv2 .mat, ROS bags -> mmtk HDF5) and `mmtk info`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.main import app
from mmtk.errors import MmtkError


def _log(message: str) -> None:
    typer.echo(message, err=True)


@app.command("convert")
def convert(
    out: Optional[Path] = typer.Argument(None, help="Output .h5 file (written atomically)."),
    rgbd: Optional[Path] = typer.Option(None, "--rgbd", help="RGB-D dataset folder (layout auto-detected) or NYUv2 .mat."),
    rosbag: Optional[Path] = typer.Option(None, "--rosbag", help="ROS1 .bag or ROS2 bag directory (sqlite3/mcap)."),
    rgb_topic: Optional[str] = typer.Option(None, "--rgb-topic", help="Colour Image/CompressedImage topic."),
    depth_topic: Optional[str] = typer.Option(None, "--depth-topic", help="Depth Image topic (16UC1 mm, 32FC1 m)."),
    camera_info_topic: Optional[str] = typer.Option(None, "--camera-info-topic", help="CameraInfo topic for intrinsics."),
    max_dt: float = typer.Option(0.02, "--max-dt", help="Max colour/depth stamp difference for a pair, seconds."),
    classes: int = typer.Option(40, "--classes", help="NYUv2 label space: 40, 13 or 894."),
    depth_scale: Optional[float] = typer.Option(None, "--depth-scale", help="Stored depth units per metre (1000 = mm)."),
    size: Optional[str] = typer.Option(None, "--size", help="Resize on the way in, HxW pixels (e.g. 240x320)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Convert RGB-D data into one mmtk HDF5 file (metres, labels, intrinsics, provenance)."""
    from mmtk.data.convert import convert_rgbd, parse_size

    if (rgbd is None) == (rosbag is None):
        raise MmtkError("give exactly one source: --rgbd FOLDER or --rosbag BAG")
    shape = parse_size(size)
    if rgbd is not None:
        if out is None:
            raise MmtkError("missing OUT.h5: mmtk convert --rgbd SRC OUT.h5")
        convert_rgbd(rgbd, out, classes=classes, depth_scale=depth_scale, size=shape, force=force,
                     progress=progress, log=_log)
        return
    from mmtk.adapters.sensors.rosbag import image_topics

    assert rosbag is not None
    if rgb_topic is None or depth_topic is None:
        topics = image_topics(rosbag)
        typer.echo(f"image topics in {rosbag} (pass --rgb-topic and --depth-topic to convert):")
        for topic in topics:
            typer.echo(f"  {topic.topic:<45} {topic.msgtype:<35} {topic.count} messages")
        if not topics:
            typer.echo("  (none)")
        return
    if out is None:
        raise MmtkError("missing OUT.h5: mmtk convert --rosbag BAG OUT.h5 --rgb-topic T --depth-topic T")
    if max_dt <= 0:
        raise MmtkError(f"--max-dt must be positive seconds, got {max_dt}")
    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale must be positive (units per metre), got {depth_scale}")
    from mmtk.data import convert_rosbag

    convert_rosbag(rosbag, out, rgb_topic, depth_topic, camera_info_topic, max_dt, depth_scale, size=shape,
                   force=force, progress=progress, log=_log)


@app.command("info")
def info(
    path: Path = typer.Argument(..., help="An mmtk .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Summarise an mmtk HDF5 file: splits, frames, shapes, units, depth range, classes, intrinsics."""
    from mmtk.data.info import format_info, info_json, read_info

    summary = read_info(path)
    typer.echo(info_json(summary) if as_json else format_info(summary))
