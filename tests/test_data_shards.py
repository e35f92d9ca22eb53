"""Shard folders (mmtk.data.shards) and `mmtk convert` of several inputs, on the real sample bags.

Four inputs: the sample ROS1 bag twice (a.bag, b.bag: 2 frames each) and the shared 3-frame ROS1 bag and ROS2
bag (c.bag, d_ros2: 3 frames each), all with Image rgb8 + 16UC1 depth: 10 frames in all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_helpers import BAG1, DEPTH_TOPIC, REPO, RGB_TOPIC, run_cli, shared
from mmtk.data import H5Dataset, read_info
from mmtk.data.shard_index import INDEX_NAME
from mmtk.data.shards import ShardedDataset, dataset_files, write_index
from mmtk.errors import MmtkError

TOPICS = ["--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC, "--no-progress"]
KEYS = ["a.bag", "b.bag", "c.bag", "d_ros2"]
FRAMES = {"a.bag": 2, "b.bag": 2, "c.bag": 3, "d_ros2": 3}


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bags")
    shutil.copy(BAG1, folder / "a.bag")
    shutil.copy(BAG1, folder / "b.bag")
    (folder / "c.bag").symlink_to(shared("rosbag_pcl_kinect/pcl_kinect_3frames.bag"))
    (folder / "d_ros2").symlink_to(shared("rosbag_pcl_kinect/pcl_kinect_3frames_ros2"), target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def singles(bags, tmp_path_factory) -> dict[str, Path]:
    """Each input converted alone, the way it always was: one file each."""
    out = tmp_path_factory.mktemp("singles")
    for key in KEYS:
        code, text = run_cli("convert", "--rosbag", bags / key, out / f"{key}.h5", *TOPICS)
        assert code == 0, text
    return {key: out / f"{key}.h5" for key in KEYS}


@pytest.fixture(scope="module")
def folder(bags, tmp_path_factory) -> Path:
    """The four inputs converted together with two worker processes."""
    out = tmp_path_factory.mktemp("clean") / "shards"
    code, text = run_cli("convert", "--rosbag", f"{bags}/*", out, *TOPICS, "--workers", "2")
    assert code == 0, text
    assert "4 inputs converted, 0 kept" in text and "index written" in text
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of every split of an mmtk file, by "split/name" (encoded images as their stored bytes)."""
    def stored(dataset: h5py.Dataset) -> np.ndarray:
        value = dataset[()]
        return value if value.dtype != object else np.array([bytes(element) for element in value], dtype=object)

    with h5py.File(path) as handle:
        return {f"{split}/{name}": stored(dataset) for split, group in handle.items() for name, dataset in group.items()}


def assert_same_arrays(left: Path, right: Path) -> None:
    a, b = arrays(left), arrays(right)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), f"{left} {name}"


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime ns) of each shard: a rewritten shard gets a new inode (atomic replace)."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(folder.glob("*.h5"))}


def test_four_inputs_with_two_workers_equal_four_single_conversions(folder, singles):
    files = dataset_files(folder)
    assert [path.name for path in files] == [f"{key}.h5" for key in KEYS]
    for key in KEYS:
        assert_same_arrays(folder / f"{key}.h5", singles[key])
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["splits"]["all"]["frames"] == 10 and index["bytes"] == sum(p.stat().st_size for p in files)
    assert [shard["splits"]["all"]["frames"] for shard in index["shards"]] == [FRAMES[key] for key in KEYS]
    assert {"rgb", "depth"} <= set(index["splits"]["all"]["modalities"])


KILLED_AFTER_THE_FIRST_INPUT = """
import os, signal, sys
import mmtk.data.convert as convert
from mmtk.cli.main import main
mark = convert._mark_finished
def mark_then_die(*args):
    shards = mark(*args)
    os.killpg(0, signal.SIGKILL)  # the whole run, workers too, with no cleanup, as a node that dies
    return shards
convert._mark_finished = mark_then_die
sys.argv = ["mmtk", *sys.argv[1:]]
main()
"""


