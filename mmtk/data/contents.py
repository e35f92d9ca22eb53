"""What a data file, or a mixture of them, offers a run: modalities, frame size, classes, units; opening a split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtk.errors import MmtkError
from mmtk.modality import get_modality, list_modalities


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


def label_stores() -> list[str]:
    """Stored arrays that registered modalities declare class ids (e.g. semseg)."""
    return [stored.name for name in list_modalities() for stored in get_modality(name).stores
            if stored.kind == "labels"]


def _label_classes(part: dict[str, Any], sources: dict[str, str], where: str) -> list[str]:
    """The class names of the label arrays a recipe reads (through ``sources``: a pseudo-label's own classes)."""
    found = {dataset: part["datasets"][dataset]["classes"] for dataset in
             dict.fromkeys(sources.get(name, name) for name in label_stores())
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

