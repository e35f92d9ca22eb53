"""A weights file says what model it is: create_model(pretrained=FILE) infers the model, arguments that contradict
the file are refused in one line or applied on purpose with the parameters that start fresh named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import mmtk
from mmtk.weights.load import read_weights

PARITY = Path(__file__).parent / "parity"
CASES = torch.load(PARITY / "cases.pt", weights_only=True)


def official_from_listing(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the exact layout of an official checkpoint (names and shapes of the key listing)."""
    listing = json.loads((PARITY / f"multimae_official_{kind}_keys.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    state = {e["name"]: torch.randn(e["shape"], generator=gen) for e in listing if e["kind"] != "parameter_alias"}
    for entry in listing:  # an alias is the same tensor registered a second time (DPT heads)
        if entry["kind"] == "parameter_alias":
            target = re.sub(r"act_postprocess\.(\d)\.", lambda m: f"act_{int(m[1]) + 1}_postprocess.", entry["name"])
            state[entry["name"]] = state[re.sub(r"layer_rn\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}_rn.", target)]
    return state


def test_official_pretraining_checkpoint_loads_with_default_arguments():
    official = official_from_listing("pretrain")
    model = mmtk.create_model("multimae-base", pretrained={"model": official}, verbose=False)
    report = model.load_report
    assert report.format == "official" and report.unused == [] and report.missing == [] and report.resized == []
    config = model.config
    assert (config.dim, config.depth, config.num_heads, config.patch_size, config.image_size) == (768, 12, 12, 16, (224, 224))
    assert config.num_classes == 133 and config.inputs == ("rgb", "depth", "semseg")
    assert set(config.outputs) == {"rgb", "depth", "semseg", "norm_rgb"} and config.head is None
    assert any("num_heads=12 assumed" in note for note in report.notes)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 97_917_072  # the reference's count
    gen = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randn(1, 3, 224, 224, generator=gen), "depth": torch.randn(1, 1, 224, 224, generator=gen),
             "semseg": torch.randint(0, 133, (1, 56, 56), generator=gen)}
    batch["semseg"][0, 0, 0] = 132  # a class id above 39 is a class of this model
    with torch.no_grad():
        out = model(batch)
    assert out.preds["semseg"].shape == (1, 133, 56, 56) and torch.isfinite(out.loss)


@pytest.mark.parametrize("kind, expected", [
    ("semseg", dict(head="convnext", task="semseg", num_classes=40, inputs=("rgb", "depth"), main_inputs=("rgb",),
                    image_size=(640, 640), convnext_dim=6144, convnext_depth=4, preds_per_patch=16)),
    ("depth", dict(head="dpt", task="depth", inputs=("rgb",), main_inputs=("rgb",), image_size=(256, 256),
                   hooks=(2, 5, 8, 11), layer_dims=(96, 192, 384, 768), dpt_dim=256)),
])
def test_official_finetuned_checkpoints_describe_their_head(kind, expected):
    weights = read_weights({"model": official_from_listing(kind)})
    assert {key: weights.config[key] for key in expected} == expected
    model = mmtk.create_model(pretrained=weights, verbose=False)
    assert model.load_report.unused == [] and model.load_report.missing == []
    assert model.model_name == "multimae-base"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c['model']}-{i}" for i, c in enumerate(CASES)])