def test_killed_run_keeps_finished_shards_and_resumes(bags, folder, tmp_path):
    out = tmp_path / "shards"
    command = [sys.executable, "-c", KILLED_AFTER_THE_FIRST_INPUT, "convert", "--rosbag", f"{bags}/*", str(out),
               *TOPICS, "--workers", "2"]
    run = subprocess.run(command, cwd=REPO, start_new_session=True, capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    published = stamps(out)  # the first finished input, and perhaps the other worker's shard, published unmarked
    assert 1 <= len(published) < 4 and not (out / INDEX_NAME).exists(), "the run was not killed part-way"
    code, text = run_cli("convert", "--rosbag", f"{bags}/*", out, *TOPICS, "--workers", "2")
    assert code == 0, text
    assert f"{len(published)} of 4 inputs already converted" in text
    assert {name: stamps(out)[name] for name in published} == published  # kept, not rewritten
    for key in KEYS:
        assert_same_arrays(out / f"{key}.h5", folder / f"{key}.h5")
    assert dataset_files(out) == [out / f"{key}.h5" for key in KEYS]


def test_split_input_redoes_only_its_missing_parts(bags, singles, tmp_path):
    out = tmp_path / "split"
    code, text = run_cli("convert", "--rosbag", bags / "c.bag", out, *TOPICS, "--shard-frames", "1")
    assert code == 0, text
    parts = [out / f"c.bag-0000{part}.h5" for part in range(3)]
    assert dataset_files(out) == parts
    parts[1].unlink()  # e.g. found corrupt and deleted: the input is no longer finished
    with pytest.raises(MmtkError, match="stale .1 shard.s. removed, first c.bag-00001.h5"):
        dataset_files(out)
    kept = stamps(out)
    code, text = run_cli("convert", "--rosbag", bags / "c.bag", out, *TOPICS, "--shard-frames", "1")
    assert code == 0 and "1 inputs converted, 0 kept" in text and "index written" in text, text
    assert {name: stamps(out)[name] for name in kept} == kept and parts[1].exists()
    joined = {name: np.concatenate([arrays(part)[name] for part in parts]) for name in arrays(parts[0])}
    single = arrays(singles["c.bag"])
    assert sorted(joined) == sorted(single)
    for name, value in single.items():
        assert np.array_equal(joined[name], value), name


def test_two_machine_halves_merge_into_the_same_dataset(bags, folder, tmp_path):
    out = tmp_path / "halves"
    code, text = run_cli("convert", "--rosbag", f"{bags}/*", out, *TOPICS, "--shard-index", "1", "--num-shards", "2")
    assert code == 0, text
    assert "not indexed yet" in text and sorted(p.name for p in out.glob("*.h5")) == ["b.bag.h5", "d_ros2.h5"]
    code, text = run_cli("index", out)  # machine 0's part is missing
    assert code == 2 and "2 of 4 inputs have no finished shards (first: a.bag)" in text and "--partial" in text
    code, text = run_cli("convert", "--rosbag", f"{bags}/[abc]*", out, *TOPICS, "--shard-index", "0",
                         "--num-shards", "2")  # a part given other inputs would skip or repeat some
    assert code == 2 and "other inputs" in text and "every --shard-index part the same inputs" in text, text
    code, text = run_cli("convert", "--rosbag", f"{bags}/*", out, *TOPICS, "--shard-index", "0", "--num-shards", "2")
    assert code == 0, text
    assert "index written" in text
    code, text = run_cli("index", out)
    assert code == 0 and "4 shards, all 10 frames" in text, text
    merged, clean = (json.loads((path / INDEX_NAME).read_text()) for path in (out, folder))
    assert [s["file"] for s in merged["shards"]] == [s["file"] for s in clean["shards"]]
    assert merged["splits"] == clean["splits"] and merged["bytes"] == clean["bytes"]
    for key in KEYS:
        assert_same_arrays(out / f"{key}.h5", folder / f"{key}.h5")


def test_loader_over_a_folder_gives_the_single_files_samples_with_bounded_open_files(folder, singles):
    import pickle

    sharded = H5Dataset(folder, split="all", image_size=(96, 128), max_open=2)
    assert isinstance(sharded, ShardedDataset) and len(sharded) == 10
    expected = [sample for key in KEYS for sample in H5Dataset(singles[key], split="all", image_size=(96, 128))]
    for index in [0, 5, 9, 1, 7, 3, 8, 2, 6, 4]:  # out of order: shards are reopened
        sample = sharded[index]
        assert sample.keys() == expected[index].keys()
        for name, value in sample.items():
            assert torch.equal(value, expected[index][name]), (index, name)
        assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) <= 2
    copy = pickle.loads(pickle.dumps(sharded))  # what a DataLoader worker gets: no handle, reopens
    assert torch.equal(copy[9]["rgb"], expected[9]["rgb"])
    sharded.close()
    copy.close()
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0


