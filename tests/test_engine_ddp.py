"""The same command under torchrun (2 gloo processes on CPU) gives the one-process result at the same global batch;
a stop asked of one rank stops every rank at the same step."""

from __future__ import annotations

import subprocess
import sys

from engine_helpers import (CLI, ONE_THREAD_ENV, RECIPES, TINY, TINY_SEMSEG, assert_same_final_weights,  # noqa: F401
                            sample_h5)
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
from mmtk.train.engine import read_metrics


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
    assert len(load_checkpoint(checkpoint_paths(tmp_path / "two")[-1])["rng"]) == 2  # each process's, for resuming
    assert_same_final_weights(tmp_path / "one", tmp_path / "two", RECIPES / "tiny_finetune_semseg.yaml", TINY_SEMSEG,
                              str(sample_h5))


# One rank is told to stop: a Ctrl-C that reached only rank 1 (a process group's SIGINT reaches every rank; here
# the harder case). Rank 1 raises SIGINT inside its 3rd step's forward pass; the flag travels with that step's loss
# all_reduce, so both ranks stop after step 3 and one checkpoint is written; each step does one all_reduce.
STOP_WORKER = """
import json, os, signal, sys
import torch
import torch.distributed as dist
import mmtk
from mmtk.config import load_recipe
from mmtk.train.engine import TrainingInterrupted, train
from mmtk.train.run import _prepare, model_args, pretrain_loss_fn
from mmtk.train.settings import train_settings

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
    train(train_settings(recipe), sys.argv[4], model, train_set, compute_loss)
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
