"""From a recipe to a run: dataset, model and loss for pretraining and finetuning, handed to the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mmtk.config import Recipe, dataset_parts, recipe_to_dict
from mmtk.data.contents import (DataInfo, data_info, data_source, label_stores, mixture_info, open_dataset,
                                 require_modalities)
from mmtk.data.mixture import Mixture, present_masks
from mmtk.errors import MmtkError
from mmtk.modality import get_modality, list_modalities, modality_origins
from mmtk.runtime import LossFn, main_process_print, seed_run
from mmtk.task import LossSettings
from mmtk.train.checkpoint import find_resume_point
from mmtk.train.engine import FitResult, train
from mmtk.train.settings import train_settings


def model_args(recipe: Recipe, info: DataInfo) -> dict[str, Any]:
    """Keyword arguments of :func:`mmtk.create_model` for this recipe and data file (plain values)."""
    model, data = recipe.model, recipe.data
    args: dict[str, Any] = {
        "inputs": list(model.inputs),
        "image_size": list(data.image_size or info.image_size),
    }
    num_classes = data.num_classes or info.num_classes
    labelled = [name for name in needed_modalities(recipe) if set(get_modality(name).reads()) & set(label_stores())]
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


def finetune_loss_fn(recipe: Recipe) -> LossFn:
    """compute_loss(model, batch) for the recipe's finetuning task."""
    inputs, task, train = recipe.model.inputs, recipe.model.task, recipe.train
    assert task is not None
    family = get_modality(task).family()
    settings = LossSettings(train.loss or family.default_loss, train.loss_reduction,
                            train.target_norm[1] if train.target_norm is not None else 1.0)

    def compute(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        present = present_masks(batch, (*inputs, task))
        pred = model({name: batch[name] for name in inputs}, present=present)
        labelled = present.get(task)  # [B] in a mixture where some datasets lack the target: no loss for those
        if labelled is not None:
            if not bool(labelled.any()):
                return pred.sum() * 0.0, {task: pred.new_zeros(())}
            pred, batch = pred[labelled], {key: value[labelled] for key, value in batch.items()}
        loss = family.loss(pred, batch, task, settings)
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
    if task:
        get_modality(task).family().check_units(task, info.units.get(task), info.path)
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
    """Pretrain or finetune (``recipe.kind``) into ``run_dir``; ``init`` seeds a finetuning encoder.

    The path from a recipe to the loop, in order: the checkpoint a ``resume`` continues from (found, checked
    against the recipe and read once), the engine's settings, the data, the model (a resumed run rebuilds the
    model its checkpoint describes: an --init file may have fixed more than the recipe says, e.g. a ViT without
    class token), the loss; then :func:`mmtk.train.engine.train` loads the checkpoint into them and trains.
    """
    import mmtk

    point = find_resume_point(run_dir, recipe) if resume else None  # before anything is built or written
    settings = train_settings(recipe)  # after the resume check, which may keep a legacy weight-decay rule
    info, train_set = _prepare(recipe)
    args = model_args(recipe, info)
    seed_run(settings.seed)  # identical initial weights on every process
    if recipe.kind == "finetune" and init is None and not resume:
        main_process_print("warning: finetuning without --init starts from random weights")
    model = mmtk.create_model(recipe.model.name, pretrained=point.state if point else init, verbose=False, **args)
    if init is not None and not resume:
        main_process_print(f"init from {init}: {init_summary(model)}")
    compute_loss = pretrain_loss_fn() if recipe.kind == "pretrain" else finetune_loss_fn(recipe)
    return train(settings, run_dir, model, train_set, compute_loss, _record(recipe, args, info), point)


def _record(recipe: Recipe, args: dict[str, Any], info: DataInfo) -> dict[str, Any]:
    """What every checkpoint of the run records besides its training state (plain values): the kind and recipe,
    how to rebuild the model, the modalities' origins and the data it trained on."""
    used = [*args["inputs"], *args.get("outputs", []), *([args["task"]] if args.get("task") else [])]
    paths = [str(Path(part.path).resolve()) for part in info.parts or [info]]
    return {"kind": recipe.kind, "recipe": recipe_to_dict(recipe), "model_name": recipe.model.name, "model_args": args,
            "modalities": modality_origins(dict.fromkeys(used)),
            "data": {"path": paths[0], **({"paths": paths} if info.parts else {}), "modalities": list(info.modalities),
                     "image_size": list(info.image_size), "num_classes": info.num_classes,
                     "class_names": list(info.class_names)}}
