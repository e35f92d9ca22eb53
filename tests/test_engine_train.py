"""Training and evaluation end to end on the real sample frames with tiny models (in-process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine_helpers import (RECIPES, TINY, TINY_DEPTH, TINY_SEMSEG, one_thread, run_cli, sample_h5,  # noqa: F401
                            sync_h5)
from mmtk.config import load_recipe
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
from mmtk.train.engine import read_metrics
from mmtk.errors import MmtkError
from mmtk.evaluation.evaluate import evaluate
from mmtk.evaluation.protocols import eigen_crop
from mmtk.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def _mean(records, key, steps):
    values = [r[key] for r in records if r["step"] in steps]
    assert len(values) == len(steps), f"the run logged {len(values)} of steps {steps}"
    return sum(values) / len(values)


def test_pretraining_lowers_every_task_loss(sample_h5, tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", TINY + [
        "optim.batch_size=4", "data.repeat=4", "optim.epochs=200", "optim.warmup_epochs=10", "optim.lr=2e-3",
        "train.ckpt_every=1000", "model.num_visible=12"], data_path=str(sample_h5))
    result = run_training(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert result.steps == 200 and [r["step"] for r in records] == list(range(1, 201))
    first, last = range(1, 21), range(181, 201)
    for task in ("rgb", "norm_rgb", "depth", "semseg"):
        before, after = _mean(records, task, first), _mean(records, task, last)
        assert after < 0.9 * before, f"{task}: mean loss {before:.3f} over steps 1-20 vs {after:.3f} over 181-200"
    # the run folder holds the resolved recipe and a weights_only checkpoint that rebuilds the model
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == recipe
    assert (tmp_path / "run" / "last.pt").samefile(checkpoint_paths(tmp_path / "run")[-1])
    state = load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])
    assert state["step"] == 200 and state["kind"] == "pretrain" and state["model_args"]["num_visible"] == 12
    # cross-modal evaluation of the pretrained model: depth and semseg with every target token hidden
    rows, frames = evaluate(checkpoint_paths(tmp_path / "run")[-1], sample_h5, ["rgb", "depth", "rgb,depth"])
    assert frames == 1
    by_key = {(r.inputs, r.task): r for r in rows}
    assert by_key[("depth",), "depth"].note  # depth cannot be predicted from depth once it is hidden
    assert 0 <= by_key[("rgb",), "depth"].metrics["delta1"] <= 1
    # standard protocol: scored at the file's 120 x 160 inside the Eigen crop; the sample frame has no depth holes
    assert by_key[("rgb",), "depth"].metrics["pixels"] == int(eigen_crop((120, 160)).sum())
    assert 0 <= by_key[("depth",), "semseg"].metrics["miou"] <= 1


@pytest.mark.parametrize("inputs", ["rgb", "depth", "rgb,depth"])
def test_semseg_finetuning_with_each_input_subset(sample_h5, tmp_path, inputs):
    main = "depth" if inputs == "depth" else "rgb"
    recipe = load_recipe(RECIPES / "tiny_finetune_semseg.yaml", TINY_SEMSEG + [
        f"model.inputs={inputs}", f"model.main_inputs={main}", "optim.batch_size=4", "data.repeat=4",
        "optim.epochs=60", "optim.warmup_epochs=2", "train.ckpt_every=1000"], data_path=str(sample_h5))
    result = run_training(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert _mean(records, "semseg", range(51, 61)) < 0.7 * _mean(records, "semseg", range(1, 11))
    rows, frames = evaluate(result.last_checkpoint, sample_h5, [inputs])
    (row,) = rows
    labelled = int((torch.from_numpy(_labels(sample_h5)) != 0).sum())
    assert frames == 1 and row.inputs == tuple(inputs.split(",")) and row.task == "semseg"
    assert row.metrics["pixels"] == labelled  # every labelled pixel of the full-resolution test frame, once
    assert 0 < row.metrics["pixel_acc"] <= 1 and 0 < row.metrics["miou"] <= row.metrics["pixel_acc"] + 1e-9


def _labels(path):
    """Labels of the test frame at the file's size (where the standard protocol scores), 0 = unlabeled."""
    from mmtk.data import H5Dataset

    full = H5Dataset(path, split="test", modalities=("semseg",), image_size=None)[0]["semseg_full"]
    return (full + 1).where(full != 255, torch.zeros((), dtype=full.dtype)).numpy()


