"""ONNX export of finetuned models, with a numerical check against ONNX Runtime.

The exported graph has a fixed input set and image size: one input per modality, named after it and
holding the *prepared* tensor of the data contract (``rgb`` [1, 3, H, W] ImageNet-normalised; ``depth``
[1, 1, H, W] robustly standardised), and one output named by the task's family: ``semseg_logits`` [1, C, H, W],
``depth_m`` [1, 1, H, W] (metres), a plugin family's own. The mmtk model name, inputs, image size and task are stored as ONNX metadata.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmtk.errors import MmtkError
from mmtk.io import atomic_path
from mmtk.modality import get_modality
from mmtk.predict import Predictor, load_predictor


class _PositionalInputs(nn.Module):
    """Expose a dict-input model as one taking its prepared tensors positionally (ONNX needs names)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, tensors)))


@dataclass
class ExportResult:
    """What was exported and how well ONNX Runtime agrees with PyTorch on a random prepared input."""

    path: Path
    inputs: tuple[str, ...]
    image_size: tuple[int, int]
    output: str
    max_abs_diff: float  # max |onnxruntime - pytorch| over the output (logits or metres)


def output_name(predictor: Predictor) -> str:
    """The output name the task's family gives it (``<task>_logits``, ``<task>_m`` for depth in metres, ...)."""
    task = predictor.config.task
    return get_modality(task).family().output_name(task)


def example_inputs(inputs: tuple[str, ...], image_size: tuple[int, int], seed: int = 0) -> list[Tensor]:
    """Random prepared tensors [1, C, H, W] for each input (normal values, like normalised data).

    Only dense full-resolution inputs export (stride 1: rgb, depth, xyz, ...); a class map is not a float image.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name in inputs:
        modality = get_modality(name)
        if modality.stride != 1 or modality.ignore_index is not None:
            raise MmtkError(f"export takes dense full-resolution inputs (e.g. rgb, depth), not {name!r}; "
                            f"leave it out with --inputs")
        tensors.append(torch.randn(1, modality.channels, *image_size, generator=generator))
    return tensors


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, inputs: tuple[str, ...] | None = None,
                image_size: tuple[int, int] | None = None, opset: int = 18, check: bool = True) -> ExportResult:
    """Export a finetuned checkpoint to ONNX (written beside ``out``, renamed when complete and checked)."""
    predictor = load_predictor(checkpoint, "cpu")
    config = predictor.config
    if not predictor.finetuned:
        raise MmtkError(f"{checkpoint} is a pretraining checkpoint; export a finetuned model "
                        "(`mmtk finetune`), or use `mmtk predict` for cross-modal prediction")
    names = tuple(inputs or config.inputs)
    unknown = [name for name in names if name not in config.inputs]
    if unknown or not names:
        raise MmtkError(f"--inputs {','.join(names)}: the model takes {','.join(config.inputs)}")
    size = tuple(image_size or config.image_size)
    if size[0] % config.patch_size or size[1] % config.patch_size:
        raise MmtkError(f"--image-size {size[0]},{size[1]}: both must be multiples of the patch size {config.patch_size}")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise MmtkError(f"{out}: the output file must end in .onnx")
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise MmtkError(f"ONNX export needs {', '.join(missing)}; install them with `pip install mmtk[onnx]`")
    wrapper = _PositionalInputs(predictor.model, names).eval()
    example = example_inputs(names, size)
    with atomic_path(out, suffix=".onnx") as tmp:
        with torch.inference_mode():
            expected = wrapper(*example).numpy()
        torch.onnx.export(wrapper, tuple(example), str(tmp), input_names=list(names),
                          output_names=[output_name(predictor)], opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
        _add_metadata(tmp, predictor, names, size)
        diff = float("nan")
        if check:
            got = run_onnx(tmp, dict(zip(names, (t.numpy() for t in example))))
            diff = float(np.abs(got - expected).max())
    return ExportResult(out, names, size, output_name(predictor), diff)


def _add_metadata(path: Path, predictor: Predictor, names: tuple[str, ...], size: tuple[int, int]) -> None:
    import onnx

    model = onnx.load(str(path))
    meta = {"mmtk_model": predictor.model_name, "mmtk_inputs": json.dumps(list(names)),
            "mmtk_image_size": json.dumps(list(size)), "mmtk_task": str(predictor.config.task),
            "mmtk_num_classes": str(predictor.config.num_classes),
            "mmtk_input_preparation": "; ".join(f"{name}: {get_modality(name).preparation or 'see its adapter'}"
                                                for name in names)}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session (clear error when onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MmtkError("ONNX Runtime is not installed; install it with `pip install mmtk[onnx]`") from err
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run an exported model once on prepared float32 inputs; returns its single output."""
    session = onnx_session(path)
    return session.run(None, {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()})[0]
