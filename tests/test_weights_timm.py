"""timm, DeiT and MAE ViT weights give mmtk's encoder the function of their own blocks (before the final norm),
from .pth and .safetensors files alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmtk

timm = pytest.importorskip("timm")
SIZE = 32  # a 2x2 patch grid keeps ViT-B fast


def timm_vit(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm ViT with random weights, its prefix tokens and positions large enough that dropping one shows."""
    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, img_size=SIZE, **kwargs).eval()
    with torch.no_grad():
        for token in ("cls_token", "dist_token", "reg_token"):
            if getattr(vit, token, None) is not None:
                getattr(vit, token).normal_()
        vit.pos_embed.normal_(std=0.5)
    return vit


def timm_tokens(vit: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """timm's own encoder output before the final norm: [B, prefix + N, D]."""
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
        for block in vit.blocks:
            x = block(x)
    return x


def mmtk_tokens(model: torch.nn.Module, image: torch.Tensor, prefix: int) -> torch.Tensor:
    """mmtk's encoder output reordered as timm's (mmtk appends the global tokens last)."""
    with torch.no_grad():
        x = model.forward_features({"rgb": image}).tokens
    return torch.cat([x[:, x.shape[1] - prefix:], x[:, : x.shape[1] - prefix]], dim=1)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name, dim, heads", [("vit_small_patch16_224", 384, 6), ("vit_base_patch16_224", 768, 12)])
def test_timm_vit_matches_its_own_blocks_from_pth_and_safetensors(name, dim, heads, tmp_path):
    vit = timm_vit(name)
    image = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    reference = timm_tokens(vit, image)
    for suffix in (".pth", ".safetensors"):
        path = save(vit.state_dict(), tmp_path / f"vit{suffix}")
        model = mmtk.create_model(pretrained=path, verbose=False).eval()
        config = model.config
        assert (config.dim, config.depth, config.num_heads, config.image_size) == (dim, 12, heads, (SIZE, SIZE))
        assert config.inputs == ("rgb",) and config.outputs == () and config.num_global_tokens == 1
        assert model.load_report.format == "timm" and model.load_report.missing == []
        assert sorted(model.load_report.unused) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
        err = relative_error(mmtk_tokens(model, image, 1), reference)
        assert err < 1e-5, f"{name} {suffix}: relative error {err:.1e}"
        path.unlink()


def test_deit_distillation_token_is_a_second_global_token(tmp_path):
    vit = timm_vit("deit_tiny_distilled_patch16_224")
    image = torch.randn(1, 3, SIZE, SIZE)
    model = mmtk.create_model(pretrained=save(vit.state_dict(), tmp_path / "deit.pth"), verbose=False).eval()
    assert model.config.num_global_tokens == 2
    assert any("distillation token kept" in note for note in model.load_report.notes)
    assert "head_dist.weight" in model.load_report.unused
    assert relative_error(mmtk_tokens(model, image, 2), timm_tokens(vit, image)) < 1e-5


def test_class_token_free_vit_has_no_global_token(tmp_path):
    vit = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    image = torch.randn(1, 3, SIZE, SIZE)
    model = mmtk.create_model(pretrained=save(vit.state_dict(), tmp_path / "gap.pth"), verbose=False).eval()
    assert model.config.num_global_tokens == 0
    assert relative_error(mmtk_tokens(model, image, 0), timm_tokens(vit, image)) < 1e-5


def test_mae_checkpoint_with_its_decoder(tmp_path):
    vit = timm_vit("vit_small_patch16_224", num_classes=0)
    with torch.no_grad():
        vit.pos_embed[:, 0].zero_()  # MAE's class position is zero
    state = dict(vit.state_dict())
    gen = torch.Generator().manual_seed(2)
    state.update({"mask_token": torch.randn(1, 1, 512, generator=gen),
                  "decoder_embed.weight": torch.randn(512, 384, generator=gen),
                  "decoder_pos_embed": torch.zeros(1, 5, 512),
                  "decoder_blocks.0.attn.qkv.weight": torch.randn(1536, 512, generator=gen),
                  "decoder_norm.weight": torch.ones(512), "decoder_pred.weight": torch.randn(768, 512, generator=gen)})
    model = mmtk.create_model("multimae-small", pretrained=save({"model": state}, tmp_path / "mae.pth"),
                              verbose=False).eval()
    assert {"decoder_embed.weight", "mask_token", "decoder_pred.weight"} <= set(model.load_report.unused)
    image = torch.randn(1, 3, SIZE, SIZE)
    assert relative_error(mmtk_tokens(model, image, 1), timm_tokens(vit, image)) < 1e-5


def test_vit_with_layer_scale_is_refused_in_one_line(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, init_values=1e-5)
    with pytest.raises(mmtk.MmtkError, match=r"timm parameter 'blocks\.0\.ls1\.gamma' has no counterpart") as err:
        mmtk.create_model(pretrained=save(vit.state_dict(), tmp_path / "ls.pth"))
    assert "\n" not in str(err.value)
