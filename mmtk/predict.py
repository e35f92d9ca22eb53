"""``mmtk predict``: read frames (image files, HDF5, ROS bags), run a trained model, write its predictions
(pictures, arrays in metres or class ids, coloured point clouds).

torch is imported inside the functions that need it, so reading and writing frames stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmtk.errors import MmtkError
from mmtk.io import atomic_write
from mmtk.visualize import colorize_depth, label_palette

if TYPE_CHECKING:
    import torch


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image file (the converters' reader); an unreadable file is a clear MmtkError."""
    from mmtk.data.sources.base import read_rgb as read_colour

    return read_colour(Path(path))


def read_depth(path: str | os.PathLike, depth_scale: float | None = None) -> np.ndarray:
    """Depth in metres, float32 [H, W], 0 = invalid, from an image (PNG/TIFF) or ``.npy`` file.

    Integer images are divided by ``depth_scale`` (units per metre: 1000 for millimetres, the default; 5000 for
    TUM RGB-D). Float images and ``.npy`` arrays are taken as metres unless ``depth_scale`` is given.
    """
    from mmtk.data.sources.base import read_depth_units, to_metres

    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale {depth_scale}: must be positive (units per metre, e.g. 1000 for mm)")
    raw = read_depth_units(Path(path))
    default = 1000.0 if np.issubdtype(raw.dtype, np.integer) else None
    return to_metres(raw, depth_scale if depth_scale is not None else default)


@dataclass
class Frame:
    """One RGB-D frame as the point-cloud and prediction commands use it."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray | None  # float32 [H, W] metres, 0 = invalid
    intrinsics: np.ndarray | None  # float32 [3, 3] pixels
    labels: np.ndarray | None = None  # int [H, W], 0 = unlabeled
    num_labels: int | None = None


METRE_UNITS = ("m", "metre", "metres", "meter", "meters")


def read_h5_frame(path: str | os.PathLike, split: str, index: int, depth_key: str = "depth",
                  label_key: str | None = None) -> Frame:
    """Frame ``index`` of ``split`` from an mmtk HDF5 file; depth must be metric (units attr "m")."""
    from mmtk.data.codecs import read_frame
    from mmtk.data.dataset import open_mmtk_file

    path = Path(path)
    with open_mmtk_file(path) as handle:
        if split not in handle:
            raise MmtkError(f"{path}: no split {split!r}; splits: {sorted(handle)}")
        group = handle[split]
        count = group["rgb"].shape[0]
        if not -count <= index < count:
            raise MmtkError(f"{path}: split {split!r} has {count} frames; index {index} is out of range")
        index %= count
        depth = None
        if depth_key:
            if depth_key not in group:
                raise MmtkError(f"{path}: split {split!r} has no dataset {depth_key!r}; datasets: {sorted(group)}")
            units = str(group[depth_key].attrs.get("units", "m"))
            if units not in METRE_UNITS:
                raise MmtkError(f"{path}: {split}/{depth_key} is in {units!r} units, not metres; a point cloud "
                                "needs metric depth (use the sensor depth or a metric model)")
            depth = np.asarray(read_frame(group[depth_key], index), dtype=np.float32)
        intrinsics = np.asarray(group["intrinsics"][index], np.float32) if "intrinsics" in group else None
        labels = num_labels = None
        if label_key:
            if label_key not in group:
                raise MmtkError(f"{path}: split {split!r} has no dataset {label_key!r}; datasets: {sorted(group)}")
            labels = read_frame(group[label_key], index)
            classes = group[label_key].attrs.get("classes")
            if classes is not None:
                import json
                num_labels = len(json.loads(classes)) + 1
        return Frame(read_frame(group["rgb"], index), depth, intrinsics, labels, num_labels)


# ------------------------------------------------------------------------------------ model side

@dataclass
class Predictor:
    """A model rebuilt from a weights file, ready for inference."""

    model: torch.nn.Module
    model_name: str
    model_args: dict
    device: str
    class_names: tuple[str, ...] = ()  # of the training file, when the checkpoint records them

    @property
    def config(self):  # mmtk.ModelConfig
        return self.model.config

    @property
    def finetuned(self) -> bool:
        return self.config.head is not None

    @property
    def available_outputs(self) -> tuple[str, ...]:
        return (self.config.task,) if self.finetuned else tuple(self.config.outputs)


def load_predictor(path: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Rebuild the model a weights file describes (mmtk checkpoint, official MultiMAE, folder, ...) for inference."""
    from dataclasses import asdict

    model = model_from_checkpoint(path)
    model.eval().to(device)
    return Predictor(model, model.model_name, asdict(model.config), device, model.class_names)


