"""From a recipe to a run: dataset, model and loss for pretraining and finetuning, handed to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmtk.checkpoint import find_resume_point
from mmtk.config import Recipe, dataset_parts
from mmtk.data.mixture import Mixture, present_masks
from mmtk.engine import FitResult, fit
from mmtk.errors import MmtkError
from mmtk.metrics import FAMILIES
from mmtk.modality import get_modality, list_modalities, modality_origins
from mmtk.runtime import LossFn, main_process_print, seed_everything


def data_source(name: str) -> str:
    """The prepared tensor a task reads: its own, or its mask source's (norm_rgb is computed from rgb)."""
    modality = get_modality(name)
    return name if modality.is_input else (modality.mask_source or name)


@dataclass
class DataInfo:
    """What a data file offers."""

    path: str
    modalities: tuple[str, ...]
    image_size: tuple[int, int]
    num_classes: int  # 0 when the file has no semantic labels
    frames: int
    class_names: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)  # modality -> units attr of the dataset it reads
    parts: list[DataInfo] = field(default_factory=list)  # a mixture's datasets (empty for one file)


def mixture_info(parts: list[DataInfo]) -> DataInfo:
    """What a mixture of data files offers together: every modality some file has, the first file's frame size,
    the frames of all; files labelled with classes must share them."""
    labelled = [part for part in parts if part.class_names]
    for part in labelled[1:]:
        if part.class_names != labelled[0].class_names:
            raise MmtkError(f"{part.path} is labelled with {part.num_classes} classes, {labelled[0].path} with "
                            f"{labelled[0].num_classes} (names or order differ); one model predicts one set of "
                            f"classes: mix files labelled alike (or pseudo-labelled by the same network)")
    offered = {name for part in parts for name in part.modalities}
    classes = labelled[0].class_names if labelled else []
    modalities = tuple(name for name in list_modalities() if name in offered)
    units: dict[str, str] = {}
    for part in parts:  # a relative array in any file makes the mixture's relative
        units.update({name: unit for name, unit in part.units.items() if units.get(name, "m") == "m"})
    return DataInfo("the mixture " + " + ".join(part.path for part in parts), modalities, parts[0].image_size,
                    len(classes), sum(part.frames for part in parts), list(classes), units, list(parts))


def open_dataset(path: str | Path, split: str, modalities: tuple[str, ...], image_size: tuple[int, int] | None,
                 augment: bool, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 sources: dict[str, str] | None = None, augmentation: str = "random-resized-crop"):
    """One split of an HDF5 file as prepared tensors (the data contract); only ``modalities`` are read.

    ``sources`` maps a modality to the stored dataset it reads (``{"depth": "depth_pseudo"}``).
    """
    from mmtk.data import H5Dataset

    return H5Dataset(path, split=split, modalities=modalities, image_size=image_size, augment=augment,
                     crop_scale=crop_scale, hflip=hflip, dataset_map=sources, augmentation=augmentation)


def data_info(path: str | Path, split: str = "train", sources: dict[str, str] | None = None,
              split_fix: str = "choose one with --split NAME") -> DataInfo:
    """Modalities, frame size, class count and class names of one split of a data file.

    ``split_fix`` is what the error for a missing split tells the user to do (the command's own option)."""
    from mmtk.data import read_info

    info = read_info(path)
    if split not in info["splits"]:
        raise MmtkError(f"{path} has no split '{split}'; it has {', '.join(info['splits'])}: {split_fix}")
    part = info["splits"][split]
    sources = sources or {}
    for modality, name in sources.items():
        if name not in part["datasets"]:
            raise MmtkError(f"data.sources maps {modality} to '{name}' but split '{split}' of {path} has only "
                            f"{', '.join(part['datasets'])}; fix data.sources or run `mmtk pseudo-label` first")
    modalities = tuple(name for name in list_modalities() if get_modality(name).is_input  # e.g. xyz from depth + K
                       and all(sources.get(source, source) in part["datasets"] for source in get_modality(name).reads()))
    classes = _label_classes(part, sources, f"{path}:/{split}")
    stored = {name: part["datasets"][sources.get(name, name)] for name in modalities
              if sources.get(name, name) in part["datasets"]}
    units = {name: dataset["units"] for name, dataset in stored.items() if dataset["units"]}
    return DataInfo(str(path), modalities, tuple(part["image_size"] or (0, 0)), len(classes), int(part["frames"]),
                    classes, units)


