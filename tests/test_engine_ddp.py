"""The same command under torchrun (2 gloo processes on CPU) gives the one-process result at the same global batch;
a stop asked of one rank stops every rank at the same step."""

from __future__ import annotations

import subprocess
import sys

import torch

from engine_helpers import CLI, ONE_THREAD_ENV, RECIPES, TINY, TINY_SEMSEG, sample_h5  # noqa: F401
from mmtk.checkpoint import checkpoint_paths, load_checkpoint
from mmtk.engine import read_metrics


def _args(data, out):
    sets = TINY_SEMSEG + ["optim.batch_size=4", "data.repeat=8", "optim.epochs=3", "optim.warmup_epochs=1",
                          "train.ckpt_every=100", "train.precision=fp32"]
    return ["finetune", str(RECIPES / "tiny_finetune_semseg.yaml"), "--data", str(data), "--out", str(out),
            *[f"--set={s}" for s in sets]]


def test_two_gloo_processes_match_one_process(sample_h5, tmp_path):
    one = subprocess.run(CLI + _args(sample_h5, tmp_path / "one"), capture_output=True, text=True, timeout=600,
                         env=ONE_THREAD_ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    two = subprocess.run(torchrun + CLI + _args(sample_h5, tmp_path / "two"), capture_output=True, text=True,
                         timeout=600, env=ONE_THREAD_ENV)
    assert two.returncode == 0, two.stderr[-3000:]

    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double] == list(range(1, 7))
    for a, b in zip(single, double):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        assert a["lr"] == b["lr"]
    final_one = load_checkpoint(checkpoint_paths(tmp_path / "one")[-1])
    final_two = load_checkpoint(checkpoint_paths(tmp_path / "two")[-1])
    assert len(final_two["rng"]) == 2  # each process's RNG state is kept for resuming
    # atol 1e-4 (a tenth of the lr): the key part of qkv.bias has a mathematically zero gradient (softmax
    # ignores a constant added to every key), so Adam turns float noise there into steps of up to ~lr.
    for name, weight in final_one["model"].items():
        torch.testing.assert_close(final_two["model"][name], weight, rtol=1e-4, atol=1e-4, msg=name)
    initial = _initial_weights(sample_h5)
    moved = max((final_one["model"][n] - w).abs().max().item() for n, w in initial.items())
    assert moved > 1e-3  # the runs trained: the comparison is not between two untouched initialisations


def _initial_weights(data):
    """The weights both runs start from (same seed, same create_model call)."""
    from mmtk.config import load_recipe
    from mmtk.runtime import seed_everything
    from mmtk.training import data_info, model_args

    import mmtk

    recipe = load_recipe(RECIPES / "tiny_finetune_semseg.yaml", TINY_SEMSEG, data_path=str(data))
    seed_everything(recipe.train.seed)
    model = mmtk.create_model(recipe.model.name, verbose=False, **model_args(recipe, data_info(data)))
    return model.state_dict()


# One rank is told to stop: a Ctrl-C that reached only rank 1 (a process group's SIGINT reaches every rank; here
# the harder case). Rank 1 raises SIGINT inside its 3rd step's forward pass; the flag travels with that step's loss
# all_reduce, so both ranks stop after step 3 and one checkpoint is written; each step does one all_reduce.
STOP_WORKER = """
import json, os, signal, sys
import torch
import torch.distributed as dist
import mmtk
from mmtk.config import load_recipe
from mmtk.engine import TrainingInterrupted, fit
from mmtk.training import _prepare, model_args, pretrain_loss_fn

recipe = load_recipe(sys.argv[1], json.loads(sys.argv[2]), data_path=sys.argv[3])
info, train_set = _prepare(recipe)
torch.manual_seed(0)
model = mmtk.create_model(recipe.model.name, verbose=False, **model_args(recipe, info))
loss_fn, calls, reduces = pretrain_loss_fn(), [0], [0]

def compute_loss(model, batch):
    calls[0] += model.training  # not the memory check's forward passes (in eval mode)
    if os.environ["RANK"] == "1" and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once, in this (main) thread
    return loss_fn(model, batch)

def counted_all_reduce(*args, **kwargs):
    reduces[0] += 1
    return all_reduce(*args, **kwargs)

all_reduce, dist.all_reduce = dist.all_reduce, counted_all_reduce
try:
    fit(recipe, sys.argv[4], model, train_set, compute_loss)
    stopped = None
except TrainingInterrupted as stop:
    stopped = stop.step
print(json.dumps({"stopped": stopped, "all_reduce": reduces[0], "forward": calls[0]}))
"""


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step_with_one_reduce_per_step(sample_h5, tmp_path):
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sets = TINY + ["optim.batch_size=4", "data.repeat=8", "optim.epochs=10", "train.ckpt_every=100",
                   "train.precision=fp32", "train.device=cpu"]
    args = [str(RECIPES / "tiny.yaml"), json.dumps(sets), str(sample_h5), str(tmp_path / "run")]
    env = {**ONE_THREAD_ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-c", STOP_WORKER, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]  # ranks that disagree would hang
    finally:
        for rank in ranks:
            rank.kill()
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results == [{"stopped": 3, "all_reduce": 3, "forward": 3}] * 2
    assert [path.name for path in checkpoint_paths(tmp_path / "run")] == ["step_00000003.pt"]
    assert load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["step"] == 3
