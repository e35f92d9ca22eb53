"""The registry of weights formats: a format defined in a plugin (here, this test file) is recognised, renamed and
loaded like the built-in ones, by `create_model` and `mmtk weights`, without touching mmtk."""

from __future__ import annotations

import pytest
import torch

import mmtk
import mmtk.weights.sources as sources
from cli_helpers import invoke
from mmtk.weights.foreign import Renamed, WeightFormat
from mmtk.weights.sources import list_formats, register_format

ARGS = dict(dim=64, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, image_size=[64, 64],
            inputs=["rgb", "depth"], outputs=["rgb", "depth"])
PREFIX = "net."  # a lab's exporter: mmtk's names under "net.", and a classifier mmtk does not build


def lab_to_mmtk(state: dict[str, torch.Tensor]) -> Renamed:
    """The format's filter: its names back into mmtk's; the classifier reported unused."""
    renamed = {name[len(PREFIX):]: tensor for name, tensor in state.items() if name.startswith(PREFIX)}
    return Renamed(renamed, [name for name in state if not name.startswith(PREFIX)], ["lab export: prefix dropped"])


LAB = WeightFormat("lab", "lab export", detect=lambda state: any(n.startswith(PREFIX + "encoder.") for n in state),
                   to_mmtk=lab_to_mmtk)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(sources, "_FORMATS", list(sources._FORMATS))  # what this test registers goes away after it


def test_a_format_registered_from_a_test_file_loads_with_create_model_and_mmtk_weights(tmp_path, registry):
    reference = mmtk.create_model("multimae-tiny", verbose=False, **ARGS)
    state = {PREFIX + name: tensor for name, tensor in reference.state_dict().items()}
    path = tmp_path / "lab.pth"
    torch.save({"state_dict": {**state, "fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(mmtk.MmtkError, match=r"no known parameter layout \(mmtk, official MultiMAE, timm ViT\)"):
        mmtk.create_model(pretrained=path, verbose=False)

    register_format(LAB)
    assert list_formats() == ["mmtk", "official", "timm", "lab"]
    model = mmtk.create_model(pretrained=path, verbose=False, num_heads=2)
    report = model.load_report
    assert report.format == "lab" and report.unused == ["fc.weight"] and report.missing == []
    assert "lab export: prefix dropped" in report.notes
    assert all(torch.equal(tensor, reference.state_dict()[name]) for name, tensor in model.state_dict().items())
    code, output = invoke("weights", path, "--set", "num_heads=2", "--to", tmp_path / "folder")
    assert code == 0 and f"{path}: format lab" in output and "1 tensors not part of the model: fc.weight" in output
    assert mmtk.create_model(pretrained=tmp_path / "folder", verbose=False).load_report.format == "mmtk"


def test_a_format_name_is_registered_once(registry):
    register_format(LAB)
    with pytest.raises(mmtk.MmtkError, match="a weights format named 'lab' is already registered"):
        register_format(LAB)
