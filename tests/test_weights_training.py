"""`mmtk finetune --init` takes the model the init file describes, and a resumed run rebuilds that model
(not only what the recipe says)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import RECIPES, TINY_SEMSEG, one_thread, run_cli, sample_h5  # noqa: F401
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_finetune_from_a_class_token_free_vit_then_resume(sample_h5, tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, embed_dim=64, depth=2, num_heads=2,
                            class_token=False, global_pool="avg")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.weights"))
    sets = [f"--set={s}" for s in TINY_SEMSEG + ["optim.batch_size=4", "optim.epochs=2", "optim.warmup_epochs=1",
                                                 "data.repeat=1", "train.ckpt_every=1"]]
    command = ["finetune", RECIPES / "tiny_finetune_semseg.yaml", "--data", sample_h5, "--out", tmp_path / "run",
               "--init", tmp_path / "vit.weights", *sets]
    code, output = run_cli(*command, "--set=train.max_steps=1")
    assert code == 0, output
    assert "format timm" in output and "class-token-free ViT: no global token" in output
    assert "start fresh (changed by the arguments): encoder.tokenizers.depth, head" in output
    first = load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])
    assert first["model"]["encoder.global_tokens"].shape == (1, 0, 64)
    code, output = run_cli(*command, "--resume")
    assert code == 0, output
    assert [int(p.stem.split("_")[1]) for p in checkpoint_paths(tmp_path / "run")][-1] == 2
    code, output = run_cli("eval", "--checkpoint", checkpoint_paths(tmp_path / "run")[-1], "--data", sample_h5,
                           "--inputs", "rgb")
    assert code == 0, output
