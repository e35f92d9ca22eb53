"""A run killed with SIGKILL resumes and reproduces the uninterrupted run's loss sequence exactly."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import pytest

from engine_helpers import CLI, ONE_THREAD_ENV, RECIPES, TINY, one_thread, run_cli, sample_h5  # noqa: F401
from helpers import needs_cuda
from mmtk.train.checkpoint import checkpoint_paths
from mmtk.train.engine import read_metrics

LOSSES = ("loss", "rgb", "norm_rgb", "depth", "semseg", "lr")


def _command(data, out, *extra):
    # 2 steps per epoch; a checkpoint every 3 steps lands mid-epoch, so resuming must skip half an epoch.
    sets = TINY + ["optim.batch_size=4", "data.repeat=8", "optim.epochs=20", "optim.warmup_epochs=1",
                   "train.ckpt_every=3", "train.deterministic=true", "model.num_visible=12"]
    return CLI + ["pretrain", str(RECIPES / "tiny.yaml"), "--data", str(data), "--out", str(out),
                  *[f"--set={s}" for s in sets], *extra]


def _losses(run_dir):
    return [(r["step"], *[r[k] for k in LOSSES]) for r in read_metrics(run_dir)]


def test_sigkill_then_resume_reproduces_uninterrupted_run(sample_h5, tmp_path):
    subprocess.run(_command(sample_h5, tmp_path / "full"), check=True, capture_output=True, timeout=600,
                   env=ONE_THREAD_ENV)
    expected = _losses(tmp_path / "full")
    assert [row[0] for row in expected] == list(range(1, 41))

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(sample_h5, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ONE_THREAD_ENV)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        steps = [r["step"] for r in read_metrics(killed)] if (killed / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 5:  # past the step-3 checkpoint, well before the end (step 40)
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 3 <= int(checkpoint_paths(killed)[-1].stem.split("_")[1]) < 40

    resumed = subprocess.run(_command(sample_h5, killed, "--resume"), capture_output=True, text=True, timeout=600,
                             env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(killed) == expected  # bit-identical losses and lr at every step, no duplicates


def test_resume_reads_its_checkpoint_once_and_lets_it_go(sample_h5, tmp_path, monkeypatch, one_thread):
    """The model is rebuilt from the newest checkpoint and the optimizer, scheduler and RNGs restored from it: one
    read of the file (`torch.load` calls counted), not one for the model and another for the rest. Once restored,
    the read state is let go: when the loop starts, none of its weight tensors is alive beside the model's."""
    import gc
    import weakref

    import torch

    import mmtk.train.checkpoint as checkpoint
    from mmtk.train.batches import Batches
    from mmtk.config import load_recipe
    from mmtk.train.run import run_training

    sets = TINY + ["optim.batch_size=4", "data.repeat=8", "optim.epochs=20", "train.ckpt_every=3",
                   "model.num_visible=12", "train.device=cpu"]
    first = run_training(load_recipe(RECIPES / "tiny.yaml", sets + ["train.max_steps=3"], data_path=str(sample_h5)),
                         tmp_path / "run")
    assert first.steps == 3 and first.last_checkpoint is not None
    loads, read_weights, alive_at_start = [], [], []
    torch_load, load_checkpoint, from_step = torch.load, checkpoint.load_checkpoint, Batches.from_step

    def load_and_watch(path):
        state = load_checkpoint(path)
        read_weights.extend(weakref.ref(tensor) for tensor in state["model"].values())
        return state

    def start(self, step):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in read_weights))
        return from_step(self, step)

    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args) or torch_load(*args, **kwargs))
    monkeypatch.setattr(checkpoint, "load_checkpoint", load_and_watch)
    monkeypatch.setattr(Batches, "from_step", start)
    resumed = run_training(load_recipe(RECIPES / "tiny.yaml", sets + ["train.max_steps=4"],
                                       data_path=str(sample_h5)), tmp_path / "run", resume=True)
    assert len(loads) == 1
    assert len(read_weights) > 50 and alive_at_start == [0]
    assert resumed.steps == 4 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_resume_without_checkpoint_is_a_clear_error(sample_h5, tmp_path):
    code, output = run_cli(*_command(sample_h5, tmp_path / "empty", "--resume")[len(CLI):])
    assert code == 2
    assert "no checkpoint" in output and "start without --resume" in output


