"""Hostile disks and hostile files (issue 10, items 2, 3, 4, 6 and 7): full disks, read-only folders, dead
writers' litter, planted symlinks, size bombs and resume edge cases all end in one line, never a traceback.

The disk tests mount small tmpfs file systems (we run as root in CI); they skip with the reason where mounting
is not permitted.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke, run_cli
from engine_helpers import RECIPES, TINY, sample_h5  # noqa: F401  (fixture)
from data_helpers import SAMPLES, SYNC
from mmtk.errors import MmtkError

PYTHON = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def _mounted(folder: Path, options: str):
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system."""
    with _mounted(tmp_path / "disk", "size=3m") as folder:
        yield folder


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only file system."""
    with _mounted(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def _tiny_checkpoint(path: Path, **model_args) -> Path:
    import mmtk
    from mmtk.train.checkpoint import save_checkpoint

    args = dict(dim=64, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, image_size=[64, 64],
                inputs=["rgb", "depth"], outputs=["rgb", "depth"])
    model = mmtk.create_model("multimae-tiny", verbose=False, **args)
    save_checkpoint({"model_name": "multimae-tiny", "model_args": {**args, **model_args},
                     "model": model.state_dict(), "kind": "pretrain"}, path)
    return path


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------- item 2: full disk, read-only folder

def test_reliability_convert_into_a_full_disk_is_refused_before_writing(small_disk):
    older = small_disk / "out.h5"
    older.write_bytes(b"older output")
    _fill(small_disk, 300_000)  # format 2 keeps these 3 frames (JPEG bytes, uint16 depth) in about 0.65 MB
    code, output = invoke("convert", "--rgbd", SYNC, older, "--force", "--no-progress")
    assert code == 2
    line = _one_error_line(output)
    assert str(older) in line and "needs about" in line and "free" in line and "MiB" in line
    assert older.read_bytes() == b"older output"
    assert _temps(small_disk) == []


WRITE_UNTIL_FULL = """
import sys, numpy as np
from mmtk.data.format import H5Writer
from mmtk.errors import MmtkError
try:
    with H5Writer(sys.argv[1], source="test", force=True) as writer:
        for i in range(1000):  # noise: no codec makes it smaller, so the disk fills after a few frames
            rng = np.random.default_rng(i)
            writer.add_frame("train", {"rgb": rng.integers(0, 256, (240, 320, 3), np.uint8),
                                       "depth": 1.0 + rng.random((240, 320), np.float32)})
