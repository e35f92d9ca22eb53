"""Two nodes (`torchrun --nnodes 2 --nproc-per-node 1`, two local processes, gloo on 127.0.0.1) train on a weighted
mixture of a file and a shard folder and give the weights of one process at the same global batch and seed."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from engine_helpers import (CLI, ONE_THREAD_ENV, RECIPES, SAMPLES, TINY_DEPTH, assert_same_final_weights,  # noqa: F401
                            sample_h5)
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
from mmtk.train.engine import read_metrics


def _args(data, out):
    # depth from rgb: both files have the target, so each sample's loss counts alike on any process
    sets = TINY_DEPTH + ["optim.batch_size=4", "data.repeat=4", "optim.epochs=3", "optim.warmup_epochs=1",
                         "data.weights=[1,2]", "train.ckpt_every=100", "train.precision=fp32", "train.device=cpu"]
    return ["finetune", str(RECIPES / "tiny_finetune_depth.yaml"), *[w for d in data for w in ("--data", str(d))],
            "--out", str(out), *[f"--set={s}" for s in sets]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def small_shards(tmp_path):
    """The shipped labelled frames again, stored at 96x128 px as a shard folder of one frame a shard."""
    from mmtk.data.convert import convert_to_shards

    out = tmp_path / "nyuv2_small"
    convert_to_shards("rgbd", [SAMPLES / "nyuv2_multimae"], out, {"size": (96, 128)}, shard_frames=1, progress=False)
    return out


def test_two_nodes_match_one_process_on_a_weighted_mixture(sample_h5, small_shards, tmp_path):
    data = [sample_h5, small_shards]
    one = subprocess.run(CLI + _args(data, tmp_path / "one"), capture_output=True, text=True, timeout=600,
                         env=ONE_THREAD_ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "--no-python", *CLI, *_args(data, tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)
             for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]

    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in double] == list(range(1, 7))
    for a, b in zip(single, double):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    final_two = load_checkpoint(checkpoint_paths(tmp_path / "two")[-1])
    assert len(final_two["rng"]) == 2 and final_two["data"]["paths"] == [str(p) for p in data]
    assert_same_final_weights(tmp_path / "one", tmp_path / "two", RECIPES / "tiny_finetune_depth.yaml", TINY_DEPTH,
                              [str(p) for p in data])