def model_from_checkpoint(source: str | os.PathLike | dict) -> torch.nn.Module:
    """The model a weights file describes, with its weights: whatever ``create_model(pretrained=...)`` reads.

    What the file does not record and had to be assumed (attention heads of an official or timm file) is
    printed in one line.
    """
    import mmtk

    from mmtk.formats import read_weights

    weights = read_weights(source)  # names the plugin file of a modality not registered
    data = weights.container.get("data", {})
    class_names = data.get("class_names") or [] if isinstance(data, dict) else None
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
        raise MmtkError(f"{weights.source}: its data.class_names is not a list of names; the checkpoint is corrupt "
                        "or forged")
    model = mmtk.create_model(pretrained=weights, verbose=False)  # checks the file's sizes before building
    model.class_names = tuple(class_names)
    if model.load_report.notes:
        print(f"{weights.source}: {'; '.join(model.load_report.notes)}")
    return model


@dataclass
class Prediction:
    """Predictions for one frame at the frame's resolution."""

    depth: np.ndarray | None = None  # float32 [H, W]
    # "m": metres (a finetuned depth model, or a pretrained MultiMAE's relative depth given the scale of the
    # frame's sensor depth); "relative": a pretrained MultiMAE's standardised depth (0 = the frame's robust mean
    # depth, 1 = its robust spread) when the frame gives no scale
    depth_units: str = ""
    depth_note: str = ""  # how metres were obtained, when not predicted as such
    semseg: np.ndarray | None = None  # uint16 [H, W], class k stored as k + 1 (0 = unlabeled)
    num_classes: int = 0
    class_names: tuple[str, ...] = ()


def build_inputs(predictor: Predictor, rgb: np.ndarray, depth_m: np.ndarray | None,
                 image_size: tuple[int, int]) -> tuple[dict, dict]:
    """Prepared, resized model inputs [1, ...] and validity maps from a frame."""
    from mmtk.data.transforms import prepare_depth, prepare_rgb

    names = set(predictor.config.inputs)
    inputs, valid = {}, {}
    if "rgb" in names:  # prepared exactly as the training data (mmtk.data.transforms)
        inputs["rgb"] = prepare_rgb(rgb, image_size, flip=False)[None]
    if depth_m is not None and "depth" in names:
        depth = prepare_depth(np.asarray(depth_m, dtype=np.float32), image_size, flip=False)
        inputs["depth"], valid["depth"] = depth["depth"][None], depth["depth_valid"][None]
    if not inputs:
        raise MmtkError(f"the model takes {list(predictor.config.inputs)} but only "
                        f"{'rgb and depth' if depth_m is not None else 'rgb'} were given")
    return inputs, valid


