"""Robot-side commands: pseudo-labels, point clouds, prediction and export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from mmtk.cli.app import DEVICE_HELP, PLUGIN_HELP, app, load_plugins
from mmtk.cli.source_options import SourceChoice, SourceFlags, bag_topics, source_options

if TYPE_CHECKING:
    from mmtk.data.sources.frame import Frame


@app.command("pseudo-label")
def pseudo_label_command(
    files: list[Path] = typer.Argument(..., help="mmtk HDF5 file(s) of one dataset; every split with 'rgb' gets "
                                                 "pseudo-labels (in place), file by file."),
    depth_model: Optional[Path] = typer.Option(None, help="Local folder of a DPT / Depth Anything / ZoeDepth model."),
    depth_kind: Optional[str] = typer.Option(None, help="What the depth model outputs: depth (Omnidata DPT), "
                                                        "relative-inverse (MiDaS, DPT-Large) or metric (metres); "
                                                        "needed only where its config does not say."),
    semseg_model: Optional[Path] = typer.Option(None, help="Local folder of a Mask2Former / SegFormer / UperNet "
                                                           "model."),
    batch_size: int = typer.Option(8, help="Frames per forward pass."),
    device: str = typer.Option("auto", help="auto (GPU when available; the local rank's under torchrun), cpu or cuda."),
    bf16: bool = typer.Option(True, help="bfloat16 on GPU (CPU always runs float32)."),
    overwrite: bool = typer.Option(False, help="Recompute pseudo-labels that already exist."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    shard_index: int = typer.Option(0, help="Label only this share of the files (0-based) ..."),
    num_shards: int = typer.Option(1, help="... of this many (e.g. one per machine of a SLURM array)."),
) -> None:
    """Add depth_pseudo / semseg_pseudo to HDF5 files with off-the-shelf models (offline, resumable, torchrun)."""
    from mmtk.progress import counted
    from mmtk.pseudo_label import PseudoLabelConfig, pseudo_label

    config = PseudoLabelConfig(depth_model=depth_model, semseg_model=semseg_model, depth_kind=depth_kind,
                               batch_size=batch_size, device=device, bf16=bf16, overwrite=overwrite,
                               progress=progress, shard_index=shard_index, num_shards=num_shards)
    try:
        done = pseudo_label(files, config, log=typer.echo)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished batches are kept in {', '.join(map(str, files))}: run the same command "
                   "again to resume", err=True)
        raise typer.Exit(130)
    for name, frames in done.items():
        typer.echo(f"{name}: {counted(frames, 'frame')} labelled")


@app.command("export-pointcloud")
def export_pointcloud_command(
    out: Path = typer.Argument(..., help="Output .ply or .pcd file."),
    h5: Optional[Path] = typer.Option(None, help="Take the frame from this mmtk HDF5 file ..."),
    split: str = typer.Option("test", help="... from this split ..."),
    index: int = typer.Option(0, help="... at this index."),
    depth_key: str = typer.Option("depth", help="HDF5 dataset with metric depth (metres)."),
    rgb: Optional[Path] = typer.Option(None, help="Or take the frame from an RGB image ..."),
    depth: Optional[Path] = typer.Option(None, help="... and a depth image (PNG/TIFF/.npy) aligned with it."),
    depth_scale: Optional[float] = typer.Option(None, help="Depth units per metre (default 1000 for integer images)."),
    intrinsics: Optional[str] = typer.Option(None, help="fx,fy,cx,cy in pixels (overrides the HDF5 intrinsics)."),
    color: str = typer.Option("rgb", help="Colour points by a stored array: a colour image ('rgb'), labels (e.g. "
                                          "semseg_pseudo), or 'none'."),
) -> None:
    """Write a coloured point cloud from a frame's depth (optionally coloured by semantic labels)."""
    from mmtk.errors import MmtkError
    from mmtk.pointcloud import depth_to_cloud, frame_colours, parse_intrinsics, write_cloud

    if (h5 is None) == (rgb is None):
        raise MmtkError("give the frame either with --h5 FILE (--split, --index) or with --rgb IMAGE --depth IMAGE")
    colour = None if color == "none" else color
    num_labels = None
    if h5 is not None:
        from mmtk.data.sources.mmtk_files import check_metres, class_count, frame_location, open_split, read_frame

        h5, index = frame_location(h5, split, index)
        with open_split(h5, split) as group:
            frame = read_frame(group, index, [depth_key] + ([colour] if colour else []))
            check_metres(group, depth_key)
            num_labels = class_count(group, colour) if colour else None
    else:
        from mmtk.data.sources.open_source import open_source

        if depth is None:
            raise MmtkError("--rgb needs --depth (a depth image aligned with it)")
        frame = next(open_source("image", rgb, depth=depth, depth_scale=depth_scale).frames())
        if depth_key not in frame.arrays:
            raise MmtkError(f"--depth-key {depth_key} names an array of an --h5 file; with --rgb and --depth leave it "
                            f"out")
    k = parse_intrinsics(intrinsics) if intrinsics is not None else frame.intrinsics
    if k is None:
        raise MmtkError("no camera intrinsics to back-project the depth; pass --intrinsics fx,fy,cx,cy")
    cloud = depth_to_cloud(frame.arrays[depth_key], k, frame_colours(frame.arrays, colour, num_labels),
                           organized=True)
    written = write_cloud(out, cloud)
    typer.echo(f"{out}: {written} points written ({cloud.num_invalid} pixels without depth skipped)")


