"""The modality interface, its registry and the plugins that add modalities (and task families, :mod:`mmtk.task`).

A modality is one file: a subclass of :class:`Modality` decorated with :func:`register_modality`.
It says what a frame of it stores in mmtk HDF5 files (:class:`StoredArray`) and how a stored crop becomes
its prepared tensor (:meth:`Modality.load`: the one home of its preparation and statistics), how the prepared
tensor becomes tokens (tokenizer), how many values each output pixel has (the generic decoder un-patchifies to
that), where its training target comes from, its per-pixel loss, and how a prediction goes back to its units
(:meth:`Modality.to_units`). The core never names a modality; it looks them up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from torch import Tensor, nn

from mmtk.errors import MmtkError
from mmtk.plugins import ENTRY_POINT_GROUP, load_adapters, record_registration
from mmtk.task import TaskFamily, get_task_family

_REGISTRY: dict[str, type["Modality"]] = {}
_ORIGINS: dict[str, str] = {}  # modality -> where it came from: "mmtk", "package:<entry point>", "file:<path>"
STORED_KINDS = ("image", "metric", "labels")
# The ``units`` attr of a "metric" array known only up to an unknown scale and shift (written by a pseudo-labeller,
# read by the adapter that prepares it): the quantity itself, or its inverse (larger = nearer for depth).
RELATIVE_UNITS = "relative"
RELATIVE_INVERSE_UNITS = "relative-inverse"


@dataclass(frozen=True)
class StoredArray:
    """One per-frame array a modality keeps in mmtk HDF5 files (the dataset ``/<split>/<name>``).

    kind:
      "image":  integer samples [H, W] or [H, W, channels] (colour, infrared, ...); resized bilinearly.
      "metric": float32 [H, W] in ``units``, 0 = invalid (NaN, inf and negatives are stored as 0); resized
                validity-aware; the writer keeps valid fraction and range as attributes.
      "labels": integer class ids [H, W], 0 = unlabeled, id k is ``classes[k-1]``; resized nearest; the
                writer keeps a class histogram.
    dtypes: accepted dtypes; the first is the one stored.
    codec: how format 2 keeps it on disk, a name of ``mmtk.data.codecs``: "blosc2" (lossless HDF5 filter, any
      dtype; the default) or an image codec ("qoi": lossless 8-bit colour, one encoded image per frame). Frames
      that arrive encoded (JPEG bytes) or as integers with a scale are kept as they came either way.
    """

    name: str
    kind: str
    dtypes: tuple[str, ...]
    units: str
    channels: int = 0  # 0: [H, W]; C: [H, W, C]
    codec: str = "blosc2"

    def __post_init__(self) -> None:
        if self.kind not in STORED_KINDS:
            raise ValueError(f"StoredArray {self.name}: kind must be one of {STORED_KINDS}, got {self.kind!r}")

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype."""
        return np.dtype(self.dtypes[0])

    def check(self, array: Any, frame_id: object) -> np.ndarray:
        """One frame's array in its stored dtype and layout, or a one-line MmtkError naming the problem."""
        array = np.asarray(array)
        shape = "[H, W]" if self.channels == 0 else f"[H, W, {self.channels}]"
        if array.ndim != (2 if self.channels == 0 else 3) or (self.channels and array.shape[2] != self.channels):
            raise MmtkError(f"frame {frame_id}: {self.name} has shape {list(array.shape)}, expected {shape}")
        if array.dtype.name not in self.dtypes:
            raise MmtkError(f"frame {frame_id}: {self.name} has dtype {array.dtype}, expected "
                            f"{' or '.join(self.dtypes)}")
        if self.kind == "metric":
            array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            array[array < 0] = 0.0
        return array