def predict_frame(predictor: Predictor, rgb: np.ndarray, depth_m: np.ndarray | None = None,
                  outputs: tuple[str, ...] = ("depth", "semseg"), image_size: tuple[int, int] | None = None
                  ) -> Prediction:
    """Cross-modal prediction for one frame (rgb uint8 [H, W, 3], optional depth in metres [H, W]).

    A pretrained MultiMAE sees every token of the given inputs except those of requested outputs (every
    target token is masked); a finetuned model runs its head. Results are resized back to the frame.
    """
    import torch
    import torch.nn.functional as F

    unknown = [name for name in outputs if name not in predictor.available_outputs]
    if unknown:
        raise MmtkError(f"the model cannot predict {unknown}; it predicts {list(predictor.available_outputs)}")
    size = tuple(image_size or predictor.config.image_size)
    inputs, valid = build_inputs(predictor, rgb, depth_m, size)
    inputs = {k: v.to(predictor.device) for k, v in inputs.items()}
    valid = {k: v.to(predictor.device) for k, v in valid.items()}
    frame_size = rgb.shape[:2]
    result = Prediction(num_classes=predictor.config.num_classes, class_names=predictor.class_names)
    with torch.inference_mode():
        if predictor.finetuned:
            raw = {predictor.config.task: predictor.model(inputs)}
        else:
            masks = {name: torch.full(_token_mask_shape(predictor, inputs[name], name), name in outputs,
                                      dtype=torch.bool, device=predictor.device) for name in inputs}
            if all(mask.all() for mask in masks.values()):
                raise MmtkError(f"every given input is also a requested output ({list(inputs)}); "
                                "give another input to predict from")
            raw = predictor.model(inputs, masks=masks, valid=valid).preds
    if "depth" in outputs:
        depth = F.interpolate(raw["depth"].float(), size=frame_size, mode="bilinear", align_corners=False)
        result.depth = depth[0, 0].cpu().numpy().astype(np.float32)
        result.depth_units = "m" if predictor.finetuned else "relative"
        if predictor.finetuned:
            result.depth = np.clip(result.depth, 0, None)
        elif depth_m is not None and (np.asarray(depth_m) > 0).any():  # the sensor gives the frame's scale
            from mmtk.data.transforms import robust_mean_std

            mean, std = robust_mean_std(np.asarray(depth_m, dtype=np.float32)[np.asarray(depth_m) > 0])
            result.depth = np.clip(result.depth * std + mean, 0, None).astype(np.float32)
            result.depth_units = "m"
            result.depth_note = "relative depth scaled to the sensor depth's robust mean and spread"
    if "semseg" in outputs:
        logits = F.interpolate(raw["semseg"].float(), size=frame_size, mode="bilinear", align_corners=False)
        result.semseg = (logits[0].argmax(0).cpu().numpy() + 1).astype(np.uint16)
    return result


