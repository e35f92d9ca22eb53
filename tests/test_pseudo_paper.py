"""The paper's pipeline from RGB alone: pseudo-labels of every depth kind and a 133-class Mask2Former, read by the
loader as what they are, then the paper's pretraining recipe on them; and pseudo-labelling scaled out over files
(shards, torchrun ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_helpers import run_cli  # noqa: E402
from engine_helpers import CLI, ONE_THREAD_ENV, TINY, TINY_DEPTH, one_thread  # noqa: E402,F401
from pseudo_helpers import (COCO_PANOPTIC_CLASSES, expected_depth, real_frames, reference, save_models,  # noqa: E402
                            write_h5)
from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint  # noqa: E402
from mmtk.data import H5Dataset  # noqa: E402
from mmtk.adapters.depth import standardize_depth  # noqa: E402
from mmtk.train.engine import read_metrics  # noqa: E402
from mmtk.data.contents import data_info

SIZE = (64, 64)
# The paper's recipe at CPU size: a 2-block ViT of width 64 on 64x64 crops, 2 steps of 2 frames, fp32.
PAPER_TINY = [*TINY, "model.num_visible=16", "model.overrides.decoder_heads=2", "optim.batch_size=2",
              "optim.micro_batch=null", "train.precision=fp32", "train.max_steps=2", "data.repeat=2"]
DEPTH_KINDS = [("dpt", "depth", "relative"), ("depth_anything", None, "relative-inverse"),
               ("zoedepth", None, "m")]  # (model, --depth-kind, units stored): the three kinds


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_models(tmp_path_factory.mktemp("models"))


def labelled_file(folder: Path, models: dict[str, Path], depth: str, kind: str | None, capsys, monkeypatch,
                  name: str = "photos.h5") -> Path:
    """Real 64x64 frames (3 train, 1 test) pseudo-labelled by ``depth`` and the 133-class Mask2Former."""
    path = folder / name
    write_h5(path, SIZE)
    code, _, err = run_cli(["pseudo-label", path, "--depth-model", models[depth], *(["--depth-kind", kind] if kind
                            else []), "--semseg-model", models["mask2former_coco"], "--no-progress"],
                           capsys, monkeypatch)
    assert code == 0, err
    return path


@pytest.mark.parametrize("depth,kind,units", DEPTH_KINDS)
def test_pseudo_label_then_the_papers_pretraining(depth, kind, units, models, tmp_path, capsys, monkeypatch):
    """The must-show: three depth kinds + a 133-class Mask2Former, then `mmtk pretrain multimae_paper`."""
    path = labelled_file(tmp_path, models, depth, kind, capsys, monkeypatch)
    rgb, _ = real_frames(SIZE)
    names = [f"coco-panoptic-{k}" for k in range(COCO_PANOPTIC_CLASSES)]
    with h5py.File(path) as f:
        stored_depth, labels = f["train/depth_pseudo"][:], f["train/semseg_pseudo"][:]
        assert f["train/depth_pseudo"].attrs["units"] == units
        assert json.loads(f["train/semseg_pseudo"].attrs["classes"]) == names  # the model's own, in id order
    for frame, stored, label in zip(rgb, stored_depth, labels):
        expected = expected_depth(reference(models[depth], frame), units)
        np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4 * expected.max())
        assert (label == reference(models["mask2former_coco"], frame) + 1).mean() > 0.99
    assert labels.max() > 40  # ids a 40-class model cannot take (the crash this fixes: "Target 91 is out of bounds")

    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", "multimae_paper", "--data", path, "--out", out,
                                 *[f"--set={s}" for s in PAPER_TINY]], capsys, monkeypatch)
    assert code == 0, err
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert {"rgb", "norm_rgb", "depth", "semseg"} <= set(record) and np.isfinite(record["loss"])
    state = load_checkpoint(checkpoint_paths(out)[-1])
    assert state["model_args"]["num_classes"] == COCO_PANOPTIC_CLASSES
    assert state["data"]["class_names"] == names
    assert state["model"]["encoder.tokenizers.semseg.class_emb.weight"].shape[0] == COCO_PANOPTIC_CLASSES


def test_relative_inverse_depth_is_read_as_negative_inverse_depth(tmp_path):
    """Inverse depth with an unknown shift is prepared as standardised negative inverse depth: exactly invariant
    to the network's scale and shift, and ordered like depth (farther = larger)."""
    path = tmp_path / "inverse.h5"
    write_h5(path, SIZE, train=2, test=0)
    with h5py.File(path, "r+") as f:
        sensor = f["train/depth"][:]
        inverse = np.where(sensor > 0, 3.0 / np.maximum(sensor, 1e-3) + 0.5, 0.0).astype(np.float32)  # scale + shift
        f["train"].create_dataset("depth_pseudo", data=inverse).attrs["units"] = "relative-inverse"
    dataset = H5Dataset(path, "train", modalities=("depth",), image_size=SIZE, dataset_map={"depth": "depth_pseudo"})
    sample = dataset[0]
    valid = torch.from_numpy(inverse[0] > 0)[None]
    negative = torch.from_numpy(-inverse[0])[None]
    torch.testing.assert_close(sample["depth"], standardize_depth(negative, valid), atol=1e-5, rtol=0)
    assert "depth_m" not in sample  # no distance in metres to score against
    prepared, metres = sample["depth"][0][valid[0]], torch.from_numpy(sensor[0])[valid[0]]
    assert torch.corrcoef(torch.stack([prepared.argsort().argsort().float(),
                                       metres.argsort().argsort().float()]))[0, 1] > 0.99  # same order as depth


