"""``mmtk predict``: the data path run forward.

A source yields frames (:class:`mmtk.data.sources.frame.Frame`: image files, RGB-D folders, mmtk datasets, ROS
bags); every model input is prepared from the frame by its adapter's :meth:`~mmtk.modality.Modality.load`, as
training prepares it; the model runs; each output comes back at the frame's resolution as its adapter stores it
(labels, values in the adapter's units, images) and is written as pictures with legends and units, arrays and
point clouds (:func:`write_prediction`), or as ROS messages (:mod:`mmtk.bag_writer`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from mmtk.data.sources.frame import Frame
from mmtk.errors import MmtkError
from mmtk.io import atomic_write
from mmtk.modality import Modality, StoredArray, get_modality, stored_array
from mmtk.visualize import label_palette, label_picture, value_picture

if TYPE_CHECKING:
    import torch

RELATIVE = "relative"  # the units of a pretrained MultiMAE's standardised value when the frame gives no scale


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

    @property
    def default_outputs(self) -> tuple[str, ...]:
        """What is predicted unless asked otherwise: a finetuned model's task; a pretrained model's outputs that are
        tasks (their modality names a task family: depth, semseg, a plugin's), not the reconstructed inputs."""
        if self.finetuned:
            return self.available_outputs
        return tuple(name for name in self.available_outputs if get_modality(name).task_family is not None)

    @cached_property
    def input_adapters(self) -> dict[str, Modality]:
        """The adapter of each model input, built once for every frame it prepares."""
        return input_adapters(self.config)


def input_adapters(config) -> dict[str, Modality]:
    """The adapter of each input of a model config (an :class:`mmtk.ModelConfig`), by name."""
    return {name: get_modality(name)(config.patch_size, config.num_classes) for name in config.inputs}


def load_predictor(path: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Rebuild the model a weights file describes (mmtk checkpoint, official MultiMAE, folder, ...) for inference."""
    from dataclasses import asdict

    from mmtk.registry import model_from_checkpoint

    model = model_from_checkpoint(path)
    model.eval().to(device)
    return Predictor(model, model.model_name, asdict(model.config), device, model.class_names)


@dataclass
class Output:
    """One predicted modality of one frame at the frame's resolution, as its adapter stores it."""

    name: str
    stored: StoredArray  # how the modality's adapter stores it: kind ("labels", "metric", "image") and units
    values: np.ndarray  # labels: uint16 [H, W], class k as k + 1; metric: float32 [H, W]; image: uint8 [H, W, 3]
    units: str = ""  # metric: the adapter's units, or RELATIVE (0 = the frame's robust mean, 1 = its spread)
    note: str = ""  # how the units were obtained, when not predicted as such
    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    @property
    def metres(self) -> bool:
        """Metric values predicted in metres (not rescaled from the frame's own measurement)."""
        return self.stored.kind == "metric" and self.units == "m" and not self.note


@dataclass
class Prediction:
    """The outputs predicted for one frame."""

    outputs: dict[str, Output] = field(default_factory=dict)


def output_array(name: str) -> StoredArray:
    """How an output is written: the array its adapter stores under its name (else its first), or MmtkError."""
    cls = get_modality(name)
    stores = sorted(cls.stores, key=lambda stored: stored.name != name)
    if not stores:
        raise MmtkError(f"mmtk predict cannot write {name!r}: its adapter stores no array (nothing says its units "
                        f"or how to picture it); predict another output")
    return stores[0]


def decoded(frame: Frame) -> Frame:
    """``frame`` with its arrays as numbers (a source hands over JPEG bytes and integer depth as it got them)."""
    from mmtk.data.codecs import plain

    return replace(frame, arrays={name: plain(value) for name, value in frame.arrays.items()})


def prepare_inputs(predictor: Predictor, frame: Frame, image_size: tuple[int, int]) -> tuple[dict, dict]:
    """Model inputs [1, ...] and validity maps of a frame, each prepared by its adapter's ``load`` (as training does).

    Every model input whose stored arrays the frame holds is prepared; the others are left out.
    """
    from mmtk.data.transforms import full_window

    first = next(iter(frame.arrays.values()))
    window = full_window(*first.shape[:2])

    def read(name: str) -> np.ndarray:
        return frame.intrinsics if name == "intrinsics" else frame.arrays[name]

    have = set(frame.arrays) | ({"intrinsics"} if frame.intrinsics is not None else set())
    inputs, valid = {}, {}
    for name, adapter in predictor.input_adapters.items():
        if not set(adapter.reads()) <= have:
            continue
        try:
            prepared = adapter.load(read, window, image_size)
        except MmtkError as err:
            raise MmtkError(f"frame {frame.frame_id}: {err}") from None
        inputs[name] = prepared[name][None]
        if f"{name}_valid" in prepared:
            valid[name] = prepared[f"{name}_valid"][None]
    if not inputs:
        raise MmtkError(f"the model takes {list(predictor.config.inputs)} but frame {frame.frame_id} holds "
                        f"{sorted(have)}; give a source with one of its inputs (a plugin modality: --topic/--plugin)")
    return inputs, valid


def predicted_frames(predictor: Predictor, frames: Iterable[Frame], outputs: tuple[str, ...] | None = None,
                     image_size: tuple[int, int] | None = None,
                     intrinsics: np.ndarray | None = None) -> Iterator[tuple[Frame, Prediction]]:
    """Each frame of a source, decoded once (with ``intrinsics`` instead of its own, when given: every use of the
    camera, an xyz input or a point cloud, takes them), and what the model predicts of it (:func:`predict_frame`)."""
    stores = output_arrays(predictor, predictor.default_outputs if outputs is None else outputs)
    for frame in frames:
        frame = decoded(frame)
        if intrinsics is not None:
            frame = replace(frame, intrinsics=intrinsics)
        yield frame, _predict_decoded(predictor, frame, stores, image_size)


def output_arrays(predictor: Predictor, outputs: tuple[str, ...]) -> dict[str, StoredArray]:
    """How each requested output is written (:func:`output_array`); MmtkError for one the model cannot predict."""
    unknown = [name for name in outputs if name not in predictor.available_outputs]
    if unknown:
        raise MmtkError(f"the model cannot predict {unknown}; it predicts {list(predictor.available_outputs)}")
    return {name: output_array(name) for name in outputs}


def predict_frame(predictor: Predictor, frame: Frame, outputs: tuple[str, ...] | None = None,
                  image_size: tuple[int, int] | None = None) -> Prediction:
    """Cross-modal prediction for one frame.

    A pretrained MultiMAE sees every token of the given inputs except those of requested outputs (every
    target token is masked); a finetuned model runs its head. Results are resized back to the frame. ``frame``
    may hold what a source hands over (JPEG bytes, integer depth): it is decoded first. ``outputs``: default
    :attr:`Predictor.default_outputs`.
    """
    stores = output_arrays(predictor, predictor.default_outputs if outputs is None else outputs)
    return _predict_decoded(predictor, decoded(frame), stores, image_size)


def _predict_decoded(predictor: Predictor, frame: Frame, stores: dict[str, StoredArray],
                     image_size: tuple[int, int] | None) -> Prediction:
    """:func:`predict_frame` of a decoded frame, its outputs checked."""
    import torch

    outputs = tuple(stores)
    inputs, valid = prepare_inputs(predictor, frame, tuple(image_size or predictor.config.image_size))
    inputs = {k: v.to(predictor.device) for k, v in inputs.items()}
    valid = {k: v.to(predictor.device) for k, v in valid.items()}
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
    size = next(iter(frame.arrays.values())).shape[:2]
    result = Prediction()
    for name, stored in stores.items():
        logits = torch.nn.functional.interpolate(raw[name].float(), size=size, mode="bilinear", align_corners=False)
        result.outputs[name] = DECODERS[stored.kind](predictor, frame, name, stored, logits[0].cpu())
    return result


def _labels(predictor: Predictor, frame: Frame, name: str, stored: StoredArray, logits: torch.Tensor) -> Output:
    labels = (logits.argmax(0).numpy() + 1).astype(np.uint16)
    return Output(name, stored, labels, num_classes=predictor.config.num_classes, class_names=predictor.class_names)


def _metric(predictor: Predictor, frame: Frame, name: str, stored: StoredArray, values: torch.Tensor) -> Output:
    """A finetuned head predicts the adapter's units; a pretrained MultiMAE predicts standardised values, which the
    adapter scales back with the frame's measurement of the same modality (Modality.to_units), else stay relative."""
    values = values[0].numpy().astype(np.float32)
    if predictor.finetuned:  # in its task family's units (depth_pseudo stores several kinds; its head predicts m)
        return Output(name, stored, np.clip(values, 0, None), get_modality(name).family().units or stored.units)
    measured = frame.arrays.get(name)
    if measured is None or not (np.asarray(measured) > 0).any():
        return Output(name, stored, values, RELATIVE)
    import torch

    measured = torch.from_numpy(np.asarray(measured, dtype=np.float32))[None, None]
    scaled = get_modality(name)().to_units(torch.from_numpy(values)[None, None], measured, measured > 0)
    if scaled is None:
        return Output(name, stored, values, RELATIVE)
    return Output(name, stored, np.clip(scaled[0, 0].numpy(), 0, None).astype(np.float32), stored.units,
                  f"relative {name} scaled by its adapter to the frame's sensor {name}")


def _image(predictor: Predictor, frame: Frame, name: str, stored: StoredArray, prepared: torch.Tensor) -> Output:
    picture = get_modality(name)().picture(prepared)
    if picture is None:
        raise MmtkError(f"mmtk predict cannot write {name!r}: its adapter draws no picture of it (Modality.picture)")
    return Output(name, stored, picture)


# How a predicted map [C, H, W] becomes an output, by the kind of array its adapter stores.
DECODERS: dict[str, Callable[..., Output]] = {"labels": _labels, "metric": _metric, "image": _image}


def _token_mask_shape(predictor: Predictor, tensor: torch.Tensor, name: str) -> tuple[int, int]:
    """[B, N] shape of the token mask of a prepared input [B, C, h, w]."""
    stride = predictor.model.encoder.modalities[name].stride
    patch = predictor.config.patch_size
    return tensor.shape[0], (tensor.shape[-2] * stride // patch) * (tensor.shape[-1] * stride // patch)


# ---------------------------------------------------------------------------------------- output

def palette_of(output: Output) -> np.ndarray:
    """The label colours of a labels output (one palette for its picture, its coloured topic and point clouds)."""
    return label_palette(max(output.num_classes + 1, int(output.values.max()) + 1))


@dataclass
class CloudSource:
    """What a point cloud of a frame is made of: metric depth [H, W], colours [H, W, 3], labels [H, W] or None."""

    depth_m: np.ndarray
    colours: np.ndarray | None
    labels: np.ndarray | None


def cloud_source(frame: Frame, prediction: Prediction) -> CloudSource | None:
    """Depth in metres (predicted, else the frame's own), coloured by the first predicted labels (else the frame's
    colour image); None when neither the prediction nor the frame has depth in metres."""
    predicted = [out.values for out in prediction.outputs.values() if out.metres]
    measured = [array for name, array in frame.arrays.items() if _is_metres(name)]
    depth = (predicted + measured or [None])[0]
    if depth is None:
        return None
    labelled = [out for out in prediction.outputs.values() if out.stored.kind == "labels"]
    colour = [array for array in frame.arrays.values() if array.ndim == 3 and array.shape[2] == 3
              and array.dtype == np.uint8]
    if labelled:
        return CloudSource(depth, palette_of(labelled[0])[labelled[0].values], labelled[0].values)
    return CloudSource(depth, colour[0] if colour else None, None)


def _is_metres(name: str) -> bool:
    stored = stored_array(name)[1]
    return stored.kind == "metric" and stored.units == "m"


def save_image(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (:func:`mmtk.io.atomic_write`; the folder's litter is swept by the caller, once)."""
    from PIL import Image

    atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"), sweep=False)


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically."""
    atomic_write(path, lambda handle: np.save(handle, array), sweep=False)


def _write_metric(out_dir: Path, stem: str, output: Output) -> list[Path]:
    """``<stem>_<name>.png`` (colour map above a colour bar in its units) and ``<stem>_<name>.npy``
    (``_relative.npy`` without a scale)."""
    relative = output.units == RELATIVE
    valid = np.isfinite(output.values) if relative else output.values > 0
    caption = (f"relative {output.name} (no scale: 0 = frame's mean, 1 = its spread)" if relative
               else f"{output.name}, {output.units}" + (f" ({output.note})" if output.note else ""))
    picture = value_picture(output.values, valid, "" if relative else output.units, caption)
    array = out_dir / f"{stem}_{output.name}{'_relative' if relative else ''}.npy"
    save_image(out_dir / f"{stem}_{output.name}.png", picture)
    save_array(array, output.values)
    return [out_dir / f"{stem}_{output.name}.png", array]


def _write_labels(out_dir: Path, stem: str, output: Output) -> list[Path]:
    """``<stem>_<name>.png`` (colour map above a legend of the classes) and ``<stem>_<name>_labels.png`` (16-bit)."""
    save_image(out_dir / f"{stem}_{output.name}.png", label_picture(output.values, palette_of(output),
                                                                      output.class_names))
    save_image(out_dir / f"{stem}_{output.name}_labels.png", output.values)
    return [out_dir / f"{stem}_{output.name}.png", out_dir / f"{stem}_{output.name}_labels.png"]


def _write_image(out_dir: Path, stem: str, output: Output) -> list[Path]:
    save_image(out_dir / f"{stem}_{output.name}.png", output.values)
    return [out_dir / f"{stem}_{output.name}.png"]


FILE_WRITERS: dict[str, Callable[[Path, str, Output], list[Path]]] = {
    "metric": _write_metric, "labels": _write_labels, "image": _write_image}


def write_prediction(out_dir: Path, stem: str, frame: Frame, prediction: Prediction, ply: bool = False) -> list[Path]:
    """Write one frame's outputs into ``out_dir``; returns the files written (with the user's umask).

    Per output, by the kind of array its adapter stores: values (depth) as a colour map with a colour bar in its
    units and a ``.npy`` array; labels (semseg) as a colour map with a legend of the classes and a 16-bit label
    PNG (class k as k + 1); images as a PNG. With ``ply``, ``<stem>.ply``: depth in metres (:func:`cloud_source`)
    back-projected with the frame's intrinsics, coloured by the predicted classes or the colour image.
    """
    from mmtk.pointcloud import depth_to_cloud, write_cloud

    source, k = (cloud_source(frame, prediction) if ply else None), frame.intrinsics
    if ply and source is None:  # refused before anything of the frame is written
        raise MmtkError("--ply needs metric depth: a finetuned depth model, or sensor depth in the frame (--depth, "
                        "a dataset or bag with depth); a pretrained MultiMAE predicts relative depth only")
    if ply and k is None:
        raise MmtkError("--ply needs the camera intrinsics: pass --intrinsics fx,fy,cx,cy")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for output in prediction.outputs.values():
        written += FILE_WRITERS[output.stored.kind](out_dir, stem, output)
    if ply:
        write_cloud(out_dir / f"{stem}.ply", depth_to_cloud(source.depth_m, k, source.colours), sweep=False)
        written.append(out_dir / f"{stem}.ply")
    return written


def file_stem(frame: Frame, index: int) -> str:
    """A file-name stem for a frame: its id with path separators and odd characters replaced, image suffix dropped."""
    from mmtk.data.sources.image_files import IMAGE_SUFFIXES

    text = str(frame.frame_id) if frame.frame_id is not None else f"frame_{index:06d}"
    for suffix in IMAGE_SUFFIXES:
        text = text.removesuffix(suffix).removesuffix(suffix.upper())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or f"frame_{index:06d}"