def test_opening_a_10000_shard_folder_reads_the_index_only(folder, singles, tmp_path, monkeypatch):
    big = tmp_path / "big"
    big.mkdir()
    index = json.loads((folder / INDEX_NAME).read_text())
    template = index["shards"][0]  # a.bag.h5: 2 frames
    index["shards"] = []
    for number in range(10_000):
        name = f"s{number:05d}.h5"
        (big / name).symlink_to(folder / template["file"])
        index["shards"].append({**template, "file": name})
    index["splits"]["all"]["frames"] = 20_000
    (big / INDEX_NAME).write_text(json.dumps(index))
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(h5py, "File", lambda *args, **kwargs: opened.append(args[0]) or real_file(*args, **kwargs))
    start = time.perf_counter()
    dataset = H5Dataset(big, split="all", modalities=["rgb", "depth"], image_size=None)
    info = read_info(big)
    seconds = time.perf_counter() - start
    assert opened == [] and len(dataset) == 20_000 and info["splits"]["all"]["frames"] == 20_000
    assert seconds < 10, f"opening took {seconds:.1f} s"
    sample = dataset[19_999]  # frame 1 of the last shard: only that shard is opened
    assert {Path(path).name for path in opened} == {"s09999.h5"}
    reference = H5Dataset(singles["a.bag"], split="all", modalities=["rgb", "depth"], image_size=None)[1]
    assert torch.equal(sample["depth"], reference["depth"])


def test_info_check_and_point_cloud_frames_of_a_folder(folder, singles):
    code, text = run_cli("info", folder)
    assert code == 0 and "shard folder: 4 shards" in text and "[all] 10 frames, 480x640 px" in text, text
    code, text = run_cli("info", folder, "--json")
    summary = json.loads(text)
    assert summary["shards"] == 4 and summary["splits"]["all"]["datasets"]["depth"]["shape"] == [10, 480, 640]
    single = read_info(singles["c.bag"])["splits"]["all"]["depth"]["depth"]
    merged = summary["splits"]["all"]["depth"]["depth"]
    assert merged["min_m"] <= single["min_m"] and merged["max_m"] >= single["max_m"]
    code, text = run_cli("check", folder)
    assert code == 0 and text.strip().endswith(f"{folder}: 10 frames checked, 0 bad"), text
    from mmtk.data.sources.mmtk_files import dataset_frames

    (frame,), (reference,) = dataset_frames(folder, "all", 5), dataset_frames(singles["c.bag"], "all", 1)
    assert frame.arrays.keys() == reference.arrays.keys()
    assert all(np.array_equal(frame.arrays[name], reference.arrays[name]) for name in frame.arrays)
    assert len(list(dataset_frames(folder, "all"))) == 10


