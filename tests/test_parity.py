"""mmtk computes the same function as the official MultiMAE code (vectors in tests/parity/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmtk
from helpers import needs_cuda

PARITY = Path(__file__).parent / "parity"
REL_TOL = 1e-5
CONFIG = json.loads((PARITY / "models.json").read_text())
CASES = torch.load(PARITY / "cases.pt", weights_only=True)


def build(name: str) -> torch.nn.Module:
    checkpoint = torch.load(PARITY / f"{name}_weights.pt", weights_only=True)
    size = checkpoint["image_size_at_init"]
    if name.startswith("pretrain"):
        c = CONFIG["pretrain"]
        inputs = ("rgb", "semseg") if name == "pretrain_rgb_semseg_in" else c["inputs"]
        model = mmtk.create_model(
            "multimae-tiny", dim=c["dim"], depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"],
            num_classes=c["num_classes_semseg"], decoder_dim=c["decoder_dim"], decoder_depth=c["decoder_depth"],
            decoder_heads=c["decoder_heads"], num_global_tokens=c["num_global_tokens"], inputs=inputs,
            outputs=c["outputs"], image_size=size)
    elif name == "semseg_ft":
        c = CONFIG["semseg_ft"]
        model = mmtk.create_model(
            "multimae-tiny", dim=c["dim"], depth=c["depth"], num_heads=c["heads"], num_classes=c["num_classes"],
            head="convnext", task="semseg", inputs=c["inputs"], main_inputs=c["main_tasks"],
            convnext_dim=c["embed_dim"], preds_per_patch=c["preds_per_patch"], convnext_depth=c["head_depth"], image_size=size)
    else:
        c = CONFIG["depth_ft"]
        model = mmtk.create_model(
            "multimae-tiny", dim=c["dim"], depth=c["depth"], num_heads=c["heads"], head="dpt", task="depth",
            inputs=c["inputs"], hooks=c["hooks"], layer_dims=c["layer_dims"], dpt_dim=c["feature_dim"], image_size=size)
    report = mmtk.load_weights(model, checkpoint)
    assert report.format == "official"
    assert report.unused == [] and report.missing == [], report.summary()
    return model.eval()


MODELS = {name: build(name) for name in sorted({case["model"] for case in CASES})}


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().clamp_min(1e-12)
    err = ((ours - ref).abs().max() / scale).item()
    assert err < REL_TOL, f"{what}: relative error {err:.2e}"


def check_losses(losses: dict, case: dict) -> None:
    for task, ref in (case.get("losses") or {}).items():
        ours = losses[task]
        assert abs(ours.item() - ref.item()) <= REL_TOL * max(abs(ref.item()), 1e-6), f"loss {task}"


def run(name: str, inputs: dict, masks: dict | None):
    model = MODELS[name]
    with torch.no_grad():
        if name.startswith("pretrain"):
            out = model(inputs, masks=masks)
            return out.preds, out.losses
        return {model.config.task: model(inputs)}, {}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c['model']}-{i}" for i, c in enumerate(CASES)])
def test_case_matches_official(index):
    case = CASES[index]
    preds, losses = run(case["model"], case["inputs"], case.get("masks"))
    for task, ref in case["preds"].items():
        assert_close(preds[task], ref, f"pred {task}")
    check_losses(losses, case)


STACKABLE = sorted(name for name in MODELS if sum(c["model"] == name for c in CASES) > 1 and "masks" in
                   next(c for c in CASES if c["model"] == name))


@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_cases_match_per_sample(name):
    """Cases of one model stacked in one batch (different visible counts) give the per-case results."""
    cases = [c for c in CASES if c["model"] == name]
    inputs = {k: torch.cat([c["inputs"][k] for c in cases]) for k in cases[0]["inputs"]}
    masks = {k: torch.cat([c["masks"][k] for c in cases]) for k in cases[0]["masks"]}
    model = MODELS[name]
    with torch.no_grad():
        batched = model(inputs, masks=masks)
    for i, case in enumerate(cases):
        for task, ref in case["preds"].items():
            assert_close(batched.preds[task][i:i + 1], ref, f"sample {i} pred {task}")
    # Batch loss = mean over samples that have hidden pixels of the per-sample losses.
    for task in cases[0]["losses"]:
        refs = [c["losses"][task].item() for c in cases
                if task not in c["masks"] or bool(c["masks"][task if task != "norm_rgb" else "rgb"].any())]
        expected = sum(refs) / len(refs)
        assert abs(batched.losses[task].item() - expected) <= 1e-5 * max(abs(expected), 1e-6), task


@needs_cuda
def test_every_case_matches_official_on_cuda():
    """The same vectors on the GPU in fp32 (TF32 off, as the official outputs were computed without it)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, model in MODELS.items():
            model.cuda()
            for case in (c for c in CASES if c["model"] == name):
                inputs = {k: v.cuda() for k, v in case["inputs"].items()}
                masks = {k: v.cuda() for k, v in case["masks"].items()} if "masks" in case else None
                preds, losses = run(name, inputs, masks)
                for task, ref in case["preds"].items():
                    assert_close(preds[task].cpu(), ref, f"{name} pred {task} on cuda")
                check_losses(losses, case)
            model.cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