def test_parity_files_load_with_only_the_heads_given(index):
    """Each official-layout file of the parity vectors, loaded by path with nothing but the attention heads
    (which no tensor shape records), computes the official outputs."""
    case = CASES[index]
    heads = dict(num_heads=4, decoder_heads=4) if case["model"].startswith("pretrain") else dict(num_heads=4)
    model = mmtk.create_model(pretrained=PARITY / f"{case['model']}_weights.pt", verbose=False, **heads).eval()
    assert model.load_report.unused == [] and model.load_report.missing == []
    with torch.no_grad():
        preds = model(case["inputs"], masks=case["masks"]).preds if "masks" in case else {
            model.config.task: model(case["inputs"])}
    for task, ref in case["preds"].items():
        err = ((preds[task] - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"{task}: relative error {err:.1e}"


def test_name_or_trunk_argument_contradicting_the_file_is_refused_in_one_line():
    path = PARITY / "pretrain_64x64_weights.pt"
    with pytest.raises(mmtk.MmtkError, match=r"holds a 64-wide encoder of 2 blocks, not multimae-base") as err:
        mmtk.create_model("multimae-base", pretrained=path)
    assert "\n" not in str(err.value)
    with pytest.raises(mmtk.MmtkError, match=r"depth=4 contradicts .* holds depth=2"):
        mmtk.create_model(pretrained=path, depth=4)
    with pytest.raises(mmtk.MmtkError, match=r"patch_size=8 contradicts"):
        mmtk.create_model(pretrained=path, patch_size=8)


def test_recorded_heads_are_fixed(tmp_path):
    model = mmtk.create_model("multimae-tiny", dim=64, depth=2, num_heads=2, image_size=64, inputs=("rgb",),
                              outputs=("rgb",), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    path = tmp_path / "run.pt"
    torch.save({"model_name": "multimae-tiny", "model_args": dict(dim=64, depth=2, num_heads=2, image_size=[64, 64],
               inputs=["rgb"], outputs=["rgb"], decoder_dim=32, decoder_depth=1, decoder_heads=2),
                "model": model.state_dict()}, path)
    again = mmtk.create_model(pretrained=path, verbose=False)
    assert again.config.num_heads == 2 and again.load_report.notes == []  # nothing assumed
    with pytest.raises(mmtk.MmtkError, match="num_heads=4 contradicts"):
        mmtk.create_model(pretrained=path, num_heads=4)


def test_a_new_head_or_class_count_is_applied_on_purpose_and_named(capsys):
    path = PARITY / "pretrain_64x64_weights.pt"
    reference = mmtk.create_model(pretrained=path, num_heads=4, decoder_heads=4, verbose=False)
    assert reference.config.num_classes == 7
    recount = mmtk.create_model(pretrained=path, num_heads=4, decoder_heads=4, num_classes=40)
    line = capsys.readouterr().out
    assert "applied on purpose: num_classes 7 -> 40" in line
    assert "start fresh (changed by the arguments): encoder.tokenizers.semseg.class_emb, decoders.semseg.out_proj" in line
    assert set(recount.load_report.missing) == {"encoder.tokenizers.semseg.class_emb.weight",
                                                "decoders.semseg.out_proj.weight", "decoders.semseg.out_proj.bias"}
    assert torch.equal(recount.encoder.blocks[1].mlp.fc2.weight, reference.encoder.blocks[1].mlp.fc2.weight)

    ft = mmtk.create_model(pretrained=path, num_heads=4, head="dpt", task="depth", inputs=("rgb",), verbose=False)
    notes = "; ".join(ft.load_report.notes)
    assert "head None -> dpt" in notes and "start fresh (changed by the arguments): head" in notes
    assert ft.config.hooks == (0, 1, 1, 1)  # spread over the 2 blocks
    assert all(name.startswith(("head.",)) for name in ft.load_report.missing)
    assert any(name.startswith("encoder.tokenizers.depth") for name in ft.load_report.unused)


def test_incomplete_file_is_refused(tmp_path):
    state = torch.load(PARITY / "depth_ft_weights.pt", weights_only=True)["state_dict"]
    del state["encoder.1.mlp.fc2.bias"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(mmtk.MmtkError, match=r"lacks 1 tensor\(s\) of the model it describes, or holds them in other "
                                             r"shapes \(encoder.blocks.1.mlp"):
        mmtk.create_model(pretrained=path)
    # recorded arguments that contradict the tensors (a hand-edited checkpoint): refused, not half loaded
    model = mmtk.create_model("multimae-tiny", dim=64, depth=1, num_heads=1, image_size=32, inputs=("rgb", "semseg"),
                              outputs=("rgb",), num_classes=7, decoder_depth=0)
    torch.save({"model_name": "multimae-tiny", "model_args": dict(dim=64, depth=1, num_heads=1, image_size=32,
                inputs=["rgb", "semseg"], outputs=["rgb"], num_classes=40, decoder_depth=0), "model": model.state_dict()},
               tmp_path / "edited.pt")
    with pytest.raises(mmtk.MmtkError, match=r"holds them in other shapes \(encoder.tokenizers.semseg.class_emb.weight\)"):
        mmtk.create_model(pretrained=tmp_path / "edited.pt")


def test_bare_mmtk_state_dict_describes_its_model(tmp_path):
    source = mmtk.create_model("multimae-tiny", dim=64, depth=3, num_heads=1, image_size=(32, 48), num_classes=9,
                               inputs=("depth", "semseg"), outputs=("semseg",), decoder_dim=32, decoder_depth=1,
                               decoder_heads=8, mlp_ratio=2.0, num_global_tokens=2)
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)
    model = mmtk.create_model(pretrained=path, verbose=False)
    for key in ("dim", "depth", "num_heads", "image_size", "num_classes", "inputs", "outputs", "decoder_dim",
                "decoder_depth", "mlp_ratio", "num_global_tokens"):
        assert getattr(model.config, key) == getattr(source.config, key), key
    assert model.load_report.missing == [] and model.load_report.unused == []
