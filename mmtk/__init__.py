"""mmtk: MultiMAE-style multi-modal multi-task masked autoencoders for RGB-D robotics data.

The public names below load on first use (PEP 562), so `import mmtk.cli` and `mmtk --help` do not pay for
importing torch and timm.
"""

import importlib
from typing import TYPE_CHECKING

from mmtk.errors import MmtkError

if TYPE_CHECKING:  # what editors and type checkers see
    from mmtk.weights.load import LoadReport, load_weights  # noqa: F401
    from mmtk.weights.official import export_official  # noqa: F401
    from mmtk.model.multimae import (DenseModel, ModelConfig, MultiMAE, MultiMAEOutput, compile_blocks,  # noqa: F401
                               compile_step)
    from mmtk.registry import build_model, create_model, list_models, model_config  # noqa: F401

__version__ = "0.1.0"

_PUBLIC = {
    "LoadReport": "mmtk.weights.load", "export_official": "mmtk.weights.official", "load_weights": "mmtk.weights.load",
    "DenseModel": "mmtk.model.multimae", "ModelConfig": "mmtk.model.multimae", "MultiMAE": "mmtk.model.multimae",
    "MultiMAEOutput": "mmtk.model.multimae", "compile_blocks": "mmtk.model.multimae", "compile_step": "mmtk.model.multimae",
    "build_model": "mmtk.registry", "create_model": "mmtk.registry", "list_models": "mmtk.registry",
    "model_config": "mmtk.registry",
}

__all__ = ["MmtkError", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mmtk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