except MmtkError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_reliability_hdf5_disk_full_midway_is_one_line_without_crash(small_disk):
    # No frame count known, so no check before: HDF5 itself hits ENOSPC (it used to segfault after 227 lines).
    older = small_disk / "out.h5"
    older.write_bytes(b"older output")
    done = subprocess.run([PYTHON, "-c", WRITE_UNTIL_FULL, str(older)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "no space left on the device" in done.stderr and str(older) in done.stderr
    assert older.read_bytes() == b"older output"
    assert _temps(small_disk) == []


def test_reliability_checkpoint_on_a_full_disk_keeps_the_older_one(small_disk):
    from mmtk.train.checkpoint import save_checkpoint

    path = small_disk / "run" / "checkpoints" / "step_00000001.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(MmtkError, match="no space left on the device") as err:  # torch's inline_container failure
        save_checkpoint({"w": torch.randn(2_000_000)}, path)
    assert str(path) in str(err.value) and "free" in str(err.value)
    assert path.read_bytes() == before
    assert _temps(small_disk) == []


def test_reliability_pretrain_on_a_full_disk_is_one_line(small_disk, sample_h5):
    _fill(small_disk, leave=64 * 1024)  # room for the recipe and metrics, not for a checkpoint
    out = small_disk / "run"
    code, output = invoke("pretrain", RECIPES / "tiny.yaml", "--data", sample_h5, "--out", out,
                          *[f"--set={s}" for s in TINY + ["train.max_steps=1", "optim.batch_size=2"]])
    assert code == 2
    line = _one_error_line(output)
    assert "no space left on the device" in line and str(out) in line
    assert _temps(small_disk) == []


def test_reliability_read_only_folder_is_one_line(read_only_disk, tmp_path, capsys, monkeypatch):
    from mmtk.config import load_recipe, save_recipe

    code, output = invoke("convert", "--rgbd", SAMPLES / "nyuv2_multimae", read_only_disk / "out.h5", "--no-progress")
    assert code == 2
    line = _one_error_line(output)
    assert "read-only" in line and str(read_only_disk) in line
    with pytest.raises(MmtkError, match="read-only"):
        save_recipe(load_recipe(RECIPES / "tiny.yaml"), read_only_disk / "run" / "recipe.yaml")
    # An OSError no command translates (here mkdir of predict's --out) is turned into one line by the CLI itself.
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "rgb.png")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code, out, err = run_cli(["predict", "--checkpoint", _tiny_checkpoint(tmp_path / "tiny.pt"), "--rgb",
                                  tmp_path / "rgb.png", "--outputs", "depth", "--out", read_only_disk / "pred"],
                                 capsys, monkeypatch)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 2
    line = _one_error_line(err)
    assert "read-only" in line and str(read_only_disk / "pred") in line


def test_reliability_missing_permission_is_one_line(tmp_path):
    from mmtk.io import atomic_write_text

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user for the test")
    folder = Path(tempfile.mkdtemp())  # /tmp/XXXX: reachable by other users, unlike pytest's tmp_path
    try:
        folder.chmod(0o555)
        os.seteuid(65534)  # nobody: root would bypass the permission
        try:
            with pytest.raises(MmtkError, match="permission denied") as err:
                atomic_write_text(folder / "out.json", "{}")
        finally:
            os.seteuid(0)
        assert str(folder / "out.json") in str(err.value) and "uid 65534" in str(err.value)
    finally:
        folder.chmod(0o755)
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


# ------------------------------------------------------------------------ item 3: dead writers' litter

SLOW_WRITER = """
import signal, sys, time, numpy as np
from mmtk.data.format import H5Writer
if sys.argv[2] == "cli-handler":
    from mmtk.cli.main import _exit_on_sigterm
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
with H5Writer(sys.argv[1], source="test") as writer:
    for i in range(10000):
        writer.add_frame("train", {"rgb": np.zeros((32, 32, 3), np.uint8), "depth": np.ones((32, 32), np.float32)})
        print("frame", flush=True)
        time.sleep(0.01)
"""


def _kill_while_writing(out: Path, sig: int, mode: str) -> int:
    process = subprocess.Popen([PYTHON, "-c", SLOW_WRITER, str(out), mode], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "frame\n"
    process.send_signal(sig)
    process.wait(timeout=60)
    return process.pid


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_reliability_dead_writer_litter_is_removed_and_reported(tmp_path, capfd, sig):
    from mmtk.data.format import H5Writer

    out = tmp_path / "out.h5"
    pid = _kill_while_writing(out, sig, "plain")
    litter = _temps(tmp_path)
    assert len(litter) == 1 and litter[0].startswith(f".out.h5.tmp-{pid}-"), litter  # its owner, by name
    assert not out.exists()
    with H5Writer(tmp_path / "other.h5", source="next run") as writer:  # the next write into that folder
        writer.add_frame("train", {"rgb": np.zeros((8, 8, 3), np.uint8), "depth": np.ones((8, 8), np.float32)})
    report = [line for line in capfd.readouterr().err.splitlines() if "left by runs that died" in line]
    assert len(report) == 1 and litter[0] in report[0] and "removed 1 temporary file" in report[0]
    assert _temps(tmp_path) == []


def test_reliability_sigterm_under_the_cli_cleans_up_at_once(tmp_path):
    out = tmp_path / "out.h5"
    _kill_while_writing(out, signal.SIGTERM, "cli-handler")
    assert _temps(tmp_path) == [] and not out.exists()


def test_reliability_a_live_writers_temp_is_left_alone(tmp_path):
    from mmtk.io import remove_dead_temps

    live = subprocess.Popen(["sleep", "30"])
    try:
        mine = tmp_path / f".out.h5.tmp-{live.pid}-abc123xy"
        dead = tmp_path / ".out.h5.tmp-999999999-abc123xy"  # beyond pid_max: never a live process
        mine.write_bytes(b"in progress")
        dead.write_bytes(b"litter")
        assert remove_dead_temps(tmp_path, log=lambda line: None) == [dead]
        assert mine.exists() and not dead.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ item 6: private, unpredictable temps

def test_reliability_planted_symlinks_are_never_followed(tmp_path, monkeypatch):
    from mmtk.config import load_recipe, save_recipe
    from mmtk.train.engine import MetricsLog
    from mmtk.io import atomic_write_text, temp_prefix

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    # The old predictable names, and the next name mkstemp will draw (made predictable for the test only).
    for name in ("recipe.yaml.tmp", "metrics.jsonl.tmp", "out.json.tmp"):
        (run / name).symlink_to(victim)
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted1", "freshnm2"]))
    planted = run / f"{temp_prefix(run / 'out.json')}planted1"
    planted.symlink_to(victim)

    atomic_write_text(run / "out.json", '{"ok": true}')
    assert json.loads((run / "out.json").read_text()) == {"ok": True}
    monkeypatch.undo()
    save_recipe(load_recipe(RECIPES / "tiny.yaml"), run / "recipe.yaml")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    log = MetricsLog(run, enabled=True)
    log.truncate_after(1)
    log.close()
    assert victim.read_text() == "precious" and planted.is_symlink()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert "kind" in (run / "recipe.yaml").read_text()


def test_reliability_published_files_get_the_umask_mode(tmp_path):
    from mmtk.io import atomic_write_text

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


# --------------------------------------------------------------------------------------- item 4: bombs

def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [40000, 10000])  # PIL's bomb error; PIL's mere warning (100 Mpx)
def test_reliability_png_bomb_is_refused_before_decoding(tmp_path, side):
    from mmtk.data.sources.image_files import read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    before = _max_rss_bytes()
    with pytest.raises(MmtkError, match=f"{side}x{side}|exceeds limit") as err:
        read_image(path, to_rgb=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert _max_rss_bytes() - before < 200 * 2**20


def _forged_h5(path: Path, **datasets: tuple[tuple[int, ...], str]) -> Path:
    with h5py.File(path, "w") as handle:
        handle.attrs["mmtk_format"] = 1
        group = handle.create_group("train")
        for name, (shape, dtype) in datasets.items():
            group.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), maxshape=(None, *shape[1:]))
    return path


