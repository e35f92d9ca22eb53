"""Typed training recipes: YAML files loaded into dataclasses, validated, with ``--set`` overrides.

A recipe has four sections (``data``, ``model``, ``optim``, ``train``) plus ``kind`` (pretrain or
finetune). Every field has a default, so a recipe only states what differs. Mistakes the user can
make (an unknown key, a wrong type, a missing data file) raise :class:`~mmtk.errors.MmtkError` with
one line naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mmtk.errors import MmtkError
from mmtk.io import atomic_write_text

Kind = Literal["pretrain", "finetune"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class DataConfig:
    """Where the frames come from and how they are augmented."""

    # HDF5 file written by `mmtk convert`, or a list of them (a mixture, modalities may differ); relative to the
    # working directory (stored absolute)
    path: str | tuple[str, ...] | None = None
    weights: tuple[float, ...] | None = None  # per data.path entry, share of each epoch's draws; None: by size
    train_split: str | tuple[str, ...] = "train"  # one split for every dataset, or one per data.path entry
    eval_split: str = "test"
    image_size: tuple[int, int] | None = None  # (H, W); None = the file's frame size
    num_classes: int | None = None  # None = the file's class count
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop area range, shared by all modalities
    hflip: bool = True
    # training augmentation: random-resized-crop (crop_scale, hflip; reads only the crop) or a whole-frame one of
    # mmtk.data.augment (multimae-semseg, multimae-depth: the official MultiMAE finetuning's), output image_size
    augmentation: str = "random-resized-crop"
    repeat: int = 1  # an epoch visits every frame this many times (differently augmented); for tiny files
    # modality -> stored dataset it reads, e.g. {depth: depth_pseudo}; or one such mapping per data.path entry
    sources: dict[str, str] | tuple[dict[str, str], ...] = field(default_factory=dict)
    num_workers: int | Literal["auto"] = "auto"  # loader worker processes; auto: from the machine (loader_workers)
    pin_memory: bool = True  # only has an effect on CUDA


@dataclass
class ModelConfig:
    """Which model to build (arguments of :func:`mmtk.create_model`)."""

    name: str = "multimae-base"  # a named model of mmtk.registry: its size and, unless given here, its modalities
    inputs: tuple[str, ...] | None = None  # None: the named model's
    outputs: tuple[str, ...] | None = None  # pretraining targets; None: the named model's
    num_visible: int = 98
    alphas: float = 1.0
    head: Literal["convnext", "dpt"] | None = None  # finetuning head
    task: str | None = None  # finetuning task: a modality with a metric family (semseg, depth, ...)
    main_inputs: tuple[str, ...] | None = None  # modalities whose tokens feed the convnext head
    overrides: dict[str, Any] = field(default_factory=dict)  # any other create_model argument


@dataclass
class OptimConfig:
    """AdamW, lr schedule, batch size and gradient handling."""

    batch_size: int = 256  # global batch per optimizer step, over all processes and accumulation steps
    lr: float = 1e-4
    scale_lr: bool = True  # effective lr = lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    # which parameters decay (mmtk.train.optim.decays): weights (the official finetuning's rule: not biases, norms,
    # global tokens, position embeddings) | all (the official pretraining) | weights-except-tokens (mmtk's rule
    # before; kept for resuming runs that started with it)
    weight_decay_on: Literal["weights", "all", "weights-except-tokens"] = "weights"
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float = 1.0  # lr of encoder block i is lr * layer_decay ** (num_blocks + 1 - (i + 1))
    epochs: float = 1600
    warmup_epochs: float = 40
    # lr schedule per optimizer step, a name registered in mmtk.train.schedules (plugins may add some): cosine =
    # linear warm-up over warmup_epochs, then cosine down to min_lr
    schedule: str = "cosine"
    accum_steps: int = 1  # micro-batches per optimizer step (at least)
    # most samples per process per micro-step (more accumulation steps if needed); auto: the largest that fits
    micro_batch: int | Literal["auto"] | None = None
    clip_grad: float | None = None  # max global gradient norm; None = no clipping


@dataclass
class TrainConfig:
    """Everything about running the loop that is not the optimisation itself."""

    seed: int = 0
    precision: Precision = "bf16"  # autocast dtype; fp16 adds a gradient scaler (CUDA only)
    # torch.compile: none | blocks (each transformer block, mmtk.compile_blocks) | step (the whole forward of the
    # step, masking and losses included, and its backward as one graph: mmtk.compile_step); true/false of older
    # recipes mean blocks/none
    compile: Literal["none", "blocks", "step", True, False] = "none"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms; needed for bit-exact resume on GPU
    loss: str | None = None  # finetuning loss, a name of the task family's losses; None = its first (semseg: ce, depth: berhu)
    # depth finetuning: image = berHu threshold and mean per image, then the mean over images; batch = one threshold
    # (0.2 x the batch's largest error) and the mean over all valid pixels of the batch (the official MultiMAE's)
    loss_reduction: Literal["image", "batch"] = "image"
    # depth finetuning: [mean, std] in metres; the head predicts (depth - mean) / std (the model still returns
    # metres) and the loss compares normalised values (the official: NYU_MEAN / NYU_STD); None = metres
    target_norm: tuple[float, float] | None = None
    log_every: int = 10  # steps between progress lines and JSONL records
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest step checkpoints kept on disk
    max_steps: int | None = None  # stop after this many steps; the lr schedule still spans all epochs

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # recipes written when the switch was a bool
            self.compile = "blocks" if self.compile else "none"


FINETUNE_LOSS_KEYS = ("loss", "loss_reduction", "target_norm")  # train.* keys that shape only a finetuning loss


@dataclass
class Recipe:
    """A full training recipe."""

    kind: Kind = "pretrain"
    plugins: tuple[str, ...] = ()  # adapter files registering modalities (paths relative to the recipe file)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Building typed objects from plain YAML values


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples; raise MmtkError."""

    def fail(expected: str) -> MmtkError:
        return MmtkError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except MmtkError:
                continue
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # 1 is not True
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, source)
    if origin is tuple:
        if isinstance(value, str) and args and args[-1] is Ellipsis:
            value = [v.strip() for v in value.split(",") if v.strip()]  # "rgb,depth" on the command line
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programming error, not the user's


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise MmtkError(f"{source}: unknown key '{full}'; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def recipe_from_dict(values: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Build and validate a :class:`Recipe` from nested plain values (as read from YAML)."""
    if not isinstance(values, dict):
        raise MmtkError(f"{source}: a recipe must be a YAML mapping, got {type(values).__name__}")
    recipe = _build(Recipe, values, "", source)
    _resolve_model(recipe.model, source)
    if recipe.plugins:
        from mmtk.plugins import load_plugin

        for plugin in recipe.plugins:
            load_plugin(plugin)
    validate(recipe, source)
    return recipe


def _resolve_model(model: ModelConfig, source: str) -> None:
    """Fill the modalities a recipe leaves out with those its named model declares (in place)."""
    from mmtk.registry import named_model

    try:
        declared = named_model(model.name)
    except MmtkError as err:
        raise MmtkError(f"{source}: model.name: {err}") from None
    if model.inputs is None:
        model.inputs = declared["inputs"]
    if model.outputs is None:
        model.outputs = declared["outputs"]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of a recipe, ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(recipe))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"optim.lr=2e-4"`` into (["optim", "lr"], 2e-4); the value is read as YAML."""
    if "=" not in text:
        raise MmtkError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=2e-4")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise MmtkError(f"--set {text!r}: empty key; expected e.g. --set optim.lr=2e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``KEY=VALUE`` of ``overrides`` into the nested dict ``values`` (in place, returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MmtkError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return values


def shipped_recipes() -> dict[str, str]:
    """Name -> one-line description (the file's first comment line) of every recipe shipped in recipes/."""
    folder = importlib.resources.files("mmtk.recipes")
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = (entry.read_text().splitlines() or [""])[0]
            found[entry.name[: -len(".yaml")]] = first.lstrip("#").strip()
    return found


def shipped_recipe_text(name: str) -> str:
    """The YAML text of the shipped recipe ``name`` (e.g. "tiny"); an unknown name lists the shipped ones."""
    names = shipped_recipes()
    if name not in names:
        raise MmtkError(f"no shipped recipe named '{name}'; shipped: {', '.join(names)} (`mmtk recipes` lists them)")
    return (importlib.resources.files("mmtk.recipes") / f"{name}.yaml").read_text()


def read_recipe_source(recipe: str | Path) -> tuple[str, str]:
    """(label for messages, YAML text) of a recipe given as a file path or as a shipped recipe's name."""
    path = Path(recipe)
    if path.is_file():
        return str(path), path.read_text()
    names = shipped_recipes()
    if str(recipe) in names:
        return f"recipe {recipe}", shipped_recipe_text(str(recipe))
    if path.stem in names:  # e.g. recipes/tiny.yaml of an older checkout: say what to type, do not guess
        raise MmtkError(f"recipe file {path} not found; shipped recipes are given by name: {path.stem} "
                        f"(`mmtk recipes` lists them)")
    raise MmtkError(f"recipe {recipe} is neither a file nor a shipped recipe; shipped: {', '.join(names)} "
                    f"(`mmtk recipes`; `mmtk recipes show tiny > my.yaml` starts your own)")


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                data_path: str | os.PathLike | list[str] | None = None) -> Recipe:
    """Read a recipe (a YAML file, or a shipped recipe's name such as ``"tiny"``), apply ``--set`` overrides
    and ``--data`` (one file, or a list: a mixture), validate and return it. ``data.path`` comes back absolute,
    so a run finds its data from any folder."""
    source, text = read_recipe_source(path)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise MmtkError(f"{source}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise MmtkError(f"{source}: a recipe must be a YAML mapping, got {type(values).__name__}")
    apply_overrides(values, overrides or [])
    if isinstance(values.get("plugins"), list):  # relative to the recipe file (a shipped one's: to this folder)
        base = Path(path).parent if Path(path).is_file() else Path.cwd()
        values["plugins"] = [str((base / str(p)).resolve()) for p in values["plugins"]]
    if data_path is not None:
        values.setdefault("data", {})
        if not isinstance(values["data"], dict):
            raise MmtkError(f"{source}: 'data' must be a mapping")
        values["data"]["path"] = str(data_path) if isinstance(data_path, (str, os.PathLike)) else \
            [str(path) for path in data_path]
    recipe = recipe_from_dict(values, source)
    paths = [str(Path(path).resolve()) for path in data_paths(recipe.data)]
    if paths:
        recipe.data.path = paths[0] if isinstance(recipe.data.path, str) else tuple(paths)
    return recipe


def loader_workers(setting: int | str, device_type: str, processes: int = 1) -> int:
    """Loader worker processes per training process: the recipe's number, or for ``auto`` what the machine has.

    On a GPU the cores are free to load: one core per process stays with the training loop, the others load
    (at most 8). On a CPU the training threads need the cores; workers only pay off beyond 4 cores per process.
    """
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, processes))
    if device_type == "cuda":
        return min(8, per_process - 1)
    return min(4, per_process // 4) if per_process > 4 else 0


def save_recipe(recipe: Recipe | dict[str, Any], path: str | Path) -> None:
    """Write the fully resolved recipe (or its :func:`recipe_to_dict` values) as YAML (atomically,
    :func:`mmtk.io.atomic_write_text`)."""
    values = recipe if isinstance(recipe, dict) else recipe_to_dict(recipe)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def data_paths(data: DataConfig) -> list[str]:
    """The datasets of ``data.path``: none, one, or the list of a mixture."""
    return [] if data.path is None else [data.path] if isinstance(data.path, str) else list(data.path)


@dataclass(frozen=True)
class DatasetPart:
    """One dataset of ``data.path`` with the split it trains on and the stored arrays its modalities read."""

    path: str
    train_split: str
    sources: dict[str, str]


def dataset_parts(data: DataConfig) -> list[DatasetPart]:
    """The datasets of ``data.path``: ``data.train_split`` and ``data.sources`` are one value for all of them or a
    list with one per entry (a bag's shards hold split ``all``, an image folder's ``train``)."""
    paths = data_paths(data)
    splits = [data.train_split] * len(paths) if isinstance(data.train_split, str) else list(data.train_split)
    sources = [data.sources] * len(paths) if isinstance(data.sources, dict) else list(data.sources)
    return [DatasetPart(path, split, dict(mapping)) for path, split, mapping in zip(paths, splits, sources)]


def validate(recipe: Recipe, source: str) -> None:
    """Checks that need more than one field, or the file system; raise one-line MmtkErrors."""
    data, model, optim, train = recipe.data, recipe.model, recipe.optim, recipe.train
    paths = data_paths(data)
    for path in paths:
        try:
            found = Path(path).exists()  # a file or a shard folder
        except OSError as err:  # e.g. a name too long for the file system
            raise MmtkError(f"{source}: data.path: {err.strerror}: {path[:80]}") from None
        if not found:
            raise MmtkError(f"{source}: data.path: {path} not found; convert frames with `mmtk convert`")
    if data.path is not None and not paths:
        raise MmtkError(f"{source}: data.path: an empty list; give one data file or several")
    for key, value in (("data.train_split", data.train_split), ("data.sources", data.sources)):
        if not isinstance(value, (str, dict)) and len(value) != len(paths):
            raise MmtkError(f"{source}: {key} lists {len(value)} values for {len(paths)} data.path entries; give one "
                            f"value for all, or one per entry")
    if data.weights is not None and (len(data.weights) != len(paths) or not data.weights or min(data.weights) < 0
                                     or not 0 < sum(data.weights) < float("inf")):
        raise MmtkError(f"{source}: data.weights {list(data.weights)}: give one finite weight >= 0 per data.path "
                        f"entry ({len(paths)}), not all 0; or leave it out to draw by dataset size")
    positive = {
        "optim.batch_size": optim.batch_size,
        "data.repeat": data.repeat,
        "optim.accum_steps": optim.accum_steps,
        "optim.epochs": optim.epochs,
        "optim.lr": optim.lr,
        "model.num_visible": model.num_visible,
        "train.log_every": train.log_every,
        "train.ckpt_every": train.ckpt_every,
        "train.keep_checkpoints": train.keep_checkpoints,
    }
    for key, value in positive.items():
        if not 0 < value < float("inf"):  # also refuses NaN
            raise MmtkError(f"{source}: {key}: must be a finite number > 0, got {value}")
    if optim.warmup_epochs < 0 or optim.warmup_epochs > optim.epochs:
        raise MmtkError(f"{source}: optim.warmup_epochs: must be in [0, optim.epochs], got {optim.warmup_epochs}")
    if not 0 < optim.layer_decay <= 1:
        raise MmtkError(f"{source}: optim.layer_decay: must be in (0, 1], got {optim.layer_decay}")
    if data.augmentation != "random-resized-crop":
        from mmtk.data.augment import AUGMENTATIONS  # imports torchvision: only when asked for

        if data.augmentation not in AUGMENTATIONS:
            raise MmtkError(f"{source}: data.augmentation: unknown {data.augmentation!r}; choose one of "
                            f"{', '.join(AUGMENTATIONS)}")
        if data.image_size is None:
            raise MmtkError(f"{source}: data.augmentation {data.augmentation} crops to data.image_size; set it, "
                            f"e.g. data.image_size=[256,256]")
    if train.target_norm is not None and not (math.isfinite(train.target_norm[0]) and 0 < train.target_norm[1] < math.inf):
        raise MmtkError(f"{source}: train.target_norm: [mean, std] in the task's units, finite, std > 0; got "
                        f"{list(train.target_norm)}")
    if not 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1:
        raise MmtkError(f"{source}: data.crop_scale: need 0 < min <= max <= 1, got {list(data.crop_scale)}")
    if optim.batch_size % optim.accum_steps:
        raise MmtkError(f"{source}: optim.batch_size {optim.batch_size} is not divisible by "
                        f"optim.accum_steps {optim.accum_steps}")
    if isinstance(optim.micro_batch, int) and optim.micro_batch <= 0:
        raise MmtkError(f"{source}: optim.micro_batch: must be > 0, got {optim.micro_batch}")
    if isinstance(data.num_workers, int) and data.num_workers < 0:
        raise MmtkError(f"{source}: data.num_workers: must be >= 0 or auto, got {data.num_workers}")
    if train.max_steps is not None and train.max_steps <= 0:
        raise MmtkError(f"{source}: train.max_steps: must be > 0, got {train.max_steps}")
    if not model.inputs:
        raise MmtkError(f"{source}: model.inputs: give at least one input modality")
    if recipe.kind == "finetune":
        if model.head is None or model.task is None:
            raise MmtkError(f"{source}: a finetune recipe needs model.head (convnext|dpt) and model.task (semseg|depth)")
        from mmtk.modality import get_modality

        try:
            family = get_modality(model.task).family()
        except MmtkError as err:
            raise MmtkError(f"{source}: model.task: {err}") from None
        if train.target_norm is not None and not family.target_norm:
            raise MmtkError(f"{source}: train.target_norm normalises regression targets such as depth; "
                            f"{model.task} is a {family.name} task, remove it")
        if train.loss not in (None, *family.losses):
            raise MmtkError(f"{source}: train.loss: {model.task} finetuning uses "
                            f"{' or '.join(repr(x) for x in family.losses)}, got {train.loss!r}")
    else:
        if not model.outputs:
            raise MmtkError(f"{source}: model.outputs: pretraining needs at least one output task")
        finetuning_only = [f"train.{key}" for key in FINETUNE_LOSS_KEYS
                           if getattr(train, key) != getattr(TrainConfig(), key)]
        if finetuning_only:  # pretraining scores each output with its adapter's own loss: they would do nothing
            raise MmtkError(f"{source}: {', '.join(finetuning_only)} set the finetuning loss; pretraining scores each "
                            f"output with its adapter's loss, so remove them")
