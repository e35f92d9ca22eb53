"""What a weights format is: how its files are recognised and renamed into mmtk's parameter names.

In the spirit of timm's ``checkpoint_filter_fn``: a format's ``to_mmtk`` renames a state dict into mmtk's names,
reshapes what mmtk stores otherwise, and reports every tensor it could not use. The formats mmtk reads are listed
in :mod:`mmtk.weights.sources`, one module each (:mod:`mmtk.weights.official`, :mod:`mmtk.weights.timm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

# The modalities foreign layouts imply, in one place (mmtk's own files record theirs): a timm/MAE ViT's patch
# embedding reads RGB; the official MultiMAE files hold the class map whose tokenizer embeds classes, and a
# head file that does not name its task is the paper's ConvNeXt semantic segmentation or, with one output
# channel, its DPT depth.
FOREIGN_MODALITIES = {"vit_image": "rgb", "class_map": "semseg", "convnext_task": "semseg", "dpt_task": "depth"}


@dataclass
class Renamed:
    """A state dict renamed into mmtk's names, with what did not map and what the renaming did."""

    state: dict[str, Tensor]  # mmtk names
    unused: list[str] = field(default_factory=list)  # names in the file with no mmtk meaning
    notes: list[str] = field(default_factory=list)  # how the file was read (kept tokens, dropped parts)
    task: str | None = None  # the task of a finetuning head, where the file names it (e.g. its output adapter)


@dataclass(frozen=True)
class WeightFormat:
    """A layout of parameter names mmtk reads: what it is called, how it is recognised, how it is renamed.

    ``detect`` looks at the names (and shapes) of a state dict only; ``to_mmtk`` raises :class:`MmtkError` for
    a file of this format that mmtk cannot reproduce. ``native``: the file is mmtk's own (it records what it
    was trained with, so nothing it lacks needs to be announced as assumed).
    """

    name: str  # as reported: `format official`
    describes: str  # for messages: "official MultiMAE"
    detect: Callable[[dict[str, Tensor]], bool]
    to_mmtk: Callable[[dict[str, Tensor]], Renamed]
    native: bool = False
