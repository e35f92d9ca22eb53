"""Pseudo-labels from off-the-shelf networks: depth and semantic segmentation from RGB alone.

`pseudo_label` adds ``depth_pseudo`` and/or ``semseg_pseudo`` to every split of mmtk HDF5 files, using
Hugging Face transformers models loaded from local folders only (no network access is ever attempted):

- depth: DPT (``dpt``), Depth Anything (``depth_anything``), ZoeDepth (``zoedepth``);
- segmentation: Mask2Former (``mask2former``), SegFormer (``segformer``), UperNet (``upernet``).

A folder is what ``save_pretrained`` writes for the model *and* its image processor
(``config.json``, weights, ``preprocessor_config.json``).

Depth, by what the network outputs (:data:`DEPTH_KINDS`; the model's config says it where it can: Depth
Anything's ``depth_estimation_type``, ZoeDepth is metric; else ``depth_kind`` must be given):

- ``depth`` (Omnidata-style DPT, the paper's): depth up to scale and shift. Stored as the output divided by
  its frame median (units attr ``relative``).
- ``relative-inverse`` (MiDaS, DPT-Large, Depth Anything relative): inverse depth up to scale and shift. With
  an unknown shift, ``1 / output`` is not depth (not even up to an affine map), so the inverse depth itself is
  stored, divided by its frame median (units attr ``relative-inverse``; larger = nearer). The depth adapter
  prepares it as standardised *negative* inverse depth, which is exact up to the unknown scale and shift.
- ``metric`` (Depth Anything metric, ZoeDepth): metres, stored as predicted (units attr ``m``).

Outputs <= 0 (and non-finite ones) are stored as 0 = invalid. The ``depth_kind`` and ``normalisation`` attrs
say what was stored.

Segmentation. Model class ``c`` (0-based ``id2label`` order) is stored as label ``c + 1``; 0 stays "unlabeled";
the ``classes`` attr lists the model's class names (class k is classes[k-1]), as for ``semseg``, so a recipe
reading it builds the model with the model's class count (COCO panoptic: 133).

Scale-out. A dataset of several files is labelled file by file: ``--shard-index I --num-shards N`` keeps every
N-th file (from the I-th), and under ``torchrun`` each rank takes every WORLD_SIZE-th of those, on its own GPU.

Resuming. Work goes into ``<name>.partial`` with a ``frames_done`` attr updated after every batch; the
dataset gets its final name only when the split is complete. Running the same command again continues where
an interrupted run stopped. A finished dataset is skipped unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmtk.data.format import PARTIAL_SUFFIX, PREDICTED_ATTR
from mmtk.errors import MmtkError
from mmtk.modality import RELATIVE_INVERSE_UNITS, RELATIVE_UNITS
from mmtk.progress import frame_bar

DEPTH_KEY = "depth_pseudo"
SEMSEG_KEY = "semseg_pseudo"


@dataclass(frozen=True)
class DepthKind:
    """What a depth network outputs, and how mmtk stores it."""

    name: str
    units: str  # the stored array's units attr
    normalisation: str  # what the stored values are, in the array's ``normalisation`` attr
    median_normalised: bool  # stored = output / frame median of the positive outputs (else: output as is)


DEPTH_KINDS = {kind.name: kind for kind in (
    DepthKind("depth", RELATIVE_UNITS, "network depth (unknown scale and shift) divided by the frame median of "
              "its positive values; 0 = invalid (output <= 0)", True),
    DepthKind("relative-inverse", RELATIVE_INVERSE_UNITS, "network inverse depth (unknown scale and shift; larger "
              "= nearer) divided by the frame median of its positive values; 0 = invalid (output <= 0, e.g. sky)",
              True),
    DepthKind("metric", "m", "network depth in metres as predicted; 0 = invalid (output <= 0)", False),
)}


def _depth_anything_kind(config: Any) -> str:
    return "metric" if getattr(config, "depth_estimation_type", "relative") == "metric" else "relative-inverse"


@dataclass(frozen=True)
class Family:
    """A transformers model family mmtk can pseudo-label with."""

    task: str  # "depth" or "semseg"
    model_class: str  # the transformers class that loads it
    declared_kind: Callable[[Any], str] | None = None  # depth kind read from the model's config; None: not said
    source_sizes: bool = False  # post-processing needs the input sizes (to remove the processor's padding)


FAMILIES = {
    "dpt": Family("depth", "DPTForDepthEstimation"),  # MiDaS / DPT-Large (inverse) or Omnidata (depth): not said
    "depth_anything": Family("depth", "DepthAnythingForDepthEstimation", _depth_anything_kind),
    "zoedepth": Family("depth", "ZoeDepthForDepthEstimation", lambda config: "metric", source_sizes=True),
    "mask2former": Family("semseg", "Mask2FormerForUniversalSegmentation"),
    "segformer": Family("semseg", "SegformerForSemanticSegmentation"),
    "upernet": Family("semseg", "UperNetForSemanticSegmentation"),
}


def families(task: str) -> tuple[str, ...]:
    """The model families that label ``task`` ("depth" or "semseg")."""
    return tuple(name for name, family in FAMILIES.items() if family.task == task)


@dataclass
class PseudoLabelConfig:
    """Settings of one pseudo-labelling run.

    Attributes:
        depth_model: folder of a DPT / Depth Anything / ZoeDepth model, or None.
        semseg_model: folder of a Mask2Former / SegFormer / UperNet model, or None.
        depth_kind: what the depth model outputs (a :data:`DEPTH_KINDS` name); None: the model's config says.
        batch_size: frames per forward pass.
        device: "auto" (cuda, the local rank's GPU under torchrun, when available), "cpu" or "cuda[:i]".
        bf16: run in bfloat16 on GPU (ignored on CPU, which runs float32).
        overwrite: recompute datasets that are already complete (or partial from another model).
        progress: show a progress bar.
        shard_index, num_shards: label only every ``num_shards``-th file, from the ``shard_index``-th.
    """

    depth_model: str | os.PathLike | None = None
    semseg_model: str | os.PathLike | None = None
    depth_kind: str | None = None
    batch_size: int = 8
    device: str = "auto"
    bf16: bool = True
    overwrite: bool = False
    progress: bool = True
    shard_index: int = 0
    num_shards: int = 1


@dataclass
class LoadedModel:
    """A model, its image processor and what we record about it."""

    task: str  # "depth" or "semseg"
    family: str  # config.model_type
    path: Path
    model: Any
    processor: Any
    depth_kind: DepthKind | None = None  # depth models: what the output is

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


def resolve_depth_kind(family: str, config: Any, given: str | None, path: Path) -> DepthKind:
    """What a depth model outputs: its config's word where it says, else ``given`` (``--depth-kind``).

    A ``given`` kind that contradicts the config, or none where the config is silent, is a one-line error."""
    choices = ", ".join(DEPTH_KINDS)
    if given is not None and given not in DEPTH_KINDS:
        raise MmtkError(f"--depth-kind {given}: unknown; choose one of {choices}")
    declared = FAMILIES[family].declared_kind
    if declared is not None:
        kind = declared(config)
        if given is not None and given != kind:
            raise MmtkError(f"--depth-model {path}: its config says the {family} model outputs {kind}, not {given}; "
                            "drop --depth-kind")
        return DEPTH_KINDS[kind]
    if given is None:
        raise MmtkError(f"--depth-model {path}: a {family} config does not say what the model outputs; pass "
                        f"--depth-kind ({choices}): depth for Omnidata DPT, relative-inverse for MiDaS / DPT-Large")
    return DEPTH_KINDS[given]


def load_model(path: str | os.PathLike, task: str, depth_kind: str | None = None) -> LoadedModel:
    """Load a depth ("depth") or segmentation ("semseg") model and its image processor from a local folder.

    ``depth_kind``: what a depth model outputs, where its config does not say (:func:`resolve_depth_kind`).
    Raises MmtkError for a missing folder, a folder that is not a model, or a model of the wrong family.
    """
    option = "--depth-model" if task == "depth" else "--semseg-model"
    path = Path(path)
    family = _read_model_type(path, option)
    if family not in families(task):
        raise MmtkError(f"{option} {path}: a {family!r} model cannot be used for {task}; "
                        f"supported families: {', '.join(families(task))}")
    transformers = _import_transformers()
    if task == "depth":  # before the weights: a missing --depth-kind is known from config.json alone
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        kind: DepthKind | None = resolve_depth_kind(family, config, depth_kind, path)
    else:
        kind = None
    try:
        model = getattr(transformers, FAMILIES[family].model_class).from_pretrained(path, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:  # corrupt weights raise library-specific types (e.g. SafetensorError)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MmtkError(f"{option} {path}: cannot load the {family} model ({first_line})") from err
    model.eval()
    return LoadedModel(task, family, path, model, processor, kind)


def store_depth(output: np.ndarray, kind: DepthKind) -> np.ndarray:
    """The stored depth_pseudo frame (float32 [H, W], 0 = invalid) for a network's output [H, W] of ``kind``.

    Outputs that are not finite or not positive are invalid (0). ``kind.median_normalised``: the valid values
    are divided by their median (so 1 = the frame's median); otherwise they are kept as predicted.
    """
    values = np.asarray(output, dtype=np.float64)
    valid = np.isfinite(values) & (values > 0)
    if not valid.any():
        return np.zeros(values.shape, dtype=np.float32)
    scale = float(np.median(values[valid])) if kind.median_normalised else 1.0
    return np.where(valid, values / scale, 0.0).astype(np.float32)


def predict_batch(loaded: LoadedModel, images: np.ndarray, device: str, dtype: Any) -> np.ndarray:
    """Pseudo-labels for a batch of uint8 RGB frames [B, H, W, 3].

    Returns depth float32 [B, H, W] as :func:`store_depth` stores it, or labels uint16 [B, H, W] (model class + 1).
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
    if loaded.depth_kind is not None:
        extra = {"source_sizes": sizes} if FAMILIES[loaded.family].source_sizes else {}
        results = loaded.processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)
        raw = [r["predicted_depth"].float().cpu().numpy() for r in results]
        return np.stack([store_depth(r, loaded.depth_kind) for r in raw])
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
    if loaded.depth_kind is not None:
        attrs.update(units=loaded.depth_kind.units, depth_kind=loaded.depth_kind.name,
                     normalisation=loaded.depth_kind.normalisation)
    else:
        attrs["classes"] = json.dumps(loaded.class_names)
    return attrs


# Attributes that must agree for a partial dataset to be resumed (same model, same processing).
_RESUME_KEYS = (PREDICTED_ATTR, "model_type", "processor", "units", "depth_kind", "normalisation", "classes")


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
            raise MmtkError(f"{group.file.filename}:{partial.name} is an interrupted run with another model or "
                            "settings; rerun with the same model, or pass --overwrite to start again")
        del group[partial_key]
    dataset = group.create_dataset(partial_key, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                                   compression="gzip", compression_opts=4, fletcher32=True)
    for name, value in attrs.items():
        dataset.attrs[name] = value
    dataset.attrs["frames_done"] = 0
    return dataset, 0


def _splits(handle: Any, path: Path) -> list[str]:
    splits = [name for name, item in handle.items() if hasattr(item, "keys") and "rgb" in item]
    if not splits:
        raise MmtkError(f"{path}: no split with an 'rgb' dataset; convert your data with `mmtk convert` first")
    return splits


def files_to_label(path: str | os.PathLike) -> list[Path]:
    """The files of the dataset at ``path``, each labelled on its own: a file is itself, a shard folder its shards.

    A folder's index goes stale as its shards gain labels, so a resumed run lists them from the index unchecked;
    :func:`pseudo_label` rewrites the index when every shard is done."""
    from mmtk.data.shard_index import dataset_files

    path = Path(path)
    if not path.exists():
        raise MmtkError(f"{path}: no such HDF5 file or shard folder")
    return dataset_files(path, check_fresh=False)


def _reindex(folders: list[Path], config: PseudoLabelConfig, log: Callable[[str], None]) -> None:
    """Rewrite the index of each shard folder labelled here (it lists each shard's arrays), or say who must."""
    from mmtk.data.shard_index import read_index
    from mmtk.data.shards import write_index

    for folder in folders:
        if config.num_shards > 1:
            log(f"{folder}: once every --shard-index has finished, run `mmtk index {folder}` (the shards gained "
                f"arrays, so its index is stale until then)")
        else:  # a folder indexed with --partial stays partial
            write_index(folder, partial=bool(read_index(folder, check_fresh=False).get("ignored")))
            log(f"{folder}: index rewritten")


def assigned_files(files: Sequence[Path], shard_index: int, num_shards: int, rank: int,
                   world_size: int) -> list[Path]:
    """This process's files: every ``num_shards``-th from the ``shard_index``-th, then every ``world_size``-th
    of those from the ``rank``-th (torchrun), so that shards x ranks cover every file exactly once."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise MmtkError(f"--shard-index {shard_index} --num-shards {num_shards}: need num-shards >= 1 and "
                        "0 <= shard-index < num-shards")
    return list(files[shard_index::num_shards][rank::world_size])


def pseudo_label(paths: str | os.PathLike | Sequence[str | os.PathLike], config: PseudoLabelConfig,
                 log: Callable[[str], None] = print) -> dict[str, int]:
    """Add ``depth_pseudo`` / ``semseg_pseudo`` to every split of mmtk HDF5 files (in place), file by file.

    ``paths``: one dataset or several; each becomes its files (:func:`files_to_label`). This process labels
    its share of them (:func:`assigned_files`: ``config.shard_index``/``num_shards`` and, under torchrun,
    its rank). Returns the number of frames computed in this run per dataset, keyed ``FILE:/split/name``.
    """
    import torch

    from mmtk.runtime import cleanup_distributed, setup_distributed

    if config.depth_model is None and config.semseg_model is None:
        raise MmtkError("nothing to do: give --depth-model, --semseg-model or both")
    if config.batch_size < 1:
        raise MmtkError(f"--batch-size {config.batch_size}: must be at least 1")
    if config.depth_kind is not None and config.depth_model is None:
        raise MmtkError(f"--depth-kind {config.depth_kind} says what a depth model outputs: give --depth-model too")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    # once each (a file named twice would be written by two processes), in the order given
    files = list({file.resolve(): file for path in paths for file in files_to_label(path)}.values())
    assigned_files(files, config.shard_index, config.num_shards, 0, 1)  # the shard options' error, before any work
    models = []
    if config.depth_model is not None:
        models.append(load_model(config.depth_model, "depth", config.depth_kind))
    if config.semseg_model is not None:
        models.append(load_model(config.semseg_model, "semseg"))
    joined = not torch.distributed.is_initialized()  # a caller's own process group is left to the caller
    dist = setup_distributed(config.device)
    try:
        mine = assigned_files(files, config.shard_index, config.num_shards, dist.rank, dist.world_size)
        device = str(dist.device)
        use_bf16 = config.bf16 and device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        for loaded in models:
            loaded.model.to(device=device, dtype=dtype)
        labellers = [(loaded, _model_attrs(loaded, config, device, "bfloat16" if use_bf16 else "float32"))
                     for loaded in models]
        if not mine:
            log(f"rank {dist.rank}: no file to label ({len(files)} files for {config.num_shards} shard(s) x "
                f"{dist.world_size} process(es))")
        done: dict[str, int] = {}
        for file in mine:
            done.update(_label_file(file, labellers, config, device, dtype, log))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are complete when any rank reports success
        if dist.rank == 0:
            _reindex([Path(path) for path in paths if Path(path).is_dir()], config, log)
    finally:
        if joined:
            cleanup_distributed()
    return done


def _label_file(path: Path, labellers: list[tuple[LoadedModel, dict[str, Any]]], config: PseudoLabelConfig,
                device: str, dtype: Any, log: Callable[[str], None]) -> dict[str, int]:
    """Label every split of one file with every (model, its attrs); frames computed per ``FILE:/split/name``."""
    import h5py

    from mmtk.data.format import check_declared_sizes

    try:
        handle = h5py.File(path, "r+")
    except OSError as err:
        raise MmtkError(f"{path}: cannot open as a writable HDF5 file ({err})") from err
    done: dict[str, int] = {}
    with handle:
        check_declared_sizes(handle, path)  # before any frame is read
        for split in _splits(handle, path):
            for loaded, attrs in labellers:
                key = DEPTH_KEY if loaded.task == "depth" else SEMSEG_KEY
                frames = _label_split(handle[split], key, loaded, attrs, config, device, dtype, log)
                done[f"{path}:/{split}/{key}"] = frames
    return done


def _label_split(group: Any, key: str, loaded: LoadedModel, attrs: dict[str, Any], config: PseudoLabelConfig,
                 device: str, dtype: Any, log: Callable[[str], None]) -> int:
    from mmtk.data.codecs import frame_dtype, frame_reader, frame_shape

    rgb = group["rgb"]
    shape = (rgb.shape[0], *frame_shape(rgb))
    if len(shape) != 4 or shape[-1] != 3 or frame_dtype(rgb) != np.uint8:
        raise MmtkError(f"{rgb.name}: expected uint8 [N, H, W, 3], got {frame_dtype(rgb)} {list(shape)}")
    count = rgb.shape[0]
    read = frame_reader(rgb)  # the layout looked up once for the split
    if loaded.task == "depth":
        out_dtype: Any = np.float32
    else:
        out_dtype = np.uint8 if len(loaded.class_names) < 255 else np.uint16
    where = f"{group.file.filename}:{group.name}/{key}"
    prepared = _prepare_dataset(group, key, shape[:3], out_dtype, attrs, config.overwrite)
    if prepared is None:
        log(f"{where}: already complete, skipped (use --overwrite to recompute)")
        return 0
    dataset, start = prepared
    if start:
        log(f"{where}: resuming at frame {start} of {count}")
    with frame_bar(f"{Path(group.file.filename).name}:{group.name}/{key}", count, config.progress,
                   done=start) as advance:
        for first in range(start, count, config.batch_size):
            last = min(first + config.batch_size, count)
            frames = np.stack([read(index) for index in range(first, last)])
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
