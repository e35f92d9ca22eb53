"""The weights formats mmtk reads, in the order they are tried: mmtk's own, then each foreign one.

Adding a source of foreign weights is one module (a :class:`~mmtk.weights.foreign.WeightFormat`: how its names
are recognised and renamed) listed in ``_FORMATS`` here; a plugin file registers one with :func:`register_format`.
"""

from __future__ import annotations

from torch import Tensor

from mmtk.errors import MmtkError
from mmtk.plugins import record_registration
from mmtk.weights.foreign import Renamed, WeightFormat
from mmtk.weights.official import OFFICIAL
from mmtk.weights.timm import TIMM


def _is_mmtk(state: dict[str, Tensor]) -> bool:
    return any(n.startswith(("encoder.tokenizers.", "encoder.blocks.")) for n in state)


MMTK = WeightFormat("mmtk", "mmtk", _is_mmtk, lambda state: Renamed(dict(state)), native=True)
_FORMATS: list[WeightFormat] = [MMTK, OFFICIAL, TIMM]  # first match wins: the built-in ones before plugins'


def register_format(weight_format: WeightFormat) -> WeightFormat:
    """Add a weights format (tried after those already known); a name already taken is refused."""
    if any(known.name == weight_format.name for known in _FORMATS):
        raise MmtkError(f"a weights format named '{weight_format.name}' is already registered; give yours another "
                        "name")
    _FORMATS.append(weight_format)
    record_registration(weight_format.name)
    return weight_format


def list_formats() -> list[str]:
    """Names of the known weights formats, in the order they are tried."""
    return [known.name for known in _FORMATS]


def get_format(name: str) -> WeightFormat:
    """The weights format called ``name``."""
    for known in _FORMATS:
        if known.name == name:
            return known
    raise MmtkError(f"unknown weights format '{name}'; known: {', '.join(list_formats())}")


def detect_format(state: dict[str, Tensor]) -> WeightFormat:
    """The first known format whose names the state dict has."""
    for known in _FORMATS:
        if known.detect(state):
            return known
    layouts = ", ".join(known.describes for known in _FORMATS)
    raise MmtkError(f"checkpoint holds no known parameter layout ({layouts})")


def to_mmtk_names(state: dict[str, Tensor]) -> tuple[WeightFormat, Renamed]:
    """(the state dict's format, the state dict renamed into mmtk's names)."""
    weight_format = detect_format(state)
    return weight_format, weight_format.to_mmtk(state)