def test_the_class_count_comes_from_the_labels_a_recipe_reads(models, tmp_path, capsys, monkeypatch):
    path = labelled_file(tmp_path, models, "dpt", "depth", capsys, monkeypatch)
    info = data_info(path, sources={"depth": "depth_pseudo", "semseg": "semseg_pseudo"})
    assert info.num_classes == COCO_PANOPTIC_CLASSES and info.class_names[0] == "coco-panoptic-0"
    assert data_info(path).num_classes == 0  # a file without sensor labels names no classes for semseg
    code, out, _ = run_cli(["info", path], capsys, monkeypatch)
    assert code == 0 and "classes of semseg_pseudo (133): coco-panoptic-0, coco-panoptic-1," in out
    code, _, err = run_cli(["pretrain", "multimae_paper", "--data", path, "--out", tmp_path / "run",
                            *[f"--set={s}" for s in PAPER_TINY], "--set=data.num_classes=40"], capsys, monkeypatch)
    assert code == 2 and "data.num_classes is 40 but" in err and "133 classes" in err
    with h5py.File(path, "r+") as f:  # labels of a tool that wrote no class names
        del f["train/semseg_pseudo"].attrs["classes"]
    code, _, err = run_cli(["pretrain", "multimae_paper", "--data", path, "--out", tmp_path / "run",
                            *[f"--set={s}" for s in PAPER_TINY], "--set=data.num_classes=null"], capsys, monkeypatch)
    assert code == 2 and "names no classes for it; set data.num_classes=N" in err  # never a silent 40


def test_relative_pseudo_depth_is_no_finetuning_target_but_metric_is(models, tmp_path, capsys, monkeypatch):
    """Finetuning trains and scores depth in metres: a relative pseudo-label is refused in one line, a metric one
    trains."""
    path = tmp_path / "photos.h5"
    write_h5(path, SIZE)
    finetune = ["finetune", "tiny_finetune_depth", "--data", path, "--set=data.sources={depth: depth_pseudo}",
                "--set=model.inputs=[rgb]", *[f"--set={s}" for s in TINY_DEPTH], "--set=train.max_steps=1"]
    for model, units in (("depth_anything", "relative-inverse"), ("depth_anything_metric", "m")):
        code, _, err = run_cli(["pseudo-label", path, "--depth-model", models[model], "--overwrite", "--no-progress"],
                               capsys, monkeypatch)
        assert code == 0, err
        code, _, err = run_cli([*finetune, "--out", tmp_path / units], capsys, monkeypatch)
        if units == "m":
            assert code == 0, err
        else:
            assert code == 2 and "in 'relative-inverse' units" in err and "--depth-kind metric" in err