class Modality:
    """One modality: tokenizer, decoder output layout, target and loss.

    Class attributes a subclass sets:
      name:          registry key, also the key of the prepared tensor in `inputs`.
      channels:      channels of the prepared tensor, and the decoder's values per output pixel unless
                     `out_channels` says otherwise (semseg: 1 label per pixel in, the class count out).
      stride:        the prepared tensor is at 1/stride of the image resolution (semseg: 4).
      is_input:      whether it can be encoded (False for target-only tasks such as norm_rgb).
      mask_source:   the input whose positions give the decoder's queries and whose token mask
                     decides which pixels the loss sees (default: itself; norm_rgb uses rgb).
      pos_mode:      interpolation of its positional grid at other image sizes.
      ignore_index:  the target value that marks unlabelled pixels, for class-index targets.
      fp32_decoder:  its decoder runs in fp32 under autocast unless ModelConfig.fp32_decoders says otherwise.
      colour:        its stored arrays are colour images: the colour steps of whole-frame augmentations
                     (mmtk.data.augment: colour jitter, grayscale) apply to them; geometry applies to all.
      preparation:   one line saying how :meth:`load` prepares it (the metadata of an exported ONNX model).
      task_family:   the registered task family (:mod:`mmtk.task`) that trains and scores a finetuning head
                     predicting it: mmtk's "segmentation" (cross-entropy, mIoU) or "depth" (berHu/L1, delta/AbsRel/
                     RMSE in metres), or a plugin's; None: not a finetuning task.
      stores:        the per-frame arrays it keeps in mmtk HDF5 files (dataset name, dtype, units, validity);
                     empty for modalities computed from others (xyz) or target-only ones (norm_rgb).
      stored_from:   HDF5 datasets of a split it is read or computed from (default: its own name);
                     see :meth:`load`.
    """

    name: ClassVar[str]
    channels: ClassVar[int] = 1
    stride: ClassVar[int] = 1
    is_input: ClassVar[bool] = True
    mask_source: ClassVar[str | None] = None
    pos_mode: ClassVar[str] = "bicubic"
    ignore_index: ClassVar[int | None] = None  # target value that marks "no label" (semseg: 255)
    task_family: ClassVar[str | None] = None  # a registered task family's name: how it is finetuned and scored
    fp32_decoder: ClassVar[bool] = False  # its decoder runs in fp32 under autocast (ModelConfig.fp32_decoders)
    colour: ClassVar[bool] = False  # colour augmentations (jitter, grayscale) apply to its stored arrays
    preparation: ClassVar[str] = ""  # how load prepares it, in one line (exported models' metadata)
    stores: ClassVar[tuple[StoredArray, ...]] = ()
    stored_from: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def reads(cls) -> tuple[str, ...]:
        """The HDF5 datasets one frame of this modality is prepared from."""
        return cls.stored_from or (cls.name,)

    def __init__(self, patch_size: int = 16, num_classes: int = 0) -> None:
        self.patch_size = patch_size
        self.num_classes = num_classes

    @classmethod
    def family(cls) -> TaskFamily:
        """The task family that trains and scores a finetuning head predicting this modality, or MmtkError."""
        if cls.task_family is None:
            tasks = [name for name, modality in _REGISTRY.items() if modality.task_family is not None]
            raise MmtkError(f"{cls.name} is not a finetuning task (its adapter names no task_family); finetuning "
                            f"tasks: {', '.join(tasks)}")
        return get_task_family(cls.task_family, needed_by=cls.name)

    @property
    def loss_mask_source(self) -> str:
        return self.mask_source or self.name

    @property
    def out_channels(self) -> int:
        """Values per output pixel predicted by the decoder."""
        return self.channels

    def tokenizer(self, dim: int, grid: tuple[int, int]) -> nn.Module:
        """A module mapping the prepared tensor [B, ...] to tokens [B, gh*gw, dim] (positions included).

        Default: patches of the dense [B, channels, H, W] map (rgb, depth, xyz, ...).
        """
        if not self.is_input:
            raise MmtkError(f"modality '{self.name}' is target-only; remove it from the model inputs")
        from mmtk.model.layers import PatchTokenizer

        return PatchTokenizer(self.channels, dim, self.patch_size, grid, stride=self.stride, pos_mode=self.pos_mode)

    def bind_stored(self, name: str, attrs: dict[str, Any]) -> None:
        """Learn what a stored dataset this modality reads holds, before any frame is loaded.

        Called once per dataset of :meth:`reads` (``name`` as ``data.sources`` maps it) with its HDF5
        attributes; e.g. depth learns that it reads relative inverse depth. Default: nothing to learn.
        """

    def target(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """The training target in the decoder's output layout, or None when the batch lacks it."""
        return inputs.get(self.name)

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        """[B, h, w] bool of pixels whose target is meaningful, or None when all are."""
        return None

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-pixel loss [B, h, w] of a prediction [B, C, h, w] against its target."""
        raise NotImplementedError

    def picture(self, prepared: Tensor) -> np.ndarray | None:
        """A uint8 RGB picture [H, W, 3] of one prepared tensor (for evaluation pictures), or None for none."""
        return None

    def to_units(self, standardised: Tensor, measured: Tensor, valid: Tensor) -> Tensor | None:
        """A prediction of the prepared tensor [B, C, H, W] in the stored array's units; None: no way back.

        For a modality prepared by a per-frame standardisation: its inverse, with each frame's statistics taken from
        ``measured`` [B, C, H, W] (the same frame's stored values, at the prediction's size) where ``valid``. Used
        to score and write what a pretrained model predicts. Default: None (the prediction stays relative).
        """
        return None

    def check_stored(self, stored: StoredArray, array: Any, frame_id: object) -> np.ndarray:
        """Validate one frame's array before it is written (``stored`` is one of :attr:`stores`).

        Default: shape and dtype (:meth:`StoredArray.check`). Adapters add what they know of their values
        (depth: plausible metres).
        """
        return stored.check(array, frame_id)

    def load(self, read: Callable[[str], Any], window: Any, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Prepared tensors of one frame for `mmtk.data.H5Dataset`: the one way a stored crop is prepared.

        `read(name)` returns the frame's stored array `name` (one of :meth:`reads`) cropped to `window` (a
        `mmtk.data.transforms.CropWindow`: top, left, height, width, flip); per-frame matrices such as
        "intrinsics" come whole. Return the modality's tensor (key `name`) plus optional extra entries such
        as a "<name>_valid" map or full-resolution targets.
        """
        raise MmtkError(f"modality '{self.name}' cannot be loaded from an mmtk HDF5 file")


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make a modality available to `mmtk.create_model` by its `name`."""
    _REGISTRY[cls.name] = cls
    _ORIGINS[cls.name] = record_registration(cls.name)
    return cls


def modality_origins(names: Any) -> dict[str, str]:
    """Where each named modality came from, for checkpoints: "mmtk", "package:<module>" or "file:<path>"."""
    return {name: _ORIGINS.get(name, "mmtk") for name in names}


def require_registered(origins: dict[str, str], what: str) -> None:
    """Every modality of a checkpoint or recipe, and the task family each names, is registered; a missing modality
    names its plugin."""
    load_adapters()
    for name, origin in origins.items():
        if name in _REGISTRY:
            if _REGISTRY[name].task_family is not None:
                try:
                    _REGISTRY[name].family()
                except MmtkError as err:  # a family from another plugin file than its modality's
                    raise MmtkError(f"{what}: {err}") from None
            continue
        if origin.startswith("file:"):
            raise MmtkError(f"{what} uses modality {name!r} from the plugin {origin[5:]}; pass --plugin {origin[5:]}")
        if origin.startswith("package:"):
            raise MmtkError(f"{what} uses modality {name!r} from the package module {origin[8:]}; install that "
                            f"package (it registers the entry point {ENTRY_POINT_GROUP})")
        raise MmtkError(f"{what} uses modality {name!r}, which no loaded adapter registers; pass its --plugin")


def get_modality(name: str) -> type[Modality]:
    """Look up a registered modality class by name."""
    load_adapters()
    if name not in _REGISTRY:
        raise MmtkError(f"unknown modality '{name}'; registered: {', '.join(_REGISTRY)} (a modality of your own: "
                        f"pass its adapter file with --plugin FILE.py or list it under plugins: in the recipe)")
    return _REGISTRY[name]


def list_modalities() -> list[str]:
    """Names of all registered modalities, in registration order (mmtk's own first, then plugins)."""
    load_adapters()
    return list(_REGISTRY)


def stored_array(name: str) -> tuple[type[Modality], StoredArray]:
    """The modality that stores the HDF5 dataset ``name``, and its :class:`StoredArray`."""
    load_adapters()
    for cls in _REGISTRY.values():
        for stored in cls.stores:
            if stored.name == name:
                return cls, stored
    known = sorted(s.name for cls in _REGISTRY.values() for s in cls.stores)
    raise MmtkError(f"no registered modality stores {name!r} (stored arrays: {', '.join(known)}); add an "
                    f"adapter for it (a file with a @register_modality class, loaded with --plugin FILE.py)")
