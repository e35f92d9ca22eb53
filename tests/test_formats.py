"""Checkpoint import/export: official MultiMAE layout, timm ViT weights, safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import mmtk
from mmtk.model.layers import resize_pos_embed
from helpers import TINY

LISTINGS = Path(__file__).parent / "parity"

OFFICIAL_MODELS = {
    "pretrain": dict(num_classes=133),
    "semseg": dict(head="convnext", task="semseg", inputs=("rgb", "depth"), num_classes=40, image_size=640),
    "depth": dict(head="dpt", task="depth", inputs=("rgb",), image_size=256),
}


@pytest.mark.parametrize("kind", sorted(OFFICIAL_MODELS))
def test_official_layout_round_trips(kind):
    listing = json.loads((LISTINGS / f"multimae_official_{kind}_keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    official = {e["name"]: torch.randn(e["shape"], generator=gen) for e in listing if e["kind"] != "parameter_alias"}
    for entry in listing:  # an alias is the same tensor registered under a second name (DPT heads)
        if entry["kind"] == "parameter_alias":
            official[entry["name"]] = official[_aliased(entry["name"])]
    model = mmtk.create_model("multimae-base", **OFFICIAL_MODELS[kind])
    report = mmtk.load_weights(model, {"model": official})
    assert report.format == "official"
    assert report.unused == [] and report.missing == [] and report.resized == []
    exported = mmtk.export_official(model)
    assert set(exported) == set(official)
    for name, tensor in official.items():
        assert torch.equal(exported[name], tensor), name


def _aliased(alias: str) -> str:
    """act_postprocess.i.* is act_{i+1}_postprocess.*; scratch.layer_rn.i.* is scratch.layer{i+1}_rn.*."""
    alias = re.sub(r"act_postprocess\.(\d)\.", lambda m: f"act_{int(m[1]) + 1}_postprocess.", alias)
    return re.sub(r"layer_rn\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}_rn.", alias)


def test_timm_vit_weights_load_into_the_encoder():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    model = mmtk.create_model("multimae-tiny", image_size=224, inputs=("rgb",), outputs=("rgb",))
    report = mmtk.load_weights(model, {"model": vit.state_dict()})
    assert report.format == "timm"
    assert any(name.startswith("head") for name in report.unused)  # classifier reported, not silently dropped
    assert torch.equal(model.encoder.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    assert torch.equal(model.encoder.tokenizers["rgb"].proj.weight, vit.patch_embed.proj.weight)
    assert torch.equal(model.encoder.global_tokens, vit.cls_token + vit.pos_embed[:, :1])  # with its position
    assert not any(name.startswith("encoder.blocks") for name in report.missing)


def test_positional_embeddings_resize_on_load(tmp_path):
    small = mmtk.create_model("multimae-tiny", **TINY, image_size=64)
    path = tmp_path / "small.pt"
    torch.save({"model": small.state_dict()}, path)
    large = mmtk.create_model("multimae-tiny", **TINY, image_size=128, pretrained=path, verbose=False)
    assert "encoder.tokenizers.rgb.pos_emb" in large.load_report.resized
    assert large.encoder.tokenizers["rgb"].pos_emb.shape[-2:] == (8, 8)
    assert large.load_report.unused == []
    # each grid is resized as the small model resizes it at run time (bicubic rgb, bilinear semseg and decoders)
    for name in ("encoder.tokenizers.rgb", "encoder.tokenizers.semseg", "decoders.depth"):
        source, loaded = small.get_submodule(name), large.get_submodule(name)
        expected = resize_pos_embed(source.pos_emb, (8, 8), source.pos_mode)
        torch.testing.assert_close(loaded.pos_emb, expected, rtol=0, atol=0)


def test_mismatched_class_count_is_reported_not_loaded(tmp_path):
    source = mmtk.create_model("multimae-tiny", **{**TINY, "num_classes": 7}, image_size=64)
    path = tmp_path / "c7.pt"
    torch.save({"model": source.state_dict()}, path)
    target = mmtk.create_model("multimae-tiny", **TINY, image_size=64, pretrained=path, verbose=False)
    assert any("class_emb" in name for name in target.load_report.unused)
    assert torch.equal(target.encoder.blocks[0].attn.qkv.weight, source.encoder.blocks[0].attn.qkv.weight)


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("x")}, path)  # a pickled object, not plain weights
    with pytest.raises(mmtk.MmtkError, match="not a plain-weights"):
        mmtk.create_model("multimae-tiny", **TINY, image_size=64, pretrained=path)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(mmtk.MmtkError, match="does not exist"):
        mmtk.create_model("multimae-tiny", **TINY, image_size=64, pretrained=tmp_path / "nope.pt")
    broken = tmp_path / "broken.pt"
    model = mmtk.create_model("multimae-tiny", **TINY, image_size=64)
    torch.save({"model": model.state_dict()}, broken)
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated download
    with pytest.raises(mmtk.MmtkError, match="corrupt, truncated"):
        mmtk.create_model("multimae-tiny", **TINY, image_size=64, pretrained=broken)
