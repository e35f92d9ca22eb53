"""safetensors under any name, model folders (config.json + model.safetensors) and huggingface_hub cache folders;
official <-> mmtk <-> folder conversions round-trip bit-exactly, and every command takes a folder."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mmtk
from engine_helpers import run_cli, sample_h5  # noqa: F401
from mmtk.weights.files import is_safetensors, read_state_dict
from weights_helpers import reference_metrics, strict_loads

PARITY = Path(__file__).parent / "parity"
CASES = torch.load(PARITY / "cases.pt", weights_only=True)


def official_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(PARITY / f"{name}_weights.pt", weights_only=True)["state_dict"]


def convert(*args) -> str:
    code, output = run_cli("weights", *args)
    assert code == 0, output
    return output


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", ["pretrain_64x64", "semseg_ft", "depth_ft"])
def test_official_to_folder_and_back_is_bit_exact(name, tmp_path):
    heads = ["--set", "num_heads=4"] + (["--set", "decoder_heads=4"] if name.startswith("pretrain") else [])
    output = convert(PARITY / f"{name}_weights.pt", "--to", tmp_path / "folder", *heads)
    assert "model: custom, width 64" in output
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["config.json", "model.safetensors"]
    convert(tmp_path / "folder", "--to-official", tmp_path / "back.pth")
    original = official_state(name)
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    convert(tmp_path / "folder", "--to-official", tmp_path / "back.safetensors")
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "back.safetensors"))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


@pytest.mark.parametrize("index", [0, 6, 7, 8], ids=lambda i: CASES[i]["model"])
def test_folder_records_what_the_official_file_cannot_say(index, tmp_path):
    """Heads are not in the tensors: written once into the folder, the model then computes the official outputs."""
    case = CASES[index]
    heads = ["--set", "num_heads=4"] + (["--set", "decoder_heads=4"] if case["model"].startswith("pretrain") else [])
    convert(PARITY / f"{case['model']}_weights.pt", "--to", tmp_path / "folder", *heads)
    model = mmtk.create_model(pretrained=tmp_path / "folder", verbose=False).eval()
    assert model.load_report.notes == [] and model.load_report.missing == []
    with torch.no_grad():
        preds = model(case["inputs"], masks=case["masks"]).preds if "masks" in case else {
            model.config.task: model(case["inputs"])}
    for task, ref in case["preds"].items():
        assert ((preds[task] - ref).abs().max() / ref.abs().max()).item() < 1e-5, task


def test_mmtk_checkpoint_to_folder_to_official_and_back_is_bit_exact(tmp_path):
    args = dict(dim=64, depth=2, num_heads=2, image_size=[64, 96], inputs=["rgb", "depth"], head="dpt", task="depth",
                hooks=[0, 1, 1, 1], layer_dims=[8, 16, 32, 64], dpt_dim=32)
    torch.manual_seed(0)
    source = mmtk.create_model("multimae-tiny", **args)
    torch.save({"model_name": "multimae-tiny", "model_args": args, "model": source.state_dict(), "step": 3},
               tmp_path / "run.pt")
    convert(tmp_path / "run.pt", "--to", tmp_path / "a")
    loaded = mmtk.create_model(pretrained=tmp_path / "a", verbose=False)
    assert_same(loaded.state_dict(), source.state_dict())
    same = dataclasses.replace(source.config, outputs=(), fp32_decoders=None)  # a finetuned model: no decoders
    assert loaded.config == same and loaded.model_name == "custom (multimae-tiny with width 64, 2 blocks, 2 heads)"
    convert(tmp_path / "a", "--to-official", tmp_path / "official.pth")
    convert(tmp_path / "official.pth", "--to", tmp_path / "b", "--set", "num_heads=2")
    from safetensors.torch import load_file

    assert_same(load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors")))
    assert mmtk.create_model(pretrained=tmp_path / "b", verbose=False).config == same


def test_safetensors_is_told_by_its_bytes_not_its_name(tmp_path):
    convert(PARITY / "depth_ft_weights.pt", "--to", tmp_path / "folder", "--set", "num_heads=4")
    renamed = tmp_path / "weights.pt"  # safetensors bytes under a PyTorch name
    shutil.copy(tmp_path / "folder" / "model.safetensors", renamed)
    assert is_safetensors(renamed) and not is_safetensors(PARITY / "depth_ft_weights.pt")
    model = mmtk.create_model(pretrained=renamed, verbose=False)  # the metadata carries the model, heads included
    assert model.config.num_heads == 4 and model.load_report.missing == []
    pickled = tmp_path / "model.safetensors"  # and PyTorch bytes under a safetensors name
    shutil.copy(PARITY / "depth_ft_weights.pt", pickled)
    assert mmtk.create_model(pretrained=pickled, num_heads=4, verbose=False).config.head == "dpt"
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(renamed.read_bytes()[:5000])
    with pytest.raises(mmtk.MmtkError, match="corrupt, truncated"):
        read_state_dict(truncated)


def test_huggingface_hub_cache_folder_loads_offline(tmp_path):
    """A cache entry laid out as huggingface_hub stores it (blobs named by hash, snapshot links, refs/main)."""
    convert(PARITY / "depth_ft_weights.pt", "--to", tmp_path / "folder", "--set", "num_heads=4")
    repo = tmp_path / "hub" / "models--someone--multimae-depth"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        data = (tmp_path / "folder" / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / revision), repo / "snapshots" / revision / name)
    hub = pytest.importorskip("huggingface_hub")
    found = hub.snapshot_download("someone/multimae-depth", cache_dir=tmp_path / "hub", local_files_only=True)
    assert Path(found) == repo / "snapshots" / revision  # the library itself resolves this layout, offline
    reference = mmtk.create_model(pretrained=tmp_path / "folder", verbose=False).state_dict()
    for source in (repo, repo / "snapshots" / revision):
        assert_same(mmtk.create_model(pretrained=source, verbose=False).state_dict(), reference)


def test_every_command_takes_a_folder(sample_h5, tmp_path):
    from test_parity import build  # the parity model built the usual way (explicit arguments)

    convert(PARITY / "depth_ft_weights.pt", "--to", tmp_path / "depth", "--set", "num_heads=4")
    code, output = run_cli("eval", "--checkpoint", tmp_path / "depth", "--data", sample_h5, "--inputs", "rgb",
                           "--json", tmp_path / "eval.json")
    assert code == 0, output
    (row,) = strict_loads((tmp_path / "eval.json").read_text())["results"]
    expected = reference_metrics(build("depth_ft"), sample_h5, ("rgb",), "depth")
    assert row["metrics"]["rmse"] == pytest.approx(expected["rmse"], rel=1e-6)
    code, output = run_cli("eval", "--checkpoint", tmp_path / "depth")  # no --data: a folder names no training file
    assert code == 2 and "records no data file (it is not from an mmtk run); pass --data FILE.h5" in output

    convert(PARITY / "semseg_ft_weights.pt", "--to", tmp_path / "semseg", "--set", "num_heads=4")
    code, output = run_cli("predict", "--checkpoint", tmp_path / "semseg", "--data", sample_h5, "--split", "test",
                           "--outputs", "semseg", "--out", tmp_path / "pred")
    assert code == 0, output
    from mmtk.data.sources.mmtk_files import open_split, read_frame
    from mmtk.predict import Predictor, predict_frame

    with open_split(sample_h5, "test") as group:
        frame = read_frame(group, 0, ["rgb", "depth"])
    reference = predict_frame(Predictor(build("semseg_ft"), "parity", {}, "cpu"), frame, outputs=("semseg",))
    from PIL import Image

    (labels,) = sorted((tmp_path / "pred").glob("*_semseg_labels.png"))
    assert np.array_equal(np.array(Image.open(labels)), reference.outputs["semseg"].values)
    assert "4 attention heads" in convert(tmp_path / "semseg")
    ft = mmtk.create_model(pretrained=tmp_path / "semseg", head="dpt", task="depth", inputs=("rgb",), verbose=False)
    assert ft.config.num_heads == 4  # finetune --init DIR goes through create_model(pretrained=DIR)


def _checkpoint_state(device: str) -> dict:
    weights = torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4)
    return {"model": {"w": weights, "w_t": weights.t(), "first_row": weights[0]}, "step": 3,
            "optimizer": {"state": {0: {"exp_avg": torch.ones(4, device=device)}}, "param_groups": [{"lr": 0.1}]},
            "rng": [(1, (2, 3), None)]}


def test_sealing_copies_no_host_tensor_and_the_written_file_verifies(tmp_path):
    """The digest is taken of the tensors torch.save writes: host tensors are neither copied by sealing nor
    unshared (views of one tensor stay one storage in the file), and the file reads back with its digest."""
    from mmtk.weights.integrity import content_digest, seal

    state = _checkpoint_state("cpu")
    sealed = seal(state)
    assert all(sealed["model"][k] is not state["model"][k] and sealed["model"][k].data_ptr() == t.data_ptr()
               for k, t in state["model"].items())
    assert sealed["sha256"] == content_digest(state) and sealed["rng"] == state["rng"]
    torch.save(sealed, tmp_path / "ckpt.pt")
    back = read_state_dict(tmp_path / "ckpt.pt")  # checks the digest
    assert back["model"]["w_t"].untyped_storage().data_ptr() == back["model"]["w"].untyped_storage().data_ptr()
    assert torch.equal(back["model"]["w_t"], state["model"]["w"].t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sealing_copies_each_device_tensor_to_the_host_once(tmp_path):
    """Device tensors are copied to the host once, by sealing (same digest as on the device); torch.save then
    copies nothing, and views of one device tensor stay one host tensor."""
    from mmtk.weights.integrity import content_digest, seal

    state = _checkpoint_state("cuda")
    sealed = seal(state)
    host = [*sealed["model"].values(), sealed["optimizer"]["state"][0]["exp_avg"]]
    assert all(t.device.type == "cpu" for t in host)
    assert sealed["sha256"] == content_digest(state) == content_digest(_checkpoint_state("cpu"))
    again = seal({"a": state["model"]["w"], "b": state["model"]["w"].detach()})
    assert again["a"] is again["b"]  # the same view of the same memory: one copy
    torch.save(sealed, tmp_path / "ckpt.pt")
    assert torch.equal(read_state_dict(tmp_path / "ckpt.pt")["model"]["w"], state["model"]["w"].cpu())
