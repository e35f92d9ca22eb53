"""Core model behaviour: shapes, masking budget, losses, gradients, determinism, precision."""

from __future__ import annotations

import pytest
import torch

import mmtk
from helpers import DEVICES, TINY, random_batch, tiny_model


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (480, 640)])
@pytest.mark.parametrize("name", ["multimae-tiny", "multimae-small"])
def test_pretraining_shapes_any_size(name, size):
    overrides = dict(TINY) if name == "multimae-tiny" else dict(depth=1, num_classes=5, decoder_depth=1)
    model = mmtk.create_model(name, **overrides, image_size=64, num_visible=10)
    batch = random_batch(2, size)
    out = model(batch)
    h, w = size
    assert out.preds["rgb"].shape == (2, 3, h, w)
    assert out.preds["norm_rgb"].shape == (2, 3, h, w)
    assert out.preds["depth"].shape == (2, 1, h, w)
    assert out.preds["semseg"].shape == (2, 5, h // 4, w // 4)
    n = (h // 16) * (w // 16)
    assert {k: tuple(v.shape) for k, v in out.masks.items()} == {k: (2, n) for k in ("rgb", "depth", "semseg")}
    assert set(out.losses) == {"rgb", "norm_rgb", "depth", "semseg"}
    assert torch.isfinite(out.loss)


def test_visible_budget_is_exact_per_sample():
    torch.manual_seed(0)
    model = tiny_model(num_visible=20)
    out = model(random_batch(16))
    visible = sum((~m).sum(dim=1) for m in out.masks.values())
    assert visible.tolist() == [20] * 16


def test_given_masks_replace_sampling_for_any_batch_size():
    model = tiny_model().eval()
    batch = random_batch(3)
    masks = {k: torch.ones(3, 16, dtype=torch.bool) for k in ("rgb", "depth", "semseg")}
    masks["rgb"][0, :5] = False  # sample 0: 5 rgb tokens visible
    masks["depth"][1, 3:4] = False  # sample 1: 1 depth token visible
    masks["semseg"][2, :9] = False  # sample 2: 9 semseg tokens visible
    with torch.no_grad():
        out = model(batch, masks=masks)
        for i in range(3):
            single = model({k: v[i:i + 1] for k, v in batch.items()}, masks={k: v[i:i + 1] for k, v in masks.items()})
            for task in single.preds:
                torch.testing.assert_close(out.preds[task][i:i + 1], single.preds[task], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(out.masks[k], masks[k]) for k in masks)


def test_loss_ignores_targets_of_visible_patches():
    model = tiny_model().eval()
    batch = random_batch(2)
    masks = {k: torch.rand(2, 16, generator=torch.Generator().manual_seed(i)) < 0.5
             for i, k in enumerate(("rgb", "depth", "semseg"))}
    with torch.no_grad():
        out = model(batch, masks=masks)
    visible = {k: mmtk.model.multimae.hidden_pixels(~m, (4, 4), batch[k] if k != "semseg" else batch[k][:, None])
               for k, m in masks.items()}
    changed = {
        "rgb": torch.where(visible["rgb"][:, None], batch["rgb"] + 10.0, batch["rgb"]),
        "depth": torch.where(visible["depth"][:, None], batch["depth"] - 7.0, batch["depth"]),
        "semseg": torch.where(visible["semseg"], (batch["semseg"] + 1) % 5, batch["semseg"]),
    }
    with torch.no_grad():
        same = model.forward_loss(out.preds, changed, masks, {}, (4, 4))
    for task, loss in out.losses.items():  # norm_rgb too: its normalisation is per patch
        torch.testing.assert_close(same[task], loss)
    # ...while changing a hidden patch does change the loss.
    moved = dict(batch, rgb=torch.where(visible["rgb"][:, None], batch["rgb"], batch["rgb"] + 1.0))
    with torch.no_grad():
        assert not torch.allclose(model.forward_loss(out.preds, moved, masks, {}, (4, 4))["rgb"], out.losses["rgb"])


def test_invalid_depth_pixels_never_contribute():
    model = tiny_model().eval()
    batch = random_batch(2)
    valid = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    valid[:, :, :32] = False  # top half: sensor holes
    masks = {k: torch.ones(2, 16, dtype=torch.bool) for k in ("rgb", "depth", "semseg")}
    masks["rgb"][:, :4] = False
    with torch.no_grad():
        out = model(batch, masks=masks, valid={"depth": valid})
        garbage = dict(batch, depth=torch.where(valid, batch["depth"], torch.full_like(batch["depth"], 1e6)))
        again = model.forward_loss(out.preds, garbage, masks, {"depth": valid}, (4, 4))
    torch.testing.assert_close(again["depth"], out.losses["depth"])
    assert out.losses["depth"] < 1e3


def test_depth_holes_can_be_kept_hidden():
    torch.manual_seed(0)
    model = tiny_model(min_valid_fraction=0.5, num_visible=30)
    valid = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    valid[:, :, :, :32] = False  # left half of every image is a hole: depth tokens in columns 0-1
    out = model(random_batch(4), valid={"depth": valid})
    depth_visible = (~out.masks["depth"]).reshape(4, 4, 4)
    assert not depth_visible[:, :, :2].any()
    visible = sum((~m).sum(dim=1) for m in out.masks.values())
    assert visible.tolist() == [30] * 4  # the budget moves to the other modalities


def test_gradients_reach_every_adapter():
    torch.manual_seed(0)
    model = tiny_model(num_visible=30)
    model(random_batch(4)).loss.backward()
    for prefix in ["encoder.tokenizers.rgb.proj", "encoder.tokenizers.depth.proj", "encoder.tokenizers.semseg.class_emb",
                   "encoder.tokenizers.semseg.proj", "encoder.global_tokens", "encoder.blocks.0",
                   "decoders.rgb.out_proj", "decoders.norm_rgb.out_proj", "decoders.depth.out_proj",
                   "decoders.semseg.out_proj", "decoders.depth.cross_attn.q", "decoders.semseg.mask_token"]:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_seeded_runs_are_identical():
    def run():
        torch.manual_seed(123)
        model = tiny_model()
        out = model(random_batch(4))
        return out.loss.item(), {k: v.clone() for k, v in out.masks.items()}

    (loss_a, masks_a), (loss_b, masks_b) = run(), run()
    assert loss_a == loss_b
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_cross_modal_prediction_without_an_input():
    """A task whose modality is not given is predicted from the others (queries from the mask token)."""
    model = tiny_model().eval()
    batch = random_batch(2)
    with torch.no_grad():
        out = model({"rgb": batch["rgb"], "depth": batch["depth"]})
    assert out.preds["semseg"].shape == (2, 5, 16, 16)
    assert "semseg" not in out.losses and set(out.masks) == {"rgb", "depth"}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_semseg_decoder_in_fp32(device):
    torch.manual_seed(0)
    model = tiny_model().to(device)
    batch = {k: v.to(device) for k, v in random_batch(2).items()}
    with torch.no_grad():
        reference = model(batch)  # fp32, its masks reused below
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(batch, masks=reference.masks)
    assert out.preds["rgb"].dtype == torch.bfloat16
    assert out.preds["semseg"].dtype == torch.float32
    for task, loss in reference.losses.items():  # bf16 keeps ~3 significant digits
        assert out.losses[task].item() == pytest.approx(loss.item(), rel=0.03), task
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_base_model_has_official_parameter_count():
    model = mmtk.create_model("multimae-base", num_classes=133)  # COCO classes, as the released model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 97_917_072


def test_finetuning_mode_returns_tokens_and_blocks():
    model = tiny_model()
    features = model.forward_features({"rgb": torch.randn(2, 3, 64, 96)}, return_all_blocks=True)
    assert features.tokens.shape == (2, 24 + 1, 64)
    assert len(features.blocks) == 2 and torch.equal(features.blocks[-1], features.tokens)


@pytest.mark.parametrize("head,task,channels", [("convnext", "semseg", 5), ("dpt", "depth", 1)])
@pytest.mark.parametrize("inputs", [("rgb",), ("depth",), ("rgb", "depth")])
def test_dense_model_any_input_subset(head, task, channels, inputs):
    model = mmtk.create_model(
        "multimae-tiny", dim=64, depth=4, num_heads=4, num_classes=5, head=head, task=task, inputs=("rgb", "depth"),
        hooks=(0, 1, 2, 3), layer_dims=(16, 32, 64, 64), convnext_dim=256, dpt_dim=32, image_size=64)
    batch = random_batch(2, (64, 96))
    pred = model({k: batch[k] for k in inputs})
    assert pred.shape == (2, channels, 64, 96)
    pred.float().mean().backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_unknown_model_option_is_a_clear_error():
    with pytest.raises(mmtk.MmtkError, match="unknown model option"):
        mmtk.create_model("multimae-tiny", dimension=3)
    with pytest.raises(mmtk.MmtkError, match="not divisible by the patch size"):
        mmtk.create_model("multimae-tiny", image_size=(100, 64))
    with pytest.raises(mmtk.MmtkError, match="an input of 72x64 px does not split into 16x16 patches"):
        tiny_model()({"rgb": torch.randn(1, 3, 72, 64)})


def test_patch_embedding_equals_the_strided_convolution():
    """Tokens come from one matmul over flattened patches, with the official conv-shaped weights."""
    tokenizer = tiny_model().encoder.tokenizers["rgb"]
    x = torch.randn(2, 3, 64, 96)
    conv = torch.nn.functional.conv2d(x, tokenizer.proj.weight, tokenizer.proj.bias, stride=16)  # [B, D, 4, 6]
    expected = conv.flatten(2).transpose(1, 2) + tokenizer(torch.zeros_like(x)) - tokenizer.proj.bias
    torch.testing.assert_close(tokenizer(x), expected, rtol=1e-5, atol=1e-5)


def test_cpu_bf16_attention_matches_sdpa():
    from mmtk.model.layers import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 16, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., 15:] = False  # padded keys of sample 1
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, atol=3e-2, rtol=3e-2)


def test_masked_mean_averages_samples_that_have_hidden_pixels():
    from mmtk.model.multimae import masked_mean

    loss = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]], [[100.0, 100.0]]], requires_grad=True)  # [B=3, 1, 2]
    weight = torch.tensor([[[True, True]], [[True, False]], [[False, False]]])
    value = masked_mean(loss, weight)
    assert value.item() == pytest.approx((2.0 + 5.0) / 2)  # sample 3 has none: left out, not counted as 0
    value.backward()
    assert loss.grad[2].abs().sum() == 0
    nothing = masked_mean(loss, torch.zeros_like(weight))
    assert nothing.item() == 0 and nothing.requires_grad  # still part of the graph
