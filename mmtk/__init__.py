"""mmtk: MultiMAE-style multi-modal multi-task masked autoencoders for RGB-D robotics data."""

from mmtk.errors import MmtkError
from mmtk.formats import LoadReport, export_official, load_weights
from mmtk.multimae import DenseModel, ModelConfig, MultiMAE, MultiMAEOutput, compile_blocks
from mmtk.registry import build_model, create_model, list_models, model_config

__version__ = "0.1.0"

__all__ = [
    "DenseModel", "LoadReport", "MmtkError", "ModelConfig", "MultiMAE", "MultiMAEOutput", "build_model", "compile_blocks",
    "create_model", "export_official", "list_models", "load_weights", "model_config",
]
