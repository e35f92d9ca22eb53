"""The task-family interface and its registry: how a finetuning head is trained, scored, printed, exported and pictured.

A task family (semantic segmentation, depth regression in metres, any a plugin adds) is one object: a subclass of
:class:`TaskFamily` decorated with :func:`register_task_family`. A modality names the family that trains and scores
a head predicting it (``Modality.task_family``); training, evaluation, export and the CLI ask the family object and
never compare family names. mmtk's own families live in ``adapters/tasks/``; a plugin file (``--plugin FILE.py``)
may register families beside its modalities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import numpy as np
from torch import Tensor

from mmtk.errors import MmtkError
from mmtk.plugins import load_adapters, record_registration

if TYPE_CHECKING:  # torchmetrics is imported by the families that build metrics, not by every registry lookup
    from torchmetrics import Metric

_FAMILIES: dict[str, "TaskFamily"] = {}


@dataclass(frozen=True)
class Column:
    """One metric of a family: its key (in its metric's ``compute()`` result and in the eval JSON), its table
    header with units ("RMSE m", "mIoU %", "MAE K"), and how a value is printed (a share in percent, else
    ``digits`` decimals). NaN (a metric that does not exist for the frames) prints as "-"."""

    key: str
    header: str
    percent: bool = False
    digits: int = 3

    def format(self, value: float) -> str:
        """The table cell of one value."""
        if math.isnan(value):
            return "-"
        return f"{100 * value:.1f}" if self.percent else f"{value:.{self.digits}f}"


@dataclass(frozen=True)
class LossSettings:
    """The recipe's choices for a finetuning loss: ``loss`` (a name of :attr:`TaskFamily.losses`), ``reduction``
    (``train.loss_reduction``: "image" or "batch") and ``scale`` (the std of ``train.target_norm``: the head predicts
    targets divided by it; 1 when it predicts the task's units)."""

    loss: str
    reduction: str = "image"
    scale: float = 1.0


@dataclass(frozen=True)
class PictureStyle:
    """What evaluation pictures share: the label colours (row 0 unlabeled, row k + 1 class k), the class names, and
    whether predictions are a pretrained model's, rescaled per frame to the ground truth (:attr:`TaskFamily.rescaled`)."""

    palette: np.ndarray
    class_names: tuple[str, ...]
    rescaled: bool = False


@dataclass
class EvalPicture:
    """A task's panels in an evaluation picture: the ground truth, the prediction (None when only the truth is
    drawn, e.g. for an input), each uint8 [H, W, 3], and the legend strip under the picture (width -> uint8 image)."""

    truth: np.ndarray
    prediction: np.ndarray | None
    legend: Callable[[int], np.ndarray]


class TaskFamily:
    """How a finetuning head is trained, scored, printed, exported and pictured.

    Class attributes a subclass sets:
      name:          registry key; a modality names it in ``task_family``.
      title:         the eval table's title, with the units of its values ("depth (metres, valid pixels)").
      losses:        the finetuning losses by name (``train.loss``); the first is the default.
      columns:       the metrics its table and JSON report, with units (:class:`Column`); its metric's
                     ``compute()`` returns each key, plus "pixels" (the pixels scored).
      units:         units the targets are trained and scored in ("m", "K"); "" for class ids. A training file
                     whose target is stored in other units is refused (:meth:`check_units`).
      target_norm:   whether ``train.target_norm`` may normalise its targets (regression).
      class_labels:  its targets are class ids in the model's classes: one head output per class, and data
                     labelled with another class count cannot score it.
      rescaled:      a pretrained model's prediction is rescaled per frame to the ground truth
                     (:meth:`from_pretrained`), so its numbers measure shape, not scale.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    losses: ClassVar[Mapping[str, Callable[..., Tensor]]]
    columns: ClassVar[tuple[Column, ...]]
    units: ClassVar[str] = ""
    target_norm: ClassVar[bool] = False
    class_labels: ClassVar[bool] = False
    rescaled: ClassVar[bool] = False
    units_fix: ClassVar[str] = ""  # what to do with data in other units (:meth:`check_units`); "" for the generic

    @property
    def default_loss(self) -> str:
        """The loss used when the recipe names none."""
        return next(iter(self.losses))

    def targets(self, task: str) -> tuple[str, ...]:
        """The batch tensors a prediction of ``task`` is trained and scored against (e.g. ``<task>_full``)."""
        raise NotImplementedError

    def loss(self, pred: Tensor, batch: dict[str, Tensor], task: str, settings: LossSettings) -> Tensor:
        """The finetuning loss (a scalar) of a head's prediction [B, C, H, W] against ``batch``'s targets."""
        raise NotImplementedError

    def metric(self, adapter: Any, num_classes: int, protocol: Any, view: Any, frame_size: tuple[int, int]) -> Metric:
        """A fresh metric (torchmetrics) for ``task`` (its modality ``adapter``) under an evaluation protocol
        (:class:`mmtk.evaluation.protocols.EvalProtocol`) and its ``view`` of frames of ``frame_size``."""
        raise NotImplementedError

    def update(self, metric: Metric, pred: Tensor, batch: dict[str, Tensor], task: str) -> None:
        """Feed one batch: predictions [B, C, H, W] at the targets' size, on the CPU, as is ``batch``."""
        raise NotImplementedError

    def details(self, result: dict[str, Tensor]) -> dict[str, list[float]]:
        """Per-item values of a computed result for the eval JSON (segmentation: per-class IoU); default none."""
        return {}

    def view(self, protocol: Any, frame_size: tuple[int, int], model_size: tuple[int, int]) -> Any:
        """How ``protocol`` shows frames for this family: per-pixel values by default (``protocol.values_view``)."""
        return protocol.values_view(frame_size, model_size)

    def from_pretrained(self, pred: Tensor, batch: dict[str, Tensor], task: str, size: tuple[int, int]) -> Tensor:
        """A pretrained MultiMAE's standardised prediction [B, C, h, w] in the targets' units at ``size``."""
        raise MmtkError(f"task family {self.name} cannot score a pretrained model's {task} (it does not say how a "
                        f"standardised prediction becomes {self.units or 'its targets'}); evaluate a finetuned model")

    def check_units(self, task: str, stored_units: str | None, source: str) -> None:
        """Refuse training or scoring ``task`` on a file that stores it in units other than :attr:`units`."""
        if self.units and stored_units not in (None, self.units):
            raise MmtkError(f"{task} is trained and scored in {self.units}, but {source} holds it in '{stored_units}' "
                            f"units; {self.units_fix or f'use data that stores it in {self.units}'}")

    def output_name(self, task: str) -> str:
        """The name of the exported model's output (ONNX), e.g. ``<task>_logits``."""
        raise NotImplementedError

    def table_title(self, rescaled: bool) -> str:
        """The eval table's title; ``rescaled``: rows of a pretrained model (see :attr:`rescaled`)."""
        return self.title

    def header(self, column: Column, rescaled: bool) -> str:
        """A column's header in the eval table (a family whose rows are rescaled marks its unit columns)."""
        return column.header

    def footnote(self, rescaled: bool) -> str:
        """A line printed under the table ("" for none)."""
        return ""

    def picture(self, batch: dict[str, Tensor], index: int, task: str, style: PictureStyle,
                pred: Tensor | None = None) -> EvalPicture:
        """Frame ``index`` of ``batch``: its ground truth, the prediction [C, H, W] when given, and a legend."""
        raise MmtkError(f"task family {self.name} draws no evaluation picture; leave out --save-predictions")


def register_task_family(cls: type[TaskFamily]) -> type[TaskFamily]:
    """Class decorator: make a task family available by its ``name`` (``Modality.task_family``)."""
    _FAMILIES[cls.name] = cls()
    record_registration(cls.name)
    return cls


def get_task_family(name: str, needed_by: str = "") -> TaskFamily:
    """The registered task family ``name``; an unknown one names the registered ones and how to add one."""
    load_adapters()
    family = _FAMILIES.get(name)
    if family is None:
        who = f" (the task family of modality {needed_by!r})" if needed_by else ""
        raise MmtkError(f"unknown task family {name!r}{who}; registered: {', '.join(list_task_families())} (a family "
                        f"of your own: a @register_task_family class in a file passed with --plugin FILE.py)")
    return family


def list_task_families() -> list[str]:
    """Names of all registered task families, in registration order (mmtk's own first, then plugins)."""
    load_adapters()
    return list(_FAMILIES)