@pytest.mark.parametrize("datasets, expected", [
    (dict(rgb=((1, 100000, 100000, 3), "u1"), depth=((1, 100000, 100000), "f4")), "axes beyond"),
    (dict(rgb=((2**40, 8, 8, 3), "u1"), depth=((2**40, 8, 8), "f4")), "the file stores 0 B"),
    (dict(rgb=((50000, 240, 320, 3), "u1"), depth=((50000, 240, 320), "f4")), "truncated or forged"),
])
def test_reliability_hdf5_bombs_are_refused_from_metadata(tmp_path, datasets, expected):
    from mmtk.data import H5Dataset

    path = _forged_h5(tmp_path / "bomb.h5", **datasets)
    assert path.stat().st_size < 10_000
    before = _max_rss_bytes()
    code, output = invoke("info", path)
    assert code == 2 and expected in _one_error_line(output)
    with pytest.raises(MmtkError, match=expected):
        H5Dataset(path, "train", ("rgb", "depth"))
    assert _max_rss_bytes() - before < 200 * 2**20


def test_reliability_hdf5_data_outside_the_file_is_refused(tmp_path):
    from mmtk.data import read_info

    target = tmp_path / "secret.bin"
    target.write_bytes(b"\1" * 4096)
    path = tmp_path / "external.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["mmtk_format"] = 1
        handle.create_group("train").create_dataset("depth", shape=(1, 32, 32), dtype="f4",
                                                    external=[(str(target), 0, 4096)])
    with pytest.raises(MmtkError, match="outside the file"):
        read_info(path)
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as handle:
        handle.attrs["mmtk_format"] = 1
        handle["train"] = h5py.ExternalLink(str(path), "/train")
    with pytest.raises(MmtkError, match="links to another file"):
        read_info(linked)