def _token_mask_shape(predictor: Predictor, tensor: torch.Tensor, name: str) -> tuple[int, int]:
    """[B, N] shape of the token mask of a prepared input [B, C, h, w]."""
    stride = predictor.model.encoder.modalities[name].stride
    patch = predictor.config.patch_size
    return tensor.shape[0], (tensor.shape[-2] * stride // patch) * (tensor.shape[-1] * stride // patch)


# ---------------------------------------------------------------------------------------- output

def save_image(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (:func:`mmtk.io.atomic_write`; the folder's litter is swept by the caller, once)."""
    from PIL import Image

    atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"), sweep=False)


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically."""
    atomic_write(path, lambda handle: np.save(handle, array), sweep=False)


def write_prediction(out_dir: Path, stem: str, rgb: np.ndarray, prediction: Prediction,
                     sensor_depth: np.ndarray | None = None, intrinsics: np.ndarray | None = None,
                     ply: bool = False) -> list[Path]:
    """Write one frame's predictions; returns the files written.

    ``<stem>_depth.png`` (colour map with a colour bar below it) and ``<stem>_depth.npy`` (float32 metres), or
    ``<stem>_depth_relative.npy`` when the depth has no scale (see :class:`Prediction`);
    ``<stem>_semseg.png`` (colour map with a legend of the classes below it) and ``<stem>_semseg_labels.png``
    (16-bit labels, class k as k + 1); ``<stem>.ply`` when asked: metric depth (a finetuned model's, else the
    sensor's) back-projected with the intrinsics, coloured by the predicted classes when there are any, else by
    the RGB. Files get the user's umask.
    """
    from mmtk.pointcloud import depth_to_cloud, write_cloud

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if prediction.depth is not None:
        metric = prediction.depth_units == "m"
        valid = prediction.depth > 0 if metric else np.isfinite(prediction.depth)
        lo, hi = (np.percentile(prediction.depth[valid], [2, 98]) if valid.any() else (0.0, 1.0))
        picture = colorize_depth(prediction.depth, valid, (float(lo), float(hi)))
        caption = ("depth, metres" + (f" ({prediction.depth_note})" if prediction.depth_note else "") if metric
                   else "relative depth (no scale: 0 = frame's mean depth, 1 = its spread)")
        bar = depth_bar(picture.shape[1], float(lo), float(hi), "m" if metric else "", caption)
        save_image(out_dir / f"{stem}_depth.png", np.concatenate([picture, bar]))
        array_name = f"{stem}_depth.npy" if metric else f"{stem}_depth_relative.npy"
        save_array(out_dir / array_name, prediction.depth)
        written += [out_dir / f"{stem}_depth.png", out_dir / array_name]
    label_colours = None  # uint8 [H, W, 3], the picture's colours, which the point cloud reuses
    if prediction.semseg is not None:
        palette = label_palette(max(prediction.num_classes + 1, int(prediction.semseg.max()) + 1))
        label_colours = palette[prediction.semseg]
        present = [int(k) - 1 for k in np.unique(prediction.semseg) if k > 0]
        legend = class_legend(prediction.semseg.shape[1], palette, present, prediction.class_names)
        save_image(out_dir / f"{stem}_semseg.png", np.concatenate([label_colours, legend]))
        save_image(out_dir / f"{stem}_semseg_labels.png", prediction.semseg.astype(np.uint16))
        written += [out_dir / f"{stem}_semseg.png", out_dir / f"{stem}_semseg_labels.png"]
    if ply:
        metric = prediction.depth if prediction.depth_units == "m" and not prediction.depth_note else sensor_depth
        if metric is None:
            raise MmtkError("--ply needs metric depth: a finetuned depth model, or --depth with the sensor depth "
                            "(a pretrained MultiMAE predicts relative depth only)")
        if intrinsics is None:
            raise MmtkError("--ply needs the camera intrinsics: pass --intrinsics fx,fy,cx,cy")
        colors = rgb if label_colours is None else label_colours
        write_cloud(out_dir / f"{stem}.ply", depth_to_cloud(metric, intrinsics, colors), sweep=False)
        written.append(out_dir / f"{stem}.ply")
    return written


LEGEND_ROW = 16  # pixels per line of legend text


def depth_bar(width: int, lo: float, hi: float, unit: str, caption: str) -> np.ndarray:
    """uint8 [32, width, 3]: the depth colour bar from ``lo`` to ``hi`` (labelled with ``unit``) and a caption."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, 2 * LEGEND_ROW), "white")
    draw = ImageDraw.Draw(strip)
    low_text, high_text = f"{lo:.2f} {unit}".strip(), f"{hi:.2f} {unit}".strip()
    left, right = 6 * len(low_text) + 8, width - 6 * len(high_text) - 8
    ramp = np.tile(np.linspace(lo, hi, max(right - left, 2)), (10, 1))
    strip.paste(Image.fromarray(colorize_depth(ramp, np.ones(ramp.shape, bool), (lo, hi))), (left, 2))
    draw.text((2, 1), low_text, fill="black")
    draw.text((right + 4, 1), high_text, fill="black")
    draw.text((2, LEGEND_ROW + 1), caption + "; black: no value", fill="black")
    return np.asarray(strip)


def class_legend(width: int, palette: np.ndarray, classes: list[int], names: tuple[str, ...] | list[str] = ()
                 ) -> np.ndarray:
    """uint8 [rows x 16, width, 3]: a swatch and a name for each class in ``classes`` (0-based; palette row k + 1)."""
    from PIL import Image, ImageDraw

    columns = max(1, width // 110)
    rows = max(1, -(-len(classes) // columns))
    strip = Image.new("RGB", (width, rows * LEGEND_ROW + 2), "white")
    draw = ImageDraw.Draw(strip)
    for i, k in enumerate(classes):
        x, y = 4 + (i % columns) * 110, 2 + (i // columns) * LEGEND_ROW
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in palette[k + 1]))
        draw.text((x + 14, y), (names[k] if k < len(names) else f"class {k}")[:15], fill="black")
    if not classes:
        draw.text((4, 2), "no class predicted", fill="black")
    return np.asarray(strip)


# ----------------------------------------------------------------------------------- ROS images

def read_bag_frames(path: str | os.PathLike, rgb_topic: str, depth_topic: str | None = None,
                    max_gap_s: float = 0.05):
    """Frames of a ROS1/ROS2 bag for prediction: colour, with depth paired by time when a depth topic is given.

    Reading, decoding and pairing are `mmtk convert --rosbag`'s (`mmtk.data.sources.rosbag`); without a
    depth topic every colour message is a frame (depth None). Each frame has rgb, depth, intrinsics, timestamp.
    """
    from mmtk.data.sources.rosbag import open_rosbag_source, read_colour_frames

    if depth_topic is None:
        yield from read_colour_frames(path, rgb_topic)
        return
    from mmtk.data.codecs import plain

    for frame in open_rosbag_source(path, rgb_topic, depth_topic, max_dt=max_gap_s).frames():
        frame.arrays = {name: plain(value) for name, value in frame.arrays.items()}  # pixels and metres to predict on
        yield frame
