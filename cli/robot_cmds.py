"""Robot-side commands: pseudo-labels, point clouds, prediction and export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmtk.cli.main import app


@app.command("pseudo-label")
def pseudo_label_command(
    file: Path = typer.Argument(..., help="mmtk HDF5 file; every split with 'rgb' gets pseudo-labels (in place)."),
    depth_model: Optional[Path] = typer.Option(None, help="Local folder of a DPT / Depth Anything model."),
    semseg_model: Optional[Path] = typer.Option(None, help="Local folder of a Mask2Former / SegFormer / UperNet model."),
    batch_size: int = typer.Option(8, help="Frames per forward pass."),
    device: str = typer.Option("auto", help="auto (GPU when available), cpu or cuda."),
    bf16: bool = typer.Option(True, help="bfloat16 on GPU (CPU always runs float32)."),
    overwrite: bool = typer.Option(False, help="Recompute pseudo-labels that already exist."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Add depth_pseudo / semseg_pseudo to an HDF5 file with off-the-shelf models (offline, resumable)."""
    from mmtk.pseudo_label import PseudoLabelConfig, pseudo_label

    config = PseudoLabelConfig(depth_model=depth_model, semseg_model=semseg_model, batch_size=batch_size,
                               device=device, bf16=bf16, overwrite=overwrite, progress=progress)
    try:
        done = pseudo_label(file, config, log=typer.echo)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished batches are kept in {file}: run the same command again to resume", err=True)
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
    from mmtk.pointcloud import depth_to_cloud, parse_intrinsics, write_cloud
    from mmtk.predict import colorize_labels, read_depth, read_h5_frame, read_rgb

    from mmtk.errors import MmtkError

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
        from mmtk.predict import Frame
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