def test_reliability_checkpoint_model_args_bomb_is_refused(tmp_path, sample_h5):
    from mmtk.predict import load_predictor

    honest = _tiny_checkpoint(tmp_path / "honest.pt")
    # the check passes real checkpoints; a model of other sizes than its name's is reported as what it is
    assert load_predictor(honest).model_name == "custom (multimae-tiny with width 64, 2 blocks, 2 heads)"

    forged = _tiny_checkpoint(tmp_path / "forged.pt", dim=8192, depth=48, num_heads=16)  # ~40 GB of weights
    assert forged.stat().st_size < 5 * 2**20
    before = _max_rss_bytes()
    with pytest.raises(MmtkError, match="corrupt or forged") as err:
        load_predictor(forged)
    assert "model_args describe a model of" in str(err.value)
    code, output = invoke("eval", "--checkpoint", forged, "--data", sample_h5)
    assert code == 2 and "corrupt or forged" in _one_error_line(output)
    assert _max_rss_bytes() - before < 500 * 2**20

    for args, expected in ((dict(depth=10**9), "outside the plausible"), (dict(dim="wide"), "outside the plausible"),
                           (dict(image_size=[64, 60]), "do not describe a model")):
        with pytest.raises(MmtkError, match=expected):
            load_predictor(_tiny_checkpoint(tmp_path / "bad.pt", **args))


def _image_msg(**fields):
    from types import SimpleNamespace

    base = dict(encoding="rgb8", height=4, width=5, step=15, is_bigendian=0, data=np.zeros(60, np.uint8))
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("fields, expected", [
    (dict(step=10), "step is shorter than a row"),                    # step < width x channels
    (dict(data=np.zeros(61, np.uint8)), "expected height x step = 60"),
    (dict(height=2**31, step=15), "height and width must be"),
    (dict(encoding="16UC1", step=8, data=np.zeros(32, np.uint8)), "step is shorter than a row"),
])
def test_reliability_ros_image_fields_are_checked(fields, expected):
    from mmtk.data.sources.ros.images import decode_image

    role = "depth" if fields.get("encoding") == "16UC1" else "rgb"
    with pytest.raises(MmtkError, match=expected):
        decode_image(_image_msg(**fields), "sensor_msgs/msg/Image", role, None)


def test_reliability_bag_message_declaring_4gb_is_one_line(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Image_, Header, Time = (store.types[t] for t in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                     "builtin_interfaces/msg/Time"))
    bag = tmp_path / "bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        rgb = writer.add_connection("/rgb", "sensor_msgs/msg/Image", typestore=store)
        depth = writer.add_connection("/depth", "sensor_msgs/msg/Image", typestore=store)
        header = Header(stamp=Time(sec=1, nanosec=0), frame_id="cam")
        raw = bytearray(store.serialize_cdr(Image_(header, 8, 8, "rgb8", 0, 24, np.zeros(192, np.uint8)), rgb.msgtype))
        at = len(raw) - 192 - 4
        assert struct.unpack_from("<I", raw, at)[0] == 192
        raw[at:at + 4] = struct.pack("<I", 0xFFFFFFF0)  # the data field claims 4 GB
        writer.write(rgb, 10**9, bytes(raw))
        writer.write(depth, 10**9, store.serialize_cdr(Image_(header, 8, 8, "16UC1", 0, 16, np.full(128, 7, np.uint8)),
                                                         depth.msgtype))
    code, output = invoke("convert", "--rosbag", bag, tmp_path / "out.h5", "--rgb-topic", "/rgb",
                          "--depth-topic", "/depth", "--no-progress")
    assert code == 2 and "cannot be decoded" in _one_error_line(output)
    assert _temps(tmp_path) == []


# ------------------------------------------------------------------------------------ item 7: resume

def _pretrain(data: Path, out: Path, *extra: str, steps: int = 2) -> tuple[int, str]:
    sets = TINY + ["optim.batch_size=2", f"train.max_steps={steps}", "train.ckpt_every=1", "model.num_visible=12"]
    return invoke("pretrain", RECIPES / "tiny.yaml", "--data", data, "--out", out, *[f"--set={s}" for s in sets],
                  *extra)