def _label_stores() -> list[str]:
    """Stored arrays that registered modalities declare class ids (e.g. semseg)."""
    return [stored.name for name in list_modalities() for stored in get_modality(name).stores
            if stored.kind == "labels"]


def _label_classes(part: dict[str, Any], sources: dict[str, str], where: str) -> list[str]:
    """The class names of the label arrays a recipe reads (through ``sources``: a pseudo-label's own classes)."""
    found = {dataset: part["datasets"][dataset]["classes"] for dataset in
             dict.fromkeys(sources.get(name, name) for name in _label_stores())
             if "classes" in part["datasets"].get(dataset, {})}
    if len({tuple(classes) for classes in found.values()}) > 1:
        counts = ", ".join(f"{name} {len(classes)}" for name, classes in found.items())
        raise MmtkError(f"{where}: label arrays have different classes ({counts}); choose one with data.sources")
    return list(next(iter(found.values()), []))


def require_modalities(wanted: tuple[str, ...], info: DataInfo, what: str,
                       fix: str = "drop it from the recipe (e.g. --set model.inputs=...) or convert a file with it"
                       ) -> None:
    """Asking for a modality the file lacks is a one-line error; ``fix`` says what this command can do."""
    for name in wanted:
        source = data_source(name)
        if source not in info.modalities:
            raise MmtkError(f"{what} needs '{name}' but {info.path} has only {', '.join(info.modalities)}; {fix}")


def model_args(recipe: Recipe, info: DataInfo) -> dict[str, Any]:
    """Keyword arguments of :func:`mmtk.create_model` for this recipe and data file (plain values)."""
    model, data = recipe.model, recipe.data
    args: dict[str, Any] = {
        "inputs": list(model.inputs),
        "image_size": list(data.image_size or info.image_size),
    }
    num_classes = data.num_classes or info.num_classes
    labelled = [name for name in needed_modalities(recipe) if set(get_modality(name).reads()) & set(_label_stores())]
    if data.num_classes and data.num_classes < info.num_classes:  # ids beyond the model's classes would fail mid-run
        raise MmtkError(f"data.num_classes is {data.num_classes} but {info.path} is labelled with "
                        f"{info.num_classes} classes; set data.num_classes={info.num_classes} (or null: the file's)")
    if num_classes:
        args["num_classes"] = num_classes
    elif labelled:
        raise MmtkError(f"the recipe reads {labelled[0]} but {info.path} names no classes for it; set "
                        "data.num_classes=N (the stored ids run 1..N)")
    if recipe.kind == "pretrain":
        args.update(outputs=list(model.outputs), num_visible=model.num_visible, alphas=model.alphas)
    else:
        args.update(outputs=[], head=model.head, task=model.task,
                    main_inputs=list(model.main_inputs or model.inputs[:1]))
        # the head predicts normalised depth (the official MultiMAE's) or the task's units; said explicitly, so an
        # --init file's own setting is not taken over unrecorded
        args["output_norm"] = list(recipe.train.target_norm) if recipe.train.target_norm is not None else None
    args.update(model.overrides)
    return args


def needed_modalities(recipe: Recipe) -> tuple[str, ...]:
    """Prepared tensors the run reads from the data file."""
    model = recipe.model
    if recipe.kind == "pretrain":
        wanted = list(model.inputs) + [data_source(m) for m in model.outputs]
    else:
        wanted = list(model.inputs) + [model.task]
    return tuple(dict.fromkeys(wanted))


# ---------------------------------------------------------------------------------------------
# Losses