def test_depth_finetuning_and_missing_sensor_rows(sample_h5, tmp_path):
    recipe = load_recipe(RECIPES / "tiny_finetune_depth.yaml", TINY_DEPTH + [
        "model.inputs=rgb,depth", "optim.batch_size=4", "data.repeat=4", "optim.epochs=60",
        "optim.warmup_epochs=2", "train.ckpt_every=1000", "train.loss=l1"], data_path=str(sample_h5))
    result = run_training(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert _mean(records, "depth", range(51, 61)) < 0.7 * _mean(records, "depth", range(1, 11))
    rows, _ = evaluate(result.last_checkpoint, sample_h5, ["rgb", "depth", "rgb,depth"], limit=1)
    assert [r.inputs for r in rows] == [("rgb",), ("depth",), ("rgb", "depth")]
    for row in rows:
        assert row.metrics["pixels"] == int(eigen_crop((120, 160)).sum())
        assert math.isfinite(row.metrics["rmse"]) and row.metrics["rmse"] > 0
    assert len({round(r.metrics["rmse"], 6) for r in rows}) == 3  # removing a sensor changes the prediction


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sample_h5, tmp_path, monkeypatch):
    from mmtk.train.engine import MetricsLog, train
    from mmtk.train.settings import train_settings
    from mmtk.train.run import finetune_loss_fn
    from mmtk.data.contents import open_dataset

    import mmtk

    recipe = load_recipe(RECIPES / "tiny_finetune_semseg.yaml", TINY_SEMSEG + [
        "optim.batch_size=4", "optim.epochs=10", "optim.warmup_epochs=1", "train.ckpt_every=2"],
        data_path=str(sample_h5))
    model = mmtk.create_model("multimae-tiny", inputs=("rgb", "depth"), head="convnext", task="semseg",
                              image_size=(64, 64), dim=64, depth=2, num_heads=2, convnext_dim=64, convnext_depth=1)
    real_loss, calls = finetune_loss_fn(recipe), []

    def loss_that_explodes(m, batch):  # the real loss, made infinite on the 3rd step (as a diverging run)
        loss, losses = real_loss(m, batch)
        calls.extend([1] if m.training else [])  # not the memory check's forward passes (eval mode)
        if len(calls) == 3:
            loss = loss * float("inf")
        return loss, losses

    closed, close = [], MetricsLog.close
    monkeypatch.setattr(MetricsLog, "close", lambda log: closed.append(log) or close(log))
    data = open_dataset(sample_h5, "train", ("rgb", "depth", "semseg"), (64, 64), augment=True)
    with pytest.raises(MmtkError) as info:
        train(train_settings(recipe), tmp_path / "run", model, data, loss_that_explodes)
    assert len(closed) == 1  # the metrics log (and TensorBoard's writer, which buffers) is flushed on the way out
    message = str(info.value)
    assert "non-finite at step 3" in message and "step_00000002.pt" in message and "\n" not in message
    assert [p.name for p in checkpoint_paths(tmp_path / "run")] == ["step_00000002.pt"]
    assert load_checkpoint(checkpoint_paths(tmp_path / "run")[0])["step"] == 2
    assert all(math.isfinite(v) for v in load_checkpoint(checkpoint_paths(tmp_path / "run")[0])["model"]
               ["encoder.blocks.0.attn.qkv.weight"].flatten().tolist())


def test_recipe_asking_for_a_modality_the_file_lacks(sync_h5, tmp_path):
    code, output = run_cli("pretrain", RECIPES / "tiny.yaml", "--data", sync_h5, "--out", tmp_path / "run",
                           "--set", "data.train_split=all")
    assert code == 2
    assert "needs 'semseg'" in output and "rgb, depth" in output