def test_reliability_resume_of_a_missing_folder_creates_nothing(tmp_path, sample_h5):
    out = tmp_path / "no_such_run"
    code, output = _pretrain(sample_h5, out, "--resume")
    assert code == 2 and "does not exist" in _one_error_line(output)
    assert not out.exists()


def test_reliability_resume_after_a_kill_before_last_pt_uses_the_newest_checkpoint(tmp_path, sample_h5):
    from mmtk.train.checkpoint import checkpoint_paths
    from mmtk.train.engine import read_metrics

    run = tmp_path / "run"
    code, output = _pretrain(sample_h5, run)
    assert code == 0, output
    first, second = checkpoint_paths(run)
    # The kill: step 2 was published but last.pt still points at step 1.
    os.unlink(run / "last.pt")
    os.link(first, run / "last.pt")
    code, output = _pretrain(sample_h5, run, "--resume", steps=3)
    assert code == 0, output
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # continued from step 2, not from last.pt's step 1
    assert os.path.samefile(run / "last.pt", checkpoint_paths(run)[-1])
    # And a resume with nothing left to train still repairs a stale last.pt.
    os.unlink(run / "last.pt")
    os.link(second, run / "last.pt")
    code, output = _pretrain(sample_h5, run, "--resume", steps=3)
    assert code == 0, output
    assert os.path.samefile(run / "last.pt", checkpoint_paths(run)[-1])


# ------------------------------------------------- issue 20: checkpoints, SIGTERM, resume, output names

def _flip_bytes_of(path: Path, tensor: torch.Tensor, count: int = 4) -> None:
    """Flip ``count`` bytes inside ``tensor``'s data where it is stored in the checkpoint file ``path``."""
    raw = bytearray(path.read_bytes())
    stored = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(stored[:256])
    assert at > 0 and raw.find(stored[:256], at + 1) == -1, "the tensor's bytes must be found once"
    for offset in range(count):
        raw[at + 8 + 16 * offset] ^= 0x40
    path.write_bytes(bytes(raw))  # in place: last.pt, a hard link to it, is damaged too


def test_reliability_checkpoint_with_flipped_bytes_is_refused_naming_the_older_intact_one(tmp_path, sample_h5,
                                                                                          capsys, monkeypatch):
    """Issue 20 item 4: four flipped bytes in the weights, or in the optimizer's exp_avg_sq, no longer load silently;
    the CLI's one line names the file and the older intact checkpoint. Weights without a digest still load."""
    from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
    from mmtk.errors import CorruptCheckpoint
    from mmtk.weights.files import read_state_dict

    run = tmp_path / "run"
    code, output = _pretrain(sample_h5, run)
    assert code == 0, output
    older, newest = checkpoint_paths(run)
    state = load_checkpoint(newest)
    assert isinstance(state["sha256"], str) and len(state["sha256"]) == 64
    _flip_bytes_of(newest, state["model"]["encoder.blocks.0.mlp.fc1.weight"])
    with pytest.raises(CorruptCheckpoint, match="no longer matches the SHA-256"):
        load_checkpoint(newest)
    code, out, err = run_cli(["eval", "--run", run, "--data", sample_h5, "--inputs", "rgb"], capsys, monkeypatch)
    line = _one_error_line(out + err)
    assert code == 2 and f"{run / 'last.pt'} is corrupt" in line and f"use the older intact {older} instead" in line

    moments = older.with_name("moments.pt")
    moments.write_bytes(older.read_bytes())
    exp_avg_sq = next(entry["exp_avg_sq"] for entry in load_checkpoint(moments)["optimizer"]["state"].values())
    _flip_bytes_of(moments, exp_avg_sq)
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {moments} is corrupt"):
        load_checkpoint(moments)

    foreign = tmp_path / "foreign.pt"  # official and timm files carry no digest: they load as before
    torch.save({"model": {key: value for key, value in state["model"].items()}}, foreign)
    assert set(read_state_dict(foreign)) == {"model"}


