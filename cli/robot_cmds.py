"""Robot-side commands: pseudo-labels, point clouds, prediction and export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.app import PLUGIN_HELP, app, load_plugins


@app.command("pseudo-label")
def pseudo_label_command(
    files: list[Path] = typer.Argument(..., help="mmtk HDF5 file(s) of one dataset; every split with 'rgb' gets "
                                                 "pseudo-labels (in place), file by file."),
    depth_model: Optional[Path] = typer.Option(None, help="Local folder of a DPT / Depth Anything / ZoeDepth model."),
    depth_kind: Optional[str] = typer.Option(None, help="What the depth model outputs: depth (Omnidata DPT), "
                                                        "relative-inverse (MiDaS, DPT-Large) or metric (metres); "
                                                        "needed only where its config does not say."),
    semseg_model: Optional[Path] = typer.Option(None, help="Local folder of a Mask2Former / SegFormer / UperNet model."),
    batch_size: int = typer.Option(8, help="Frames per forward pass."),
    device: str = typer.Option("auto", help="auto (GPU when available; the local rank's under torchrun), cpu or cuda."),
    bf16: bool = typer.Option(True, help="bfloat16 on GPU (CPU always runs float32)."),
    overwrite: bool = typer.Option(False, help="Recompute pseudo-labels that already exist."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    shard_index: int = typer.Option(0, help="Label only this share of the files (0-based) ..."),
    num_shards: int = typer.Option(1, help="... of this many (e.g. one per machine of a SLURM array)."),
) -> None:
    """Add depth_pseudo / semseg_pseudo to HDF5 files with off-the-shelf models (offline, resumable, torchrun)."""
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
        typer.echo(f"{name}: {frames} frames labelled")


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
    color: str = typer.Option("rgb", help="Colour points by 'rgb', 'none' or an HDF5 label dataset (e.g. semseg_pseudo)."),
) -> None:
    """Write a coloured point cloud from a frame's depth (optionally coloured by semantic labels)."""
    from mmtk.errors import MmtkError
    from mmtk.pointcloud import depth_to_cloud, parse_intrinsics, write_cloud
    from mmtk.predict import Frame, read_depth, read_h5_frame, read_rgb
    from mmtk.visualize import colorize_labels

    if (h5 is None) == (rgb is None):
        raise MmtkError("give the frame either with --h5 FILE (--split, --index) or with --rgb IMAGE --depth IMAGE")
    label_key = color if color not in ("rgb", "none") else None
    if h5 is not None:
        frame = read_h5_frame(h5, split, index, depth_key, label_key)
    else:
        if depth is None:
            raise MmtkError("--rgb needs --depth (a depth image aligned with it)")
        if label_key is not None:
            raise MmtkError(f"--color {color}: label colouring needs --h5 (or --checkpoint with `mmtk predict`)")
        frame = Frame(read_rgb(rgb), read_depth(depth, depth_scale), None)
        if frame.depth.shape != frame.rgb.shape[:2]:
            raise MmtkError(f"{depth}: depth is {frame.depth.shape} but {rgb} is {frame.rgb.shape[:2]}; they must be aligned")
    k = parse_intrinsics(intrinsics) if intrinsics is not None else frame.intrinsics
    if k is None:
        raise MmtkError("no camera intrinsics to back-project the depth; pass --intrinsics fx,fy,cx,cy")
    colors = None
    if color == "rgb":
        colors = frame.rgb
    elif label_key is not None:
        colors = colorize_labels(frame.labels, frame.num_labels)
    cloud = depth_to_cloud(frame.depth, k, colors, organized=True)
    skipped = cloud.num_invalid
    written = write_cloud(out, cloud)
    typer.echo(f"{out}: {written} points written ({skipped} pixels without depth skipped)")


def _parse_size(text: Optional[str], option: str) -> Optional[tuple[int, int]]:
    from mmtk.errors import MmtkError

    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise MmtkError(f"{option} {text!r}: give HxW in pixels, e.g. 480x640") from None
    if height < 8 or width < 8:
        raise MmtkError(f"{option} {text!r}: height and width must be at least 8 pixels")
    return height, width


