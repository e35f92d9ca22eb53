"""Pseudo-labels from off-the-shelf networks: relative depth and semantic segmentation from RGB alone.

`pseudo_label` adds ``depth_pseudo`` and/or ``semseg_pseudo`` to every split of an mmtk HDF5 file, using
Hugging Face transformers models loaded from local folders only (no network access is ever attempted):

- depth: DPT (``dpt``) and Depth Anything (``depth_anything``);
- segmentation: Mask2Former (``mask2former``), SegFormer (``segformer``), UperNet (``upernet``).

A folder is what ``save_pretrained`` writes for the model *and* its image processor
(``config.json``, weights, ``preprocessor_config.json``).

Depth. Relative DPT / Depth Anything models predict relative *inverse* depth (larger = nearer, unknown scale
and shift). It is stored as a relative depth that grows with distance: ``1 / max(out, 1% of the frame's max)``,
divided by its frame median (so 1 = the frame's median distance; units attr ``relative``). A metric Depth
Anything model (``depth_estimation_type: metric``) is stored as is, in metres (units attr ``m``).

Segmentation. Model class ``c`` (0-based ``id2label`` order) is stored as label ``c + 1``; 0 stays "unlabeled";
the ``classes`` attr lists the model's class names (class k is classes[k-1]), as for ``semseg``.

Resuming. Work goes into ``<name>.partial`` with a ``frames_done`` attr updated after every batch; the
dataset gets its final name only when the split is complete. Running the same command again continues where
an interrupted run stopped. A finished dataset is skipped unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmtk.data.format import PARTIAL_SUFFIX, PREDICTED_ATTR
from mmtk.errors import MmtkError
from mmtk.progress import frame_bar

DEPTH_FAMILIES = ("dpt", "depth_anything")
SEMSEG_FAMILIES = ("mask2former", "segformer", "upernet")
DEPTH_KEY = "depth_pseudo"
SEMSEG_KEY = "semseg_pseudo"
INVERSE_CLIP_FRACTION = 0.01  # inverse depth is clipped at this fraction of the frame max before inverting


@dataclass
class PseudoLabelConfig:
    """Settings of one pseudo-labelling run.

    Attributes:
        depth_model: folder of a DPT / Depth Anything model, or None.
        semseg_model: folder of a Mask2Former / SegFormer / UperNet model, or None.
        batch_size: frames per forward pass.
        device: "auto" (cuda when available), "cpu" or "cuda[:i]".
        bf16: run in bfloat16 on GPU (ignored on CPU, which runs float32).
        overwrite: recompute datasets that are already complete (or partial from another model).
        progress: show a progress bar.
    """

    depth_model: str | os.PathLike | None = None
    semseg_model: str | os.PathLike | None = None
    batch_size: int = 8
    device: str = "auto"
    bf16: bool = True
    overwrite: bool = False
    progress: bool = True


@dataclass
class LoadedModel:
    """A model, its image processor and what we record about it."""

    task: str  # "depth" or "semseg"
    family: str  # config.model_type
    path: Path
    model: Any
    processor: Any
    metric: bool = False  # depth in metres (metric Depth Anything) rather than relative inverse depth

    @property
    def class_names(self) -> list[str]:
        """Class names in class-index order (segmentation models)."""
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]


def _import_transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:
        raise MmtkError("pseudo-labelling needs the transformers package; install it with "
                        "`pip install mmtk[pseudo]`") from err
    transformers.logging.set_verbosity_error()
    return transformers


def _read_model_type(path: Path, option: str) -> str:
    if not path.is_dir():
        raise MmtkError(f"{option} {path}: no such folder; give a folder written by save_pretrained "
                        "(config.json, weights, preprocessor_config.json)")
    config = path / "config.json"
    if not config.is_file():
        raise MmtkError(f"{option} {path}: no config.json; give a Hugging Face model folder written by save_pretrained")
    try:
        model_type = json.loads(config.read_text())["model_type"]
    except (ValueError, KeyError) as err:
        raise MmtkError(f"{option} {path}: config.json is not a transformers model config (no model_type)") from err
    if not (path / "preprocessor_config.json").is_file():
        raise MmtkError(f"{option} {path}: no preprocessor_config.json; save the model's image processor into the "
                        "same folder (processor.save_pretrained)")
    return str(model_type)


def load_model(path: str | os.PathLike, task: str) -> LoadedModel:
    """Load a depth ("depth") or segmentation ("semseg") model and its image processor from a local folder.

    Raises MmtkError for a missing folder, a folder that is not a model, or a model of the wrong family.
    """
    option = "--depth-model" if task == "depth" else "--semseg-model"
    families = DEPTH_FAMILIES if task == "depth" else SEMSEG_FAMILIES
    path = Path(path)
    family = _read_model_type(path, option)
    if family not in families:
        raise MmtkError(f"{option} {path}: a {family!r} model cannot be used for {task}; "
                        f"supported families: {', '.join(families)}")
    transformers = _import_transformers()
    model_class = {
        "dpt": transformers.DPTForDepthEstimation,
        "depth_anything": transformers.DepthAnythingForDepthEstimation,
        "segformer": transformers.SegformerForSemanticSegmentation,
        "upernet": transformers.UperNetForSemanticSegmentation,
        "mask2former": transformers.Mask2FormerForUniversalSegmentation,
    }[family]
    try:
        model = model_class.from_pretrained(path, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:  # corrupt weights raise library-specific types (e.g. SafetensorError)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MmtkError(f"{option} {path}: cannot load the {family} model ({first_line})") from err
    model.eval()
    metric = family == "depth_anything" and getattr(model.config, "depth_estimation_type", "relative") == "metric"
    return LoadedModel(task, family, path, model, processor, metric)


def inverse_to_relative_depth(inverse: np.ndarray) -> np.ndarray:
    """Relative depth (float32, frame median 1, grows with distance) from relative inverse depth [H, W].

    Values below ``INVERSE_CLIP_FRACTION`` of the frame max (sky, far background) are clipped first so the
    inverse stays bounded. A frame whose prediction is nowhere positive gives all zeros (invalid).
    """
    inverse = np.asarray(inverse, dtype=np.float64)
    top = float(np.nanmax(inverse)) if inverse.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros(inverse.shape, dtype=np.float32)
    depth = 1.0 / np.clip(np.nan_to_num(inverse, nan=0.0), top * INVERSE_CLIP_FRACTION, None)
    return (depth / np.median(depth)).astype(np.float32)


def predict_batch(loaded: LoadedModel, images: np.ndarray, device: str, dtype: Any) -> np.ndarray:
    """Pseudo-labels for a batch of uint8 RGB frames [B, H, W, 3].

    Returns depth float32 [B, H, W] (relative, or metres for a metric model) or labels uint16 [B, H, W]
    (model class + 1).
    """
    import torch

    height, width = images.shape[1:3]
    inputs = loaded.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
    pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
    with torch.inference_mode():
        outputs = loaded.model(pixel_values=pixel_values)
    for key, value in list(outputs.items()):
        if torch.is_tensor(value) and value.is_floating_point():
            outputs[key] = value.float()
    sizes = [(height, width)] * len(images)
    if loaded.task == "depth":
        results = loaded.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        raw = [r["predicted_depth"].float().cpu().numpy() for r in results]
        frames = raw if loaded.metric else [inverse_to_relative_depth(r) for r in raw]
        return np.stack(frames).astype(np.float32)
    labels = loaded.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    return np.stack([label.cpu().numpy() for label in labels]).astype(np.uint16) + 1


def _model_attrs(loaded: LoadedModel, config: PseudoLabelConfig, device: str, dtype_name: str) -> dict[str, Any]:
    import transformers

    attrs: dict[str, Any] = {
        PREDICTED_ATTR: str(loaded.path.resolve()),
        "model_type": loaded.family,
        "model_class": type(loaded.model).__name__,
        "processor": loaded.processor.to_json_string(),
        "transformers_version": transformers.__version__,
        "device": device,
        "dtype": dtype_name,
        "batch_size": config.batch_size,
    }
    if loaded.task == "depth":
        attrs["units"] = "m" if loaded.metric else "relative"
        attrs["depth_kind"] = ("metric depth (model output)" if loaded.metric else
                               "relative depth: 1/max(model inverse depth, 1% of frame max), divided by frame median")
    else:
        attrs["classes"] = json.dumps(loaded.class_names)
    return attrs


# Attributes that must agree for a partial dataset to be resumed (same model, same processing).
_RESUME_KEYS = (PREDICTED_ATTR, "model_type", "processor", "units", "depth_kind", "classes")


def _prepare_dataset(group: Any, key: str, shape: tuple[int, int, int], dtype: Any, attrs: dict[str, Any],
                     overwrite: bool) -> tuple[Any, int] | None:
    """The partial dataset to fill and the first frame still to do; None when the split is already done."""
    partial_key = key + PARTIAL_SUFFIX
    if key in group:
        if not overwrite:
            return None
        del group[key]
    if partial_key in group:
        partial = group[partial_key]
        same = all(str(partial.attrs.get(k, "")) == str(attrs.get(k, "")) for k in _RESUME_KEYS)
        if same and partial.shape == shape and partial.dtype == np.dtype(dtype) and not overwrite:
            return partial, int(partial.attrs.get("frames_done", 0))
        if not overwrite:
            raise MmtkError(f"{group.name}/{partial_key} is an interrupted run with another model or settings; "
                            "rerun with the same model, or pass --overwrite to start again")
        del group[partial_key]
    dataset = group.create_dataset(partial_key, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                                   compression="gzip", compression_opts=4)
    for name, value in attrs.items():
        dataset.attrs[name] = value
    dataset.attrs["frames_done"] = 0
    return dataset, 0


def _splits(handle: Any, path: Path) -> list[str]:
    splits = [name for name, item in handle.items() if hasattr(item, "keys") and "rgb" in item]
    if not splits:
        raise MmtkError(f"{path}: no split with an 'rgb' dataset; convert your data with `mmtk convert` first")
    return splits


def pseudo_label(path: str | os.PathLike, config: PseudoLabelConfig,
                 log: Callable[[str], None] = print) -> dict[str, int]:
    """Add ``depth_pseudo`` / ``semseg_pseudo`` to every split of an mmtk HDF5 file (in place).

    Returns the number of frames computed in this run per dataset path (e.g. {"train/depth_pseudo": 12}).
    """
    import h5py
    import torch

    from mmtk.data.dataset import check_declared_sizes
    from mmtk.runtime import pick_device

    path = Path(path)
    if config.depth_model is None and config.semseg_model is None:
        raise MmtkError("nothing to do: give --depth-model, --semseg-model or both")
    if config.batch_size < 1:
        raise MmtkError(f"--batch-size {config.batch_size}: must be at least 1")
    if not path.is_file():
        raise MmtkError(f"{path}: no such HDF5 file")
    models = []
    if config.depth_model is not None:
        models.append(load_model(config.depth_model, "depth"))
    if config.semseg_model is not None:
        models.append(load_model(config.semseg_model, "semseg"))
    device = str(pick_device(config.device))
    use_bf16 = config.bf16 and device.startswith("cuda") and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    for loaded in models:
        loaded.model.to(device=device, dtype=dtype)
    try:
        handle = h5py.File(path, "r+")
    except OSError as err:
        raise MmtkError(f"{path}: cannot open as a writable HDF5 file ({err})") from err
    done: dict[str, int] = {}
    with handle:
        check_declared_sizes(handle, path)  # before any frame is read
        for split in _splits(handle, path):
            for loaded in models:
                key = DEPTH_KEY if loaded.task == "depth" else SEMSEG_KEY
                attrs = _model_attrs(loaded, config, device, "bfloat16" if use_bf16 else "float32")
                done[f"{split}/{key}"] = _label_split(handle[split], key, loaded, attrs, config, device, dtype, log)
    return done


def _label_split(group: Any, key: str, loaded: LoadedModel, attrs: dict[str, Any], config: PseudoLabelConfig,
                 device: str, dtype: Any, log: Callable[[str], None]) -> int:
    from mmtk.data.codecs import frame_dtype, frame_shape, read_frame

    rgb = group["rgb"]
    shape = (rgb.shape[0], *frame_shape(rgb))
    if len(shape) != 4 or shape[-1] != 3 or frame_dtype(rgb) != np.uint8:
        raise MmtkError(f"{rgb.name}: expected uint8 [N, H, W, 3], got {frame_dtype(rgb)} {list(shape)}")
    count = rgb.shape[0]
    if loaded.task == "depth":
        out_dtype: Any = np.float32
    else:
        out_dtype = np.uint8 if len(loaded.class_names) < 255 else np.uint16
    prepared = _prepare_dataset(group, key, shape[:3], out_dtype, attrs, config.overwrite)
    if prepared is None:
        log(f"{group.name}/{key}: already complete, skipped (use --overwrite to recompute)")
        return 0
    dataset, start = prepared
    if start:
        log(f"{group.name}/{key}: resuming at frame {start} of {count}")
    with frame_bar(f"{group.name}/{key}", count, config.progress, done=start) as advance:
        for first in range(start, count, config.batch_size):
            last = min(first + config.batch_size, count)
            frames = np.stack([read_frame(rgb, index) for index in range(first, last)])
            labels = predict_batch(loaded, frames, device, dtype)
            _write_batch(dataset, first, labels)
            advance(last - first)
    dataset.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    del dataset.attrs["frames_done"]
    group.move(key + PARTIAL_SUFFIX, key)
    group.file.flush()
    return count - start


def _write_batch(dataset: Any, first: int, values: np.ndarray) -> None:
    """Store one batch and record it as done (flushed, so an interruption keeps it)."""
    dataset[first: first + len(values)] = values.astype(dataset.dtype)
    dataset.attrs["frames_done"] = first + len(values)
    dataset.file.flush()