def test_shards_split_the_files(models, tmp_path, capsys, monkeypatch):
    """--shard-index I --num-shards N labels every N-th file from the I-th; together the shards label all."""
    files = [tmp_path / f"part{i}.h5" for i in range(3)]
    for file in files:
        write_h5(file, SIZE, train=2, test=0)
    args = ["pseudo-label", *files, "--semseg-model", models["segformer"], "--no-progress", "--num-shards", "2"]
    code, out, err = run_cli([*args, "--shard-index", "1"], capsys, monkeypatch)
    assert code == 0, err
    assert [("semseg_pseudo" in h5py.File(file)["train"]) for file in files] == [False, True, False]
    assert run_cli([*args, "--shard-index", "0"], capsys, monkeypatch)[0] == 0
    assert all("semseg_pseudo" in h5py.File(file)["train"] for file in files)
    code, _, err = run_cli([*args, "--shard-index", "2"], capsys, monkeypatch)
    assert code == 2 and "0 <= shard-index < num-shards" in err


def test_torchrun_ranks_label_their_own_files_as_one_process_would(models, tmp_path, one_thread, capsys,
                                                                   monkeypatch):
    """A shard folder of two files under `torchrun --nproc-per-node 2` (gloo, CPU): each rank labels one shard; the
    arrays are bit-exact those of one process labelling both (one thread in both, as torchrun gives each process),
    and the folder's index is rewritten to list the new arrays."""
    from mmtk.data import read_info
    from mmtk.data.shards import write_index

    outputs = {}
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        for index, file in enumerate([folder / "a.h5", folder / "b.h5"]):
            write_h5(file, SIZE, train=2 - index, test=1)
        write_index(folder)
        args = ["pseudo-label", folder, "--depth-model", models["depth_anything"],
                "--semseg-model", models["mask2former_coco"], "--batch-size", "1", "--no-progress"]
        if name == "one":
            code, outputs[name], err = run_cli(args, capsys, monkeypatch)
            assert code == 0, err
            continue
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
        result = subprocess.run([*torchrun, *CLI, *map(str, args)], capture_output=True, text=True, timeout=600,
                                env=ONE_THREAD_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    for output in outputs.values():  # each file labelled once, by one process
        assert output.count("a.h5:/train/depth_pseudo: 2 frames labelled") == 1
        assert output.count("b.h5:/train/depth_pseudo: 1 frame labelled") == 1
        assert output.count("index rewritten") == 1
    for file in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / "one" / file) as f, h5py.File(tmp_path / "two" / file) as g:
            for name in ("train/depth_pseudo", "test/depth_pseudo", "train/semseg_pseudo", "test/semseg_pseudo"):
                np.testing.assert_array_equal(g[name][:], f[name][:])
                assert f[name].attrs["device"] == g[name].attrs["device"] == "cpu"
    for name in ("one", "two"):  # the index is fresh again and lists the labels
        datasets = read_info(tmp_path / name)["splits"]["train"]["datasets"]
        assert {"depth_pseudo", "semseg_pseudo"} <= set(datasets), datasets


KILLED_AFTER_TWO_BATCHES = """
import os, signal, sys
import mmtk.pseudo_label as pl
from mmtk.cli.main import main
write, calls = pl._write_batch, []
def write_then_die(*args):
    write(*args)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a node that dies
pl._write_batch = write_then_die
sys.argv = ["mmtk", *sys.argv[1:]]
main()
"""


def test_killed_run_resumes_at_the_first_unfinished_batch(models, tmp_path, one_thread, capsys, monkeypatch):
    """SIGKILL after the second batch: the file stays readable, the split is not under its final name, and the
    rerun continues at frame 2 and ends bit-exact as an uninterrupted run (one thread everywhere)."""
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    for path in (killed, whole):
        write_h5(path, SIZE, train=4, test=0)
    args = ["--depth-model", str(models["depth_anything"]), "--batch-size", "1", "--no-progress"]
    result = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_BATCHES, "pseudo-label", str(killed), *args],
                            capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert result.returncode == -9, result.stderr[-2000:]
    with h5py.File(killed) as f:
        assert "depth_pseudo" not in f["train"] and f["train/depth_pseudo.partial"].attrs["frames_done"] == 2
    code, out, err = run_cli(["pseudo-label", killed, *args], capsys, monkeypatch)
    assert code == 0 and "resuming at frame 2 of 4" in out, err
    assert run_cli(["pseudo-label", whole, *args], capsys, monkeypatch)[0] == 0
    with h5py.File(killed) as f, h5py.File(whole) as g:
        np.testing.assert_array_equal(f["train/depth_pseudo"][:], g["train/depth_pseudo"][:])
