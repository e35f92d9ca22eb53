"""Learning-rate schedules are registered by name: one added here, from the test file, trains via optim.schedule."""

from __future__ import annotations

import math

import pytest

from engine_helpers import RECIPES, TINY, one_thread, run_cli, sample_h5  # noqa: F401
from mmtk.config import load_recipe
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
from mmtk.train.engine import read_metrics
from mmtk.train.run import run_training
from mmtk.train.schedules import LrSchedule, register_schedule


@register_schedule("halve-every-2")
def halve_every_2(step: int, run: LrSchedule) -> float:
    """A step schedule: the full lr for 2 optimizer steps, then half of it for the next 2, and so on."""
    return 0.5 ** (step // 2)


FAST = TINY + ["optim.batch_size=2", "optim.epochs=50", "optim.scale_lr=false", "optim.lr=1e-3",
               "train.max_steps=5", "model.num_visible=12", "train.device=cpu"]


def test_a_schedule_registered_in_a_test_file_sets_the_lr_of_each_step(sample_h5, tmp_path, one_thread):
    recipe = load_recipe(RECIPES / "tiny.yaml", FAST + ["optim.schedule=halve-every-2"], data_path=str(sample_h5))
    result = run_training(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert result.steps == 5 and [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # the lr each optimizer step used (metrics.jsonl records it per logged step)
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4], rel=1e-12)


def test_the_default_schedule_is_warm_up_then_cosine_and_checkpoints_record_it(sample_h5, tmp_path, one_thread):
    recipe = load_recipe(RECIPES / "tiny.yaml", FAST + ["optim.epochs=2", "optim.warmup_epochs=0.5"],
                         data_path=str(sample_h5))
    assert recipe.optim.schedule == "cosine"
    run_training(recipe, tmp_path / "run")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    # the checkpoint keeps the schedule as plain values (it loads with weights_only=True)
    recorded = load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["scheduler"]["lr_lambdas"][0]
    steps_per_epoch = recorded["total_steps"] // 2
    warm, total = round(0.5 * steps_per_epoch), 2 * steps_per_epoch
    assert recorded == {"name": "cosine", "warmup_steps": warm, "total_steps": total, "min_ratio": 0.0}
    assert 0 < warm < 5 <= total  # the 5 steps cover warm-up and the start of the cosine
    expected = [(step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
                for step in range(5)]  # linear warm-up from 1/warm, then cosine from 1 down to 0 at the end
    assert lrs == pytest.approx([1e-3 * value for value in expected], rel=1e-12)


def test_an_unknown_schedule_is_one_line_naming_the_registered_ones(sample_h5, tmp_path):
    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", tmp_path / "run",
                           "--set", "optim.schedule=linear")
    assert code == 2
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: optim.schedule: unknown schedule 'linear'; registered: cosine, ")
    assert "halve-every-2" in error and not (tmp_path / "run").exists()