def test_reliability_sigterm_saves_a_checkpoint_and_says_where_it_stopped(tmp_path, sample_h5):
    """Issue 20 item 6: SIGTERM (SLURM, Kubernetes) is a save point like Ctrl-C: the step under way finishes, a
    checkpoint is written, `stopped at step N` names the resume command, and the exit status is 143. Sent to the
    whole process group, as a scheduler may, the loader's worker process ignores it and the main process decides."""
    import time

    from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
    from mmtk.train.engine import read_metrics

    out = tmp_path / "run"
    sets = TINY + ["optim.batch_size=2", "optim.epochs=500", "model.num_visible=12", "train.ckpt_every=100000",
                   "data.num_workers=1"]
    command = [PYTHON, "-c", "from mmtk.cli.main import main; main()", "pretrain", str(RECIPES / "tiny.yaml"),
               "--data", str(sample_h5), "--out", str(out), *[f"--set={value}" for value in sets]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not read_metrics(out):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before SIGTERM"
    os.killpg(process.pid, signal.SIGTERM)  # the run and its loader worker
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert "SIGTERM: finishing this step" in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped at step ")]
    assert stopped and stopped[0].endswith("--resume"), err
    step = int(stopped[0].split()[3].rstrip(";"))
    assert [path.name for path in checkpoint_paths(out)] == [f"step_{step:08d}.pt"]
    assert load_checkpoint(checkpoint_paths(out)[-1])["step"] == step


def test_reliability_resume_after_editing_the_runs_recipe_is_refused_naming_the_edit(tmp_path, sample_h5):
    """Issue 20 item 7: an edited RUN/recipe.yaml is neither ignored nor overwritten by --resume: refused in one
    line naming the changed keys and the command that applies them; that command resumes with the edit."""
    from mmtk.train.engine import read_metrics

    run = tmp_path / "run"
    assert _pretrain(sample_h5, run)[0] == 0
    recipe = run / "recipe.yaml"
    edited = recipe.read_text().replace("max_steps: 2", "max_steps: 3").replace("log_every: 1", "log_every: 5")
    assert edited != recipe.read_text()
    recipe.write_text(edited)
    code, output = _pretrain(sample_h5, run, "--resume")
    line = _one_error_line(output)
    assert code == 2 and f"{recipe} was edited after step 2 was written" in line
    assert "train.max_steps 2 -> 3" in line and "train.log_every 1 -> 5" in line
    assert f"mmtk pretrain {recipe} --out {run} --resume" in line
    assert recipe.read_text() == edited  # not overwritten
    code, output = invoke("pretrain", recipe, "--out", run, "--resume")
    assert code == 0, output
    assert [record["step"] for record in read_metrics(run)] == [1, 2, 3]


def test_reliability_resume_falls_back_to_the_older_intact_checkpoint_and_names_contradictions(tmp_path, sample_h5):
    """Issue 20 item 11: a truncated newest checkpoint on --resume: the older intact one is used, with a note; a
    recipe that contradicts the checkpoint says which setting contradicts which file (not '<state dict>')."""
    from mmtk.train.checkpoint import checkpoint_paths
    from mmtk.train.engine import read_metrics

    run = tmp_path / "run"
    assert _pretrain(sample_h5, run)[0] == 0
    older, newest = checkpoint_paths(run)
    code, output = _pretrain(sample_h5, run, "--set=model.overrides.dim=32", "--resume", steps=3)
    line = _one_error_line(output)
    assert code == 2 and "model.overrides.dim 64 -> 32" in line and f"contradicts checkpoint {newest}" in line
    assert "<state dict>" not in line
    code, output = _pretrain(sample_h5, run, "--set=train.seed=7", "--resume", steps=3)  # data order and masks
    assert code == 2 and "train.seed 0 -> 7" in _one_error_line(output)

    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a kill mid-copy, a full disk
    code, output = _pretrain(sample_h5, run, "--resume", steps=3)
    assert code == 0, output
    assert f"note: {newest.name} is unreadable" in output
    assert f"resuming from the older intact {older.name} (step 1) instead" in output
    assert [record["step"] for record in read_metrics(run)] == [1, 2, 3]


def test_reliability_out_that_is_a_file_is_one_line(tmp_path, sample_h5):
    """Issue 20 item 8: --out naming a file (or a folder under a file) is one line, not a FileExistsError."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "run"):
        code, output = _pretrain(sample_h5, out)
        assert code == 2 and f"{afile} is a file, not a folder" in _one_error_line(output)
    assert afile.read_text() == "mine"


def test_reliability_long_output_names_get_temporary_names_that_fit(tmp_path):
    """Issue 20 item 9: a 245-character output name (legal) is written; its temporary name fits NAME_MAX."""
    from mmtk.io import atomic_path, atomic_write_text, is_temp_name

    name = "n" * 240 + ".json"
    assert len(name) == 245
    atomic_write_text(tmp_path / name, "{}")
    assert (tmp_path / name).read_text() == "{}" and _temps(tmp_path) == []
    with atomic_path(tmp_path / ("m" * 250 + ".onnx"), suffix=".onnx") as tmp:
        assert len(tmp.name) <= 255 and is_temp_name(tmp.name) and tmp.name.endswith(".onnx")
        other = tmp
    with atomic_path(tmp_path / ("m" * 249 + "x.onnx"), suffix=".onnx") as tmp:
        assert tmp.name.split(".tmp-")[0] != other.name.split(".tmp-")[0]  # distinct targets, distinct names


# ---------------------------------------------------------------------------------------- fuzz tests

from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

DTYPES = st.sampled_from(["u1", "u2", "i8", "f4", "f8"])


LAYOUT = {"rgb": ((3,), "u1"), "depth": ((), "f4"), "semseg": ((), "u1"), "intrinsics": None, "timestamp": None}


@st.composite
def h5_specs(draw):
    """Mostly the documented layout (so reading really runs), sometimes any shape and dtype; random attrs."""
    datasets = {}
    height, width = draw(st.sampled_from([1, 8, 16] * 3 + [40000])), draw(st.sampled_from([1, 8, 16]))
    frames = draw(st.sampled_from([1, 2, 3] * 3 + [0, 2**20, 2**40]))
    names = draw(st.lists(st.sampled_from(list(LAYOUT)), unique=True, min_size=1, max_size=5))
    if draw(st.integers(0, 4)):
        names = list(dict.fromkeys(["rgb", "depth", *names]))
    for name in names:
        if draw(st.integers(0, 9)):  # the documented layout
            fixed = {"intrinsics": ((frames, 3, 3), "f4"), "timestamp": ((frames,), "f8")}.get(name)
            shape = fixed[0] if fixed else (frames, height, width, *LAYOUT[name][0])
            dtype = fixed[1] if fixed else draw(st.sampled_from([LAYOUT[name][1]] * 5 + ["f8"]))
        else:
            ndim = draw(st.integers(1, 4))
            shape = (frames, *[draw(st.sampled_from([1, 3, 8, 40000])) for _ in range(ndim - 1)])
            dtype = draw(DTYPES)
        attrs = {} if draw(st.integers(0, 2)) else draw(st.dictionaries(
            st.sampled_from(["valid_fraction", "min_m", "max_m", "classes", "histogram", "units"]),
            st.one_of(st.floats(allow_nan=True), st.text(max_size=8), st.just('["wall", "floor"]'),
                      st.lists(st.integers(-5, 2**40), max_size=5)), max_size=4))
        datasets[name] = (shape, dtype, attrs, draw(st.integers(0, 3)))
    root = draw(st.sampled_from([1] * 8 + [0, 99, "1", None]))
    return root, draw(st.sampled_from(["train"] * 4 + ["test"])), datasets


def _write_spec(path: Path, spec) -> None:
    root, split, datasets = spec
    with h5py.File(path, "w") as handle:
        if root is not None:
            handle.attrs["mmtk_format"] = root
        group = handle.create_group(split)
        for name, (shape, dtype, attrs, written) in datasets.items():
            try:
                dataset = group.create_dataset(name, shape=shape, dtype=dtype, maxshape=(None, *shape[1:]),
                                               chunks=(1, *[max(1, min(s, 64)) for s in shape[1:]]))
            except (ValueError, OSError):  # h5py refuses some shapes itself
                continue
            if 0 < shape[0] and np.prod(shape[1:]) * 8 < 2**16:
                for index in range(min(written, shape[0])):
                    dataset[index] = np.random.default_rng(index).integers(0, 9, size=shape[1:])
            for key, value in attrs.items():
                with contextlib.suppress(TypeError, ValueError, OverflowError):  # values HDF5 cannot store
                    dataset.attrs[key] = value


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h5_specs(), st.sampled_from([("rgb",), ("rgb", "depth"), ("rgb", "depth", "semseg")]))
def test_reliability_fuzz_hdf5_attrs_and_shapes(spec, modalities):
    from mmtk.data import H5Dataset, format_info, read_info

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.h5"
        _write_spec(path, spec)
        try:
            format_info(read_info(path))
            event("info: read")
        except MmtkError:
            event("info: refused")
        try:
            dataset = H5Dataset(path, spec[1], modalities, image_size=(16, 16))
            dataset[len(dataset) - 1]
            event("dataset: read a frame")
        except MmtkError:
            event("dataset: refused")


@settings(max_examples=150, deadline=None)
@given(encoding=st.sampled_from(["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "16UC1", "mono16", "32FC1", "yuv422",
                                 ""]),
       height=st.integers(-2, 2**33), width=st.integers(-2, 2**33), step=st.integers(-2, 2**33),
       length=st.integers(0, 4096), big=st.booleans(), role=st.sampled_from(["rgb", "depth"]),
       small=st.booleans())
def test_reliability_fuzz_bag_image_fields(encoding, height, width, step, length, big, role, small):
    from mmtk.data.sources.ros.images import decode_image

    if small:  # also explore the plausible corner, where decoding really runs
        height, width, step = height % 9, width % 9, step % 40
    msg = _image_msg(encoding=encoding, height=height, width=width, step=step, is_bigendian=int(big),
                     data=np.arange(length, dtype=np.uint8))
    with contextlib.suppress(MmtkError):
        decode_image(msg, "sensor_msgs/msg/Image", role, None)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.sampled_from(["dim", "depth", "num_heads", "patch_size", "image_size", "decoder_dim",
                                        "num_classes", "inputs", "hooks", "mlp_ratio", "head", "task",
                                        "main_inputs", "unknown"]),
                       st.one_of(st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=4),
                                 st.lists(st.integers(-3, 300), max_size=70)), max_size=3))
def test_reliability_fuzz_checkpoint_model_args(overrides):
    import mmtk

    args = {"dim": 64, "depth": 1, "num_heads": 2, "image_size": [32, 32], "inputs": ["rgb"], "outputs": []}
    model = mmtk.create_model("multimae-tiny", verbose=False, **args)  # real tensors: the file's args are forged
    state = {"model_name": "multimae-tiny", "model": model.state_dict(), "model_args": {**args, **overrides}}
    try:
        mmtk.create_model(pretrained=state, verbose=False)  # refuses in one line naming the file, or builds the model
    except MmtkError as err:
        assert "\n" not in str(err) and "<state dict>" in str(err), str(err)



def test_reliability_a_second_sigterm_stops_at_once_with_its_own_exit_status(tmp_path, sample_h5, monkeypatch):
    """A second SIGTERM (a scheduler's kill after its grace period) stops mid-step like a second Ctrl-C, and the exit
    status still says SIGTERM (143), not Ctrl-C (130)."""
    import mmtk.train.run
    from mmtk.train.engine import StopRequest, StoppedAtOnce

    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)  # the first: a save point
    assert stop.requested and stop.signum == signal.SIGTERM
    with pytest.raises(StoppedAtOnce) as raised:
        stop._handle(signal.SIGTERM, None)
    assert raised.value.signum == signal.SIGTERM and isinstance(raised.value, KeyboardInterrupt)

    def killed(*args, **kwargs):
        raise StoppedAtOnce(signal.SIGTERM)

    monkeypatch.setattr(mmtk.train.run, "run_training", killed)
    code, output = _pretrain(sample_h5, tmp_path / "run")
    assert code == 143 and "stopped at once; no checkpoint was written yet" in output, output