def test_resume_with_a_model_the_checkpoint_does_not_fit_is_one_line_and_writes_nothing(sample_h5, tmp_path,
                                                                                          one_thread):
    """A resume whose settings build another model (here a larger image, so other position embeddings) than the
    checkpoint holds is refused in one line naming the mismatch and the fix; the run folder is left as it was
    (its recipe.yaml still describes the checkpoints)."""
    run = tmp_path / "run"
    fast = ["--set=train.max_steps=2", "--set=train.device=cpu"]
    code, output = run_cli(*_command(sample_h5, run, *fast)[len(CLI):])
    assert code == 0, output
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    code, output = run_cli(*_command(sample_h5, run, *fast, "--set=data.image_size=[96,96]", "--resume")[len(CLI):])
    assert code == 2
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: --resume: ") and "step_00000002.pt does not fit this run" in error
    assert "size mismatch for " in error and "recipe.yaml" in error
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_resume_with_other_optimisation_settings_is_one_line_and_writes_nothing(sample_h5, tmp_path, one_thread):
    """The checkpoint's optimizer and schedule state would override a changed lr or layer decay while recipe.yaml
    claimed the new value: refused in one line naming each change; how a step is cut (micro_batch) may change."""
    run = tmp_path / "run"
    fast = ["--set=train.max_steps=2", "--set=train.device=cpu"]
    assert run_cli(*_command(sample_h5, run, *fast)[len(CLI):])[0] == 0
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    code, output = run_cli(*_command(sample_h5, run, *fast, "--set=optim.layer_decay=0.75", "--set=optim.lr=0.123",
                                     "--resume")[len(CLI):])
    error = output.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: --resume: optim.lr ")
    assert "-> 0.123, optim.layer_decay 1.0 -> 0.75" in error
    assert "recipe.yaml" in error and "another --out folder" in error
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    code, output = run_cli(*_command(sample_h5, run, "--set=train.max_steps=3", "--set=train.device=cpu",
                                     "--set=optim.micro_batch=1", "--resume")[len(CLI):])
    assert code == 0 and "resumed from step 2" in output, output


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_run_stopped_then_resumed_matches_uninterrupted(sample_h5, tmp_path, precision):
    """On the GPU (deterministic algorithms): stop at step 7 (checkpoint at 6), resume, same 12 steps."""
    def command(out, *extra):
        return _command(sample_h5, out, "--set=train.device=cuda", f"--set=train.precision={precision}",
                        "--set=optim.epochs=6", *extra)

    subprocess.run(command(tmp_path / "full"), check=True, capture_output=True, timeout=600)
    expected = _losses(tmp_path / "full")
    assert [row[0] for row in expected] == list(range(1, 13))
    assert all(math.isfinite(v) for row in expected for v in row[1:])
    subprocess.run(command(tmp_path / "cut", "--set=train.max_steps=7"), check=True, capture_output=True,
                   timeout=600)
    (tmp_path / "cut" / "checkpoints" / "step_00000007.pt").unlink()  # as if killed after step 7's log line
    resumed = subprocess.run(command(tmp_path / "cut", "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "cut") == expected


def test_auto_micro_batch_resumes_with_the_micro_batch_the_run_used(sample_h5, tmp_path, monkeypatch, one_thread):
    """Masks are drawn per micro-batch: a resumed ``micro_batch: auto`` run keeps the size its checkpoint
    records (here 2 of a batch of 4, chosen under little memory) even where more memory would now fit 4, so it
    repeats the uninterrupted run's losses exactly."""
    from mmtk.train import memory
    from mmtk.config import load_recipe
    from mmtk.train.run import run_training

    sets = TINY + ["optim.batch_size=4", "optim.micro_batch=auto", "data.repeat=8", "optim.epochs=20",
                   "train.ckpt_every=2", "model.num_visible=12", "train.device=cpu"]
    chosen = []
    plan = memory.plan_memory

    def plan_with(room: float):
        def planned(model, loss, train_set, feed, precision, info, resumed_micro=None):
            estimate = memory.estimate_memory(model, loss, train_set, info.device, precision, feed.seed)
            monkeypatch.setattr(memory, "available_memory",
                                lambda device: int(estimate.total(2, 0) + room * (estimate.total(4, 0)
                                                                                  - estimate.total(2, 0))) * 10 // 9)
            resumed = {"resumed_micro": resumed_micro} if resumed_micro is not None else {}
            chosen.append(plan(model, loss, train_set, feed, precision, info, **resumed)[0])
            return chosen[-1], 0
        return planned

    def run(out, steps, resume=False):
        recipe = load_recipe(RECIPES / "tiny.yaml", sets + [f"train.max_steps={steps}"], data_path=str(sample_h5))
        return run_training(recipe, out, resume=resume)

    monkeypatch.setattr("mmtk.train.engine.plan_memory", plan_with(0.5))  # room for 2 images per micro-step, not 4
    run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    monkeypatch.setattr("mmtk.train.engine.plan_memory", plan_with(2.0))  # now 4 would fit
    run(tmp_path / "cut", 4, resume=True)
    assert chosen == [2, 2, 2]
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole] and len(whole) == 4