def test_cli_finetune_then_eval_table_json_and_pictures(sample_h5, tmp_path):
    # data.repeat=1: 1 frame < a batch of 4, so the engine repeats the frame 4 times per epoch (1 step)
    args = [f"--set={s}" for s in TINY_SEMSEG + ["optim.batch_size=4", "optim.epochs=2", "optim.warmup_epochs=1",
                                                 "data.repeat=1"]]
    code, output = run_cli("finetune", RECIPES / "tiny_finetune_semseg.yaml", "--data", sample_h5,
                           "--out", tmp_path / "ft", *args)
    assert code == 0, output
    assert [r["step"] for r in read_metrics(tmp_path / "ft")] == [1, 2]
    ckpt = checkpoint_paths(tmp_path / "ft")[-1]
    code, output = run_cli("finetune", RECIPES / "tiny_finetune_semseg.yaml", "--data", sample_h5,
                           "--out", tmp_path / "ft", *args)
    assert code == 2 and "--resume" in output  # never mixes a new run into an old folder
    code, output = run_cli("eval", "--checkpoint", ckpt, "--data", sample_h5, "--inputs", "rgb", "--inputs", "depth",
                           "--inputs", "rgb,depth", "--json", tmp_path / "eval.json",
                           "--save-predictions", tmp_path / "pictures")
    assert code == 0, output
    assert "1 frame evaluated" in output and "full split" in output
    for combo in ("rgb", "depth", "rgb,depth"):
        assert f"│ {combo} " in output
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert payload["frames"] == 1 and [r["inputs"] for r in payload["results"]] == [["rgb"], ["depth"], ["rgb", "depth"]]
    assert all(0 <= r["metrics"]["miou"] <= 1 for r in payload["results"])
    pictures = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert pictures == ["frame00000_depth_semseg.png", "frame00000_rgb+depth_semseg.png", "frame00000_rgb_semseg.png"]
    from PIL import Image

    image = Image.open(tmp_path / "pictures" / "frame00000_rgb+depth_semseg.png")
    assert image.width >= 4 * 64 and image.height > 64  # rgb | depth | prediction | truth, plus the legend
    code, output = run_cli("eval", "--checkpoint", ckpt, "--data", sample_h5, "--inputs", "semseg")
    assert code == 2 and "the model takes rgb, depth" in output
    code, output = run_cli("eval", "--checkpoint", ckpt, "--inputs", "rgb")  # the file the run trained on
    assert code == 0 and f"data: {sample_h5} (the file the run trained on)" in output, output
    code, output = run_cli("eval", "--checkpoint", ckpt, "--batch-size", "0")
    assert code == 2 and "--batch-size must be > 0, got 0" in output
    # the finetuned weights in the official layout: the head is named by the task stored in the checkpoint
    code, output = run_cli("weights", ckpt, "--to-official", tmp_path / "official" / "semseg.pt")
    assert code == 0, output
    official = torch.load(tmp_path / "official" / "semseg.pt", weights_only=True)["model"]
    assert "output_adapters.semseg.final_layer.weight" in official
    assert all(not k.startswith("head") and ".None." not in k for k in official)


def test_loader_workers_do_not_change_the_run(sample_h5, tmp_path):
    """Augmentation is seeded per (epoch, frame): 0 or 2 loader workers give the same losses."""
    losses = []
    for workers in (0, 2):
        recipe = load_recipe(RECIPES / "tiny.yaml", TINY + [
            "optim.batch_size=4", "data.repeat=8", "optim.epochs=3", "optim.warmup_epochs=1", "model.num_visible=12",
            f"data.num_workers={workers}"], data_path=str(sample_h5))
        run_training(recipe, tmp_path / f"w{workers}")
        losses.append([(r["step"], r["loss"]) for r in read_metrics(tmp_path / f"w{workers}")])
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_gradient_accumulation_matches_the_full_batch(sample_h5, tmp_path):
    """A global batch of 4 as 1 micro-step of 4 or 4 micro-steps of 1 gives the same run (finetuning is deterministic)."""
    runs = []
    for micro in (4, 1):
        recipe = load_recipe(RECIPES / "tiny_finetune_semseg.yaml", TINY_SEMSEG + [
            "optim.batch_size=4", f"optim.micro_batch={micro}", "optim.epochs=2", "optim.warmup_epochs=1"],
            data_path=str(sample_h5))
        run_training(recipe, tmp_path / f"micro{micro}")
        runs.append(read_metrics(tmp_path / f"micro{micro}"))
    assert [r["step"] for r in runs[0]] == [r["step"] for r in runs[1]] == [1, 2, 3, 4]
    for full, accumulated in zip(*runs):
        assert accumulated["loss"] == pytest.approx(full["loss"], rel=1e-4)


def test_pretraining_with_a_registered_derived_modality(sync_h5, tmp_path):
    """xyz (computed from depth + intrinsics by its adapter) trains like any stored modality; depth holes are skipped."""
    recipe = load_recipe(RECIPES / "tiny.yaml", TINY + [
        "data.train_split=all", "model.inputs=rgb,depth,xyz", "model.outputs=rgb,depth,xyz", "optim.batch_size=3",
        "data.repeat=2", "optim.epochs=10", "optim.warmup_epochs=1", "model.num_visible=12"],
        data_path=str(sync_h5))
    run_training(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert len(records) == 20 and all(math.isfinite(r["xyz"]) and r["xyz"] > 0 for r in records)
    assert _mean(records, "xyz", range(16, 21)) < _mean(records, "xyz", range(1, 6))
