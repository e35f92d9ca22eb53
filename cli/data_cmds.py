"""`mmtk convert` (RGB-D folders, NYUv2 .mat, ROS bags, RGB image folders -> mmtk HDF5) and `mmtk info`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.app import app
from mmtk.cli.source_options import SourceFlags, bag_topics, source_options
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
@source_options("rgbd", "rosbag", "images")
def convert(
    source: SourceFlags,
    out: Optional[Path] = typer.Argument(None, help="Output .h5 file (written atomically); with several inputs or "
                                         "--shard-frames, a folder of shards."),
    classes: int = typer.Option(40, "--classes", help="NYUv2 label space: 40, 13 or 894."),
    size: Optional[str] = typer.Option(None, "--size", help="Store every frame at HxW pixels (e.g. 240x320), for "
                                       "every source alike: resized to cover HxW with its aspect ratio kept, then "
                                       "centre-cropped (intrinsics follow). Default: as read; --images: the first "
                                       "image's size."),
    stream: Optional[list[str]] = typer.Option(None, "--stream", help="--rgbd: a further image stream stored as "
                                               "modality NAME, matched to colour by file stem: NAME=GLOB "
                                               "(e.g. ir='ir/*.png'; repeatable)."),
    shard_frames: Optional[int] = typer.Option(None, "--shard-frames", help="Write OUT as a folder of shards, "
                                               "starting a new shard every N frames of an input."),
    workers: int = typer.Option(1, "--workers", help="Inputs converted at once (processes), into a shard folder."),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help="With --num-shards N: convert only the "
                                              "inputs i (sorted) with i % N == I; N machines build one folder."),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help="How many parts the inputs are split into "
                                             "(see --shard-index)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    jpeg_quality: Optional[int] = typer.Option(None, "--jpeg-quality", help="Store colour that arrives raw (PNG, "
                                               "raw Image) as JPEG at this quality, 1-100: smaller, lossy. Default: "
                                               "lossless; JPEG input is always kept as its own bytes."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists (a shard folder: convert every "
                                                      "input again)."),
) -> None:
    """Convert RGB-D data, ROS bags or RGB image folders into one mmtk HDF5 file (metres, labels, intrinsics), or
    several inputs into a folder of shards (one per input; kept on a rerun, so a killed run resumes)."""
    from mmtk.data.convert import convert_rgbd, convert_rosbag, parse_named, parse_size

    chosen = source.choose(("rgbd", "rosbag", "images"))
    if stream and chosen.kind != "rgbd":
        raise MmtkError("--stream NAME=GLOB is for --rgbd; bags take --topic NAME=/topic")
    shape = parse_size(size)
    kind, inputs, options = chosen.kind, chosen.inputs, chosen.options
    if kind == "rosbag" and not _rosbag_ready(inputs[0], options):
        return
    options.update(size=shape, **(dict(classes=classes, streams=parse_named(stream, "--stream")) if kind == "rgbd"
                                  else {}))
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
    from mmtk.data.convert import convert_images

    result = convert_images(images, out, size, force=force, progress=progress, jpeg_quality=jpeg_quality)
    counts = ", ".join(f"{split}: {n}" for split, n in result.frames.items())
    typer.echo(f"{out}: {counts} frames at {result.size[0]}x{result.size[1]} px"
               + (f"; skipped {len(result.skipped)} unreadable file(s), first: {result.skipped[0]}"
                  if result.skipped else ""))


def _rosbag_ready(bag: Path, options: dict) -> bool:
    """Whether the topics to convert ``bag`` are given; without them, list the bag's and say so."""
    if options["rgb_topic"] is None or (options["depth_topic"] is None and options["cloud_topic"] is None):
        typer.echo(f"image and point-cloud topics in {bag} (pass --rgb-topic and --depth-topic or --cloud-topic "
                   f"to convert):\n{bag_topics(bag)}")
        return False
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