@app.command("predict")
def predict_command(
    checkpoint: Path = typer.Option(..., help="mmtk checkpoint (pretrained MultiMAE or finetuned model), or a run "
                                    "folder (its newest checkpoint)."),
    out: Path = typer.Option(..., help="Output folder for PNGs (colour maps), .npy depth and optional .ply."),
    rgb: Optional[Path] = typer.Option(None, help="One RGB image ..."),
    depth: Optional[Path] = typer.Option(None, help="... with an optional aligned depth image (PNG/TIFF/.npy)."),
    depth_scale: Optional[float] = typer.Option(None, help="Depth units per metre (default 1000 for integer images)."),
    h5: Optional[Path] = typer.Option(None, help="Or every frame of a split of an mmtk HDF5 file ..."),
    split: str = typer.Option("test", help="... this split ..."),
    index: Optional[int] = typer.Option(None, help="... or only this frame of it."),
    bag: Optional[Path] = typer.Option(None, help="Or the RGB images of a ROS1/ROS2 bag ..."),
    rgb_topic: str = typer.Option("/camera/rgb/image_color", help="... on this topic ..."),
    depth_topic: Optional[str] = typer.Option(None, help="... with depth from this topic (paired by time)."),
    outputs: str = typer.Option("depth,semseg", help="Comma-separated tasks to predict (those the model has)."),
    ply: bool = typer.Option(False, help="Also write a coloured .ply per frame (needs metric depth + intrinsics)."),
    intrinsics: Optional[str] = typer.Option(None, help="fx,fy,cx,cy in pixels, for --ply."),
    image_size: Optional[str] = typer.Option(None, help="HxW the model runs at (default: its training size)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Predict depth / semantics from RGB (and optional depth) with a pretrained or finetuned model."""
    load_plugins(plugin)
    from mmtk.errors import MmtkError
    from mmtk.io import remove_dead_temps
    from mmtk.pointcloud import parse_intrinsics
    from mmtk.predict import load_predictor, predict_frame, read_bag_frames, read_depth, read_rgb, write_prediction

    sources = [s for s in (rgb, h5, bag) if s is not None]
    if len(sources) != 1:
        raise MmtkError("give exactly one source: --rgb IMAGE, --h5 FILE or --bag BAG")
    if depth is not None and rgb is None:
        raise MmtkError("--depth goes with --rgb (HDF5 files and bags bring their own depth)")
    size = _parse_size(image_size, "--image-size")
    k_override = parse_intrinsics(intrinsics) if intrinsics is not None else None
    from mmtk.runs import resolve_checkpoint

    predictor = load_predictor(resolve_checkpoint(checkpoint), device)
    wanted = [name.strip() for name in outputs.split(",") if name.strip()]
    if predictor.finetuned:  # a finetuned model has one task; keep what was asked of it
        wanted = [name for name in wanted if name in predictor.available_outputs] or wanted
    wanted_t = tuple(wanted)

    def frames():
        if rgb is not None:
            image = read_rgb(rgb)
            sensor = read_depth(depth, depth_scale) if depth is not None else None
            if sensor is not None and sensor.shape != image.shape[:2]:
                raise MmtkError(f"{depth}: depth is {sensor.shape} but {rgb} is {image.shape[:2]}; they must be aligned")
            yield rgb.stem, image, sensor, None
        elif h5 is not None:
            from mmtk.data.dataset import open_mmtk_file
            from mmtk.predict import read_h5_frame

            with open_mmtk_file(h5) as handle:
                if split not in handle:
                    raise MmtkError(f"{h5}: no split {split!r}; splits: {sorted(handle)}")
                count = handle[split]["rgb"].shape[0]
                has_depth = "depth" in handle[split]
            for i in ([index] if index is not None else range(count)):
                frame = read_h5_frame(h5, split, i, "depth" if has_depth else "")
                yield f"{split}_{i % count:06d}", frame.rgb, frame.depth, frame.intrinsics
        else:
            for i, frame in enumerate(read_bag_frames(bag, rgb_topic, depth_topic)):
                yield f"frame_{i:06d}", frame.arrays["rgb"], frame.arrays.get("depth"), frame.intrinsics

    remove_dead_temps(out)  # once: each picture's atomic write skips the sweep
    count = 0
    for stem, image, sensor, k in frames():
        prediction = predict_frame(predictor, image, sensor, wanted_t, size)
        written = write_prediction(out, stem, image, prediction, sensor, k_override if k_override is not None else k, ply)
        count += 1
        typer.echo(f"{stem}: " + ", ".join(p.name for p in written))
    typer.echo(f"{count} frame(s) predicted into {out}")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Finetuned mmtk checkpoint."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file."),
    inputs: Optional[str] = typer.Option(None, help="Comma-separated inputs the graph takes (default: the model's)."),
    image_size: Optional[str] = typer.Option(None, help="HxW of the graph (default: the training size)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    plugin: Optional[list[Path]] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Export a finetuned model to ONNX (fixed inputs and size), checked against ONNX Runtime."""
    load_plugins(plugin)
    from mmtk.export import export_onnx

    names = tuple(n.strip() for n in inputs.split(",")) if inputs else None
    result = export_onnx(checkpoint, onnx, names, _parse_size(image_size, "--image-size"), opset)
    typer.echo(f"{result.path}: inputs {', '.join(result.inputs)} at {result.image_size[0]}x{result.image_size[1]} px, "
               f"output {result.output}; max |onnxruntime - pytorch| = {result.max_abs_diff:.2e}")