@app.command("predict")
@source_options("rgbd", "rosbag", "images", "data")
def predict_command(
    source: SourceFlags,
    checkpoint: Path = typer.Option(..., help="A weights file (mmtk checkpoint, official MultiMAE, ...), a model "
                                    "folder, or a run folder (its newest checkpoint)."),
    out: Path = typer.Option(..., help="Output folder (PNGs with legends, .npy arrays, optional .ply); with --rosbag, "
                             "or a .bag (ROS1) / .mcap (ROS 2) file of prediction topics stamped like the input."),
    rgb: Optional[Path] = typer.Option(None, help="One RGB image ..."),
    depth: Optional[Path] = typer.Option(None, help="... with an optional aligned depth image (PNG/TIFF/.npy)."),
    split: str = typer.Option("test", help="--data: this split ..."),
    index: Optional[int] = typer.Option(None, help="... or only this frame of it."),
    outputs: Optional[str] = typer.Option(None, help="Comma-separated outputs to predict (default: a finetuned "
                                          "model's task; a pretrained model's task outputs, e.g. depth,semseg)."),
    ply: bool = typer.Option(False, help="Also write a coloured .ply per frame (needs metric depth + intrinsics)."),
    intrinsics: Optional[str] = typer.Option(None, help="fx,fy,cx,cy in pixels (default: the source's)."),
    image_size: Optional[str] = typer.Option(None, help="HxW the model runs at (default: its training size)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Predict depth / semantics (any output of the model) from any source `mmtk convert` takes, an mmtk dataset or
    one image."""
    from mmtk.data.convert import parse_size
    from mmtk.errors import MmtkError
    from mmtk.io import remove_dead_temps
    from mmtk.pointcloud import parse_intrinsics
    from mmtk.bag_writer import BAG_SUFFIXES
    from mmtk.data.sources.open_source import open_source
    from mmtk.predict import file_stem, load_predictor, predicted_frames, write_prediction
    from mmtk.progress import counted
    from mmtk.train.run_folders import resolve_checkpoint
    from mmtk.runtime import pick_device

    chosen = source.choose(("rgbd", "rosbag", "images", "data"), {"--rgb IMAGE": rgb is not None})
    if depth is not None and rgb is None:
        raise MmtkError("--depth goes with --rgb (folders, datasets and bags bring their own depth)")
    to_bag = out.suffix in BAG_SUFFIXES
    if to_bag and (chosen is None or chosen.kind != "rosbag" or len(chosen.inputs) != 1):
        raise MmtkError(f"--out {out}: a bag output is stamped like its input bag; give --rosbag BAG (one bag), or an "
                        f"output folder")
    if to_bag and ply:
        raise MmtkError("--ply writes files into a folder; a bag output carries the point cloud as /mmtk/points")
    frames = (open_source("image", rgb, depth=depth, depth_scale=source.depth_scale).frames() if chosen is None
              else _source_frames(chosen, split, index))
    size = parse_size(image_size, "--image-size")
    k_override = parse_intrinsics(intrinsics) if intrinsics is not None else None
    predictor = load_predictor(resolve_checkpoint(checkpoint), str(pick_device(device)))
    wanted = tuple(name.strip() for name in outputs.split(",") if name.strip()) if outputs is not None else None
    predicted = predicted_frames(predictor, frames, wanted, size, k_override)

    count = 0
    if to_bag:
        from mmtk.bag_writer import PredictionBag

        with PredictionBag(out) as bag:
            for frame, prediction in predicted:
                bag.write(frame, prediction)
                count += 1
        topics = ", ".join(f"{name} ({n})" for name, n in bag.counts.items())
        typer.echo(f"{counted(count, 'frame')} predicted into {out}: {topics}")
        return
    remove_dead_temps(out)  # once: each picture's atomic write skips the sweep
    stems: set[str] = set()
    for frame, prediction in predicted:
        stem = file_stem(frame, count)
        stem = stem if stem not in stems else f"{stem}_{count:06d}"
        stems.add(stem)
        written = write_prediction(out, stem, frame, prediction, ply)
        count += 1
        typer.echo(f"{stem}: " + ", ".join(p.name for p in written))
    typer.echo(f"{counted(count, 'frame')} predicted into {out}")


def _source_frames(chosen: SourceChoice, split: str, index: Optional[int]) -> Iterator[Frame]:
    """The frames of every input of the chosen source, each opened (and so checked) before any frame is read."""
    from mmtk.data.sources.open_source import open_source
    from mmtk.errors import MmtkError

    if chosen.kind == "rosbag" and chosen.options["rgb_topic"] is None:
        bag = chosen.inputs[0]
        raise MmtkError(f"--rosbag {bag}: give its colour topic with --rgb-topic (and --depth-topic or --cloud-topic "
                        f"for depth); its image and point-cloud topics: "
                        + "; ".join(" ".join(line.split()) for line in bag_topics(bag).splitlines()))
    options = dict(chosen.options, **(dict(split=split, index=index) if chosen.kind == "data" else {}))
    sources = [open_source(chosen.kind, path, **options) for path in chosen.inputs]
    return (frame for opened in sources for frame in opened.frames())


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="A finetuned mmtk checkpoint, or a run folder of `mmtk finetune` "
                                      "(its newest checkpoint)."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file."),
    inputs: Optional[str] = typer.Option(None, help="Comma-separated inputs the graph takes (default: the model's)."),
    image_size: Optional[str] = typer.Option(None, help="HxW of the graph (default: the training size)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Export a finetuned model to ONNX (fixed inputs and size), checked against ONNX Runtime."""
    load_plugins(plugin)
    from mmtk.data.convert import parse_size
    from mmtk.export import export_onnx
    from mmtk.train.run_folders import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint, "CHECKPOINT")
    names = tuple(n.strip() for n in inputs.split(",")) if inputs else None
    result = export_onnx(checkpoint, onnx, names, parse_size(image_size, "--image-size"), opset)
    typer.echo(f"{result.path}: inputs {', '.join(result.inputs)} at {result.image_size[0]}x{result.image_size[1]} px, "
               f"output {result.output}; max |onnxruntime - pytorch| = {result.max_abs_diff:.2e}")