def pretrain_loss_fn() -> LossFn:
    """compute_loss(model, batch) for pretraining: the MultiMAE objective (the model masks, decodes every task and
    returns its losses). The modality names are read from the registry once, here, not at every micro-step."""
    registered = frozenset(list_modalities())  # not the validity maps and full-resolution targets beside them

    def compute(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        valid = {key[: -len("_valid")]: value for key, value in batch.items() if key.endswith("_valid")}
        inputs = {key: value for key, value in batch.items() if key in registered}
        out = model(inputs, valid=valid, present=present_masks(batch, registered))
        return out.loss, dict(out.losses)

    return compute


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy at full resolution, unlabeled pixels ignored; mean per image, then over images.

    logits: [B, C, H, W]; target: [B, H, W].
    """
    pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    labelled = (target != ignore_index).flatten(1)
    return (pixel.flatten(1).sum(1) / labelled.sum(1).clamp(min=1)).mean()


def depth_loss(pred: Tensor, target: Tensor, valid: Tensor, kind: str = "berhu", reduction: str = "image",
               scale: float = 1.0) -> Tensor:
    """berHu (reverse Huber, threshold 0.2 x the largest error) or L1 on valid pixels, errors in metres / ``scale``.

    pred, target: [B, 1, H, W] metres; valid: [B, 1, H, W] bool. ``reduction`` "image": threshold and mean per
    image, then the mean over images; "batch": one threshold for the batch and the mean over all its valid pixels
    (the official MultiMAE ``masked_berhu_loss``). ``scale``: the std of ``train.target_norm`` (normalised depth
    differs from metres by it; the mean cancels in the error).
    """
    valid = valid.bool() & (target > 0)
    error = (pred.float() - target).abs() * valid / scale  # [B, 1, H, W]
    rows = 1 if reduction == "batch" else error.shape[0]
    flat, mask = error.reshape(rows, -1), valid.reshape(rows, -1)
    if kind == "berhu":
        c = (0.2 * flat.max(dim=1, keepdim=True).values).detach().clamp(min=1e-6)  # [rows, 1]
        flat = torch.where(flat <= c, flat, (flat**2 + c**2) / (2 * c)) * mask
    return (flat.sum(1) / mask.sum(1).clamp(min=1)).mean()


def finetune_loss_fn(recipe: Recipe) -> LossFn:
    """compute_loss(model, batch) for the recipe's finetuning task."""
    inputs, task = recipe.model.inputs, recipe.model.task
    assert task is not None
    adapter = get_modality(task)
    family = adapter.metric_family
    kind = recipe.train.loss or FAMILIES[family]["losses"][0]
    train = recipe.train
    scale = train.target_norm[1] if train.target_norm is not None else 1.0

    def compute(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        present = present_masks(batch, (*inputs, task))
        pred = model({name: batch[name] for name in inputs}, present=present)
        labelled = present.get(task)  # [B] in a mixture where some datasets lack the target: no loss for those
        if labelled is not None:
            if not bool(labelled.any()):
                return pred.sum() * 0.0, {task: pred.new_zeros(())}
            pred, batch = pred[labelled], {key: value[labelled] for key, value in batch.items()}
        if family == "segmentation":
            loss = segmentation_loss(pred, batch[f"{task}_full"], adapter.ignore_index)
        else:
            loss = depth_loss(pred, batch[f"{task}_m"], batch[f"{task}_valid"], kind, train.loss_reduction, scale)
        return loss, {task: loss}

    return compute


# ---------------------------------------------------------------------------------------------
# Runs


def _prepare(recipe: Recipe) -> tuple[DataInfo, Any]:
    data, datasets = recipe.data, dataset_parts(recipe.data)
    if not datasets:
        raise MmtkError("no data file: pass --data FILE.h5 (written by `mmtk convert`) or set data.path in the recipe")
    parts = [data_info(d.path, d.train_split, d.sources, split_fix="choose one with --set data.train_split=NAME "
                       "(or one per dataset: --set 'data.train_split=[all, train]')") for d in datasets]
    info = parts[0] if len(parts) == 1 else mixture_info(parts)
    needed = needed_modalities(recipe)
    require_modalities(needed, info, f"the recipe ({recipe.kind})")
    task = recipe.model.task if recipe.kind == "finetune" else None
    if task and get_modality(task).metric_family == "depth" and info.units.get(task, "m") != "m":
        raise MmtkError(f"finetuning {task} trains and scores it in metres, but {info.path} holds it in "
                        f"'{info.units[task]}' units (a relative pseudo-label); finetune on sensor depth or on "
                        "pseudo-labels of a metric network (`mmtk pseudo-label --depth-kind metric`)")
    image_size = tuple(data.image_size or info.image_size)
    opened = []
    for part, dataset in zip(parts, datasets):
        has = tuple(name for name in needed if name in part.modalities)
        if not set(has) & set(recipe.model.inputs):
            raise MmtkError(f"{part.path} has none of the model's inputs {', '.join(recipe.model.inputs)} (it has "
                            f"{', '.join(part.modalities)}); drop it from data.path or add an input it has")
        opened.append(open_dataset(part.path, dataset.train_split, has, image_size, augment=True,
                                   crop_scale=data.crop_scale, hflip=data.hflip, sources=dataset.sources,
                                   augmentation=data.augmentation))
    if len(opened) == 1:
        return info, opened[0]
    return info, Mixture(opened, [dataset.modalities for dataset in opened])


def _shown(names: list[str], count: int = 4) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def init_summary(model: nn.Module) -> str:
    """The load report of ``--init`` grouped by part: encoder loaded, pretraining decoders unused, head new.

    Finetuning a pretrained MultiMAE always leaves its decoders unused and its head new; only what differs
    from that (encoder keys missing, other keys unused) is named.
    """
    report = model.load_report
    encoder = [name for name in model.state_dict() if name.startswith("encoder.")]
    missing_encoder = [name for name in report.missing if name.startswith("encoder.")]
    new_other = [name for name in report.missing if not name.startswith("encoder.")]
    decoders = [name for name in report.unused if name.startswith("decoders.")]
    inputs = model.config.inputs
    tokenizers = [name for name in report.unused
                  if name.startswith("encoder.tokenizers.") and name.split(".")[2] not in inputs]
    other = [name for name in report.unused if name not in decoders and name not in tokenizers]
    loaded = len(encoder) - len(missing_encoder)
    parts = [f"format {report.format}",
             f"encoder: all {loaded} loaded" if not missing_encoder else
             f"encoder: {loaded} of {len(encoder)} loaded, {len(missing_encoder)} left as initialised "
             f"({_shown(missing_encoder)})"]
    if decoders:
        parts.append(f"pretraining decoders: {len(decoders)} not used (expected when finetuning)")
    if tokenizers:
        unused_inputs = ", ".join(dict.fromkeys(name.split(".")[2] for name in tokenizers))
        parts.append(f"tokenizers of {unused_inputs}: {len(tokenizers)} not used (this model's inputs are "
                     f"{', '.join(inputs)})")
    if new_other:
        heads = [name for name in new_other if name.startswith("head.")]
        parts.append(f"head: {len(heads)} new" if len(heads) == len(new_other) else
                     f"{len(new_other)} new: {_shown(new_other)}")
    if other:
        parts.append(f"{len(other)} other keys not used: {_shown(other)}")
    if report.resized:
        parts.append(f"resized {', '.join(report.resized)}")
    return "; ".join(parts + list(report.notes))  # what the file made mmtk decide (e.g. no class token)


def run_training(recipe: Recipe, run_dir: str | Path, init: str | Path | None = None,
                 resume: bool = False) -> FitResult:
    """Pretrain or finetune (``recipe.kind``) into ``run_dir``; ``init`` seeds a finetuning encoder."""
    import mmtk

    info, train_set = _prepare(recipe)
    args = model_args(recipe, info)
    seed_everything(recipe.train.seed)  # identical initial weights on every process
    if recipe.kind == "finetune" and init is None and not resume:
        main_process_print("warning: finetuning without --init starts from random weights")
    # A resumed run rebuilds the model its checkpoint describes: an --init file may have fixed more than the
    # recipe says (e.g. a ViT without class token); fit then restores the optimizer and the rest from the same
    # state, read once.
    point = find_resume_point(run_dir, recipe) if resume else None
    model = mmtk.create_model(recipe.model.name, pretrained=point.state if point else init, verbose=False, **args)
    if init is not None and not resume:
        main_process_print(f"init from {init}: {init_summary(model)}")
    compute_loss = pretrain_loss_fn() if recipe.kind == "pretrain" else finetune_loss_fn(recipe)
    used = [*args["inputs"], *args.get("outputs", []), *([args["task"]] if args.get("task") else [])]
    paths = [str(Path(part.path).resolve()) for part in info.parts or [info]]
    extra = {"model_name": recipe.model.name, "model_args": args, "modalities": modality_origins(dict.fromkeys(used)),
             "data": {"path": paths[0], **({"paths": paths} if info.parts else {}), "modalities": list(info.modalities),
                      "image_size": list(info.image_size), "num_classes": info.num_classes,
                      "class_names": list(info.class_names)}}
    return fit(recipe, run_dir, model, train_set, compute_loss, resume=resume, extra_state=extra, resume_from=point)