def test_stale_missing_index_and_a_corrupt_shard_are_one_line_each(bags, folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # copytree keeps modification times: the index stays fresh
    assert len(dataset_files(copy)) == 4
    (copy / INDEX_NAME).unlink()
    with pytest.raises(MmtkError, match=f"without index.json.*run `mmtk index {copy}`"):
        H5Dataset(copy, split="all")
    write_index(copy)
    rotten = copy / "d_ros2.h5"  # bytes flipped in place (size and time unchanged): the index cannot tell
    original, stat = rotten.read_bytes(), rotten.stat()
    rotten.write_bytes(b"\xff" * 64 + original[64:])
    os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, text = run_cli("check", copy)
    assert code == 1 and f"error: {rotten} is not a readable HDF5 file" in text, text
    assert f"{copy}: 7 frames checked, 0 bad, 1 shard(s) unreadable" in text
    rotten.write_bytes(original)
    os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shard = copy / "c.bag.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    code, text = run_cli("check", copy)
    assert code == 2 and "stale (1 shard(s) changed size or modification time, first c.bag.h5)" in text
    assert f"run `mmtk index {copy}`" in text
    code, text = run_cli("index", copy)
    assert code == 2 and "c.bag.h5" in text and "re-create" in text and len(text.strip().splitlines()) == 1, text
    shard.unlink()
    with pytest.raises(MmtkError, match="1 shard.s. removed, first c.bag.h5"):
        read_info(copy)
    kept = stamps(copy)  # the fix: run the same conversion again, which redoes that input only
    code, text = run_cli("convert", "--rosbag", f"{bags}/*", copy, *TOPICS)
    assert code == 0 and "1 inputs converted, 3 kept" in text and "index written" in text, text
    assert {name: stamps(copy)[name] for name in kept} == kept
    assert_same_arrays(shard, folder / "c.bag.h5")


def test_bad_scale_out_requests_are_one_line_each(bags, tmp_path):
    cases = [
        (["--rosbag", f"{bags}/*.nothing", tmp_path / "x"], "matches nothing"),
        (["--rosbag", f"{bags}/*", tmp_path / "x.h5"], "name a folder"),
        (["--rosbag", f"{bags}/*", tmp_path / "x", "--shard-index", "0"], "go together"),
        (["--rosbag", f"{bags}/*", tmp_path / "x", "--shard-index", "2", "--num-shards", "2"], "0 <= I < N"),
        (["--images", bags, "--images", bags / "d_ros2", tmp_path / "x", "--shard-frames", "5"],
         "each --images folder becomes one shard"),
    ]
    (tmp_path / "file.h5").write_bytes(b"")
    cases.append((["--rosbag", f"{bags}/*", tmp_path / "file.h5"], "is a file"))
    # the library's option checks, made once for all inputs, before the folder is made
    cases.append((["--rosbag", f"{bags}/*", tmp_path / "x", "--max-dt", "0"], "--max-dt must be positive seconds"))
    cases.append((["--rgbd", bags, "--rgbd", bags / "d_ros2", tmp_path / "x", "--depth-scale", "-5"],
                  "--depth-scale must be positive"))
    for args, message in cases:
        extra = TOPICS if "--rosbag" in args else []
        code, text = run_cli("convert", *args, *extra)
        assert code == 2 and message in text and len(text.strip().splitlines()) == 1, (args, text)
        assert not (tmp_path / "x").exists(), args


def test_finetune_and_eval_take_a_shard_folder_as_data(tmp_path):
    from engine_helpers import RECIPES, SAMPLES, TINY_SEMSEG

    data = tmp_path / "nyu_shards"  # the real labeled sample, one frame a shard: train-00000, test-00001
    code, text = run_cli("convert", "--rgbd", SAMPLES / "nyuv2_multimae", data, "--shard-frames", "1", "--size",
                         "120x160", "--no-progress")
    assert code == 0, text
    assert [path.name for path in dataset_files(data)] == ["nyuv2_multimae-00000.h5", "nyuv2_multimae-00001.h5"]
    args = [f"--set={s}" for s in TINY_SEMSEG + ["optim.batch_size=2", "optim.epochs=1", "optim.warmup_epochs=0",
                                                 "data.repeat=2"]]
    code, text = run_cli("finetune", RECIPES / "tiny_finetune_semseg.yaml", "--data", data, "--out", tmp_path / "ft",
                         *args)
    assert code == 0, text
    code, text = run_cli("eval", "--checkpoint", tmp_path / "ft", "--inputs", "rgb,depth")  # the folder it trained on
    assert code == 0 and f"data: {data}" in text and "1 frame evaluated" in text, text
