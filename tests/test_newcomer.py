"""A newcomer's first hour (issue 11): recipes by name from any folder, runs found by eval, the memory check,
Ctrl-C as a save point, a progress line that fits 80 columns, messages that name the fix for that command."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import (CLI, ONE_THREAD_ENV, REPO, TINY, TINY_SEMSEG, one_thread, run_cli, sample_h5,  # noqa: F401
                            sync_h5)
from mmtk.errors import MmtkError

FAST = TINY + ["optim.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0", "train.max_steps=2"]


def sets(values: list[str]) -> list[str]:
    return [f"--set={value}" for value in values]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A fresh work folder of the user's own (not the repository) as the current folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Recipes travel with the package


def test_recipes_listed_shown_and_started_from(work, sample_h5):
    from mmtk.config import shipped_recipes

    code, output = run_cli("recipes")
    assert code == 0, output
    for name, description in shipped_recipes().items():
        assert any(line.startswith(name + " ") and description in line for line in output.splitlines())
    assert {"tiny", "base", "tiny_finetune_semseg"} <= set(shipped_recipes())
    code, text = run_cli("recipes", "show", "tiny")
    assert code == 0 and "kind: pretrain" in text
    (work / "my.yaml").write_text(text)  # `mmtk recipes show tiny > my.yaml`
    code, output = run_cli("pretrain", "my.yaml", "--data", sample_h5, "--out", "mine", *sets(FAST))
    assert code == 0, output
    assert (work / "mine" / "last.pt").is_file()
    code, output = run_cli("pretrain", "recipes/tiny.yaml", "--data", sample_h5)
    assert code == 2 and "shipped recipes are given by name: tiny" in output


def test_shipped_recipes_are_the_top_level_recipes_folder(sample_h5, tmp_path, monkeypatch):
    """Issue 20 item 13: `mmtk pretrain recipes/base.yaml` works from the repository root, and names the same
    recipe as `mmtk pretrain base` (the packaged copy is built from recipes/)."""
    from mmtk.config import load_recipe, shipped_recipes

    monkeypatch.chdir(REPO)
    assert sorted(shipped_recipes()) == sorted(path.stem for path in (REPO / "recipes").glob("*.yaml"))
    assert load_recipe("recipes/base.yaml", data_path=sample_h5) == load_recipe("base", data_path=sample_h5)
    code, output = run_cli("pretrain", "recipes/tiny.yaml", "--data", sample_h5, "--out", tmp_path / "run",
                           *sets(FAST))
    assert code == 0, output
    assert (tmp_path / "run" / "last.pt").is_file()


def _see_these_dependencies(venv: Path) -> None:
    """Let a throwaway venv import the dependencies this interpreter sees, whether they lie in a venv of its own
    (as scripts/setup.sh advises: `--system-site-packages` would reach past it to the base interpreter) or in
    the interpreter's own site-packages. A .pth file lists the folders; .pth files inside them (an editable mmtk)
    are not run, so the venv's installed mmtk is the one imported."""
    import sysconfig

    folders = [entry for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))]
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "outer-dependencies.pth").write_text("".join(folder + "\n" for folder in folders))


def test_wheel_install_runs_a_shipped_recipe_by_name_from_any_folder(tmp_path, sample_h5):
    """Build the wheel, install it in a throwaway venv and train with `mmtk pretrain tiny` outside the repo."""
    pip = Path(sys.executable).with_name("pip")
    built = subprocess.run([str(pip), "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "Could not find a version" in built.stderr:
        pytest.skip("no package index reachable to fetch the build backend")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("mmtk-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    _see_these_dependencies(venv)
    subprocess.run([str(pip), "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**ONE_THREAD_ENV, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("PYTHONPATH", None)

    def mmtk(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "mmtk"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mmtk; print(mmtk.__file__)"], cwd=cwd,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed package, not the repository
    assert "tiny " in mmtk("recipes")
    output = mmtk("pretrain", "tiny", "--data", str(sample_h5), *sets(FAST))
    assert "pretrain done: 2 steps" in output
    assert (cwd / "runs" / "tiny" / "last.pt").is_file()


# ---------------------------------------------------------------------------------------------
# Runs are found


def test_eval_finds_the_run_made_with_out(work, sample_h5, tmp_path):
    import shutil

    shutil.copy(sample_h5, work / "out.h5")
    elsewhere = tmp_path / "somewhere" / "run1"
    code, output = run_cli("pretrain", "tiny", "--data", "out.h5", "--out", elsewhere, *sets(FAST))  # relative --data
    assert code == 0, output
    code, output = run_cli("eval", "--inputs", "rgb,depth")
    assert code == 0, output
    assert f"checkpoint: {elsewhere / 'last.pt'} (the newest run trained from this folder" in output
    assert f"data: {work / 'out.h5'} (the file the run trained on)" in output
    assert "1 frame evaluated" in output
    os.chdir(tmp_path)  # another folder: the run folder records absolute paths
    for option in ("--run", "--checkpoint"):
        code, output = run_cli("eval", option, elsewhere, "--inputs", "rgb")
        assert code == 0 and "1 frame evaluated" in output, output
    code, output = run_cli("eval", "--inputs", "rgb")  # nothing was trained from this folder
    assert code == 2 and "no run was trained from this folder" in output and "--run RUN_FOLDER" in output


# ---------------------------------------------------------------------------------------------
# The machine is told the truth


def _tiny_run_parts(sample_h5, overrides: list[str]):
    import mmtk
    from mmtk.config import load_recipe
    from mmtk.runtime import setup_distributed
    from mmtk.train.run import _prepare, model_args, pretrain_loss_fn

    recipe = load_recipe("tiny", TINY + overrides, data_path=str(sample_h5))
    info, train_set = _prepare(recipe)
    model = mmtk.create_model(recipe.model.name, verbose=False, **model_args(recipe, info))
    return recipe, model, train_set, pretrain_loss_fn(), setup_distributed("cpu")


def test_memory_check_refuses_a_micro_batch_that_does_not_fit(sample_h5, monkeypatch, tmp_path):
    from mmtk.train import memory
    from mmtk.train.settings import train_settings

    recipe, model, train_set, loss, info = _tiny_run_parts(sample_h5, ["optim.batch_size=8", "optim.micro_batch=8"])
    estimate = memory.estimate_memory(model, loss, train_set, info.device, recipe.train.precision)
    assert estimate.model == 16 * sum(p.numel() for p in model.parameters()) and estimate.per_image > 0
    # The machine has room for 4 images per micro-step, not 8.
    available = (estimate.total(4, 0) + estimate.total(8, 0)) / 2 / 0.9
    monkeypatch.setattr(memory, "available_memory", lambda device: int(available))
    with pytest.raises(MmtkError) as refused:
        memory.plan_memory(model, loss, train_set, train_settings(recipe).feed, recipe.train.precision, info)
    message = str(refused.value)
    assert "\n" not in message
    assert f"a micro-step of 8 images needs about {estimate.total(8, 0) / 1e9:.1f} GB" in message
    assert f"but {int(0.9 * int(available)) / 1e9:.1f} GB is usable on cpu" in message
    assert "use --set optim.micro_batch=4 (or --set optim.micro_batch=auto)" in message
    recipe.optim.micro_batch = "auto"  # picks the largest that fits
    assert memory.plan_memory(model, loss, train_set, train_settings(recipe).feed, recipe.train.precision,
                              info) == (4, 0)

    # Through the CLI: one line, and nothing written.
    monkeypatch.setattr(memory, "available_memory", lambda device: 10**6)
    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", tmp_path / "run", *sets(FAST))
    assert code == 2 and "even 1 image per micro-step does not fit" in output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [output.strip().splitlines()[-1]]
    assert not (tmp_path / "run").exists()


def test_loader_workers_default_from_the_machine(monkeypatch):
    from mmtk.config import DataConfig, loader_workers

    assert DataConfig().num_workers == "auto"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers("auto", "cuda") == 8 and loader_workers("auto", "cuda", processes=8) == 1
    assert loader_workers("auto", "cpu") == 4 and loader_workers(3, "cpu") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers("auto", "cpu") == 0 and loader_workers("auto", "cuda") == 1


# ---------------------------------------------------------------------------------------------
# Ctrl-C is a save point


def test_ctrl_c_saves_a_resumable_checkpoint(sample_h5, tmp_path):
    from mmtk.train.checkpoint import checkpoint_paths, load_checkpoint
    from mmtk.train.engine import read_metrics

    out = tmp_path / "run"
    command = CLI + ["pretrain", "tiny", "--data", str(sample_h5), "--out", str(out),
                     *sets(TINY + ["optim.batch_size=4", "optim.epochs=500"])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not read_metrics(out):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before Ctrl-C"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped at step ")]
    assert stopped, err
    step = int(stopped[0].split()[3].rstrip(";"))
    assert step >= 1 and "; resume with: mmtk pretrain tiny " in stopped[0] and stopped[0].endswith("--resume")
    assert load_checkpoint(checkpoint_paths(out)[-1])["step"] == step
    resume = shlex.split(stopped[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["mmtk", "pretrain"]
    resumed = subprocess.run(CLI + resume[1:] + [f"--set=train.max_steps={step + 1}"], capture_output=True,
                             text=True, timeout=300, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step} of" in resumed.stderr
    assert load_checkpoint(checkpoint_paths(out)[-1])["step"] == step + 1


def test_ctrl_c_writes_one_checkpoint_with_logging_off_and_at_the_last_step(sample_h5, tmp_path, one_thread):
    """A Ctrl-C inside step 2 of 3 with no step logged stops after step 2 with its one checkpoint; one inside the
    last step finishes the run as usual: one checkpoint, the final one, and no interruption."""
    from mmtk.train.checkpoint import checkpoint_paths
    from mmtk.train.engine import TrainingInterrupted, train
    from mmtk.train.settings import train_settings

    def run(stop_in_step: int, out: Path):
        recipe, model, train_set, loss_fn, _ = _tiny_run_parts(
            sample_h5, ["optim.batch_size=4", "optim.epochs=10", "train.max_steps=3", "train.log_every=100",
                        "train.ckpt_every=100", "train.device=cpu"])
        steps = [0]

        def compute_loss(model, batch):
            steps[0] += model.training  # not the memory check's forward passes (in eval mode)
            if steps[0] == stop_in_step:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once, in this (main) thread
            return loss_fn(model, batch)

        return train(train_settings(recipe), out, model, train_set, compute_loss)

    with pytest.raises(TrainingInterrupted) as stopped:
        run(2, tmp_path / "mid")
    assert stopped.value.step == 2 and stopped.value.checkpoint == checkpoint_paths(tmp_path / "mid")[-1]
    assert [path.name for path in checkpoint_paths(tmp_path / "mid")] == ["step_00000002.pt"]
    try:
        finished = run(3, tmp_path / "last")
    except TrainingInterrupted as stop:  # a KeyboardInterrupt: pytest would end the session instead of failing
        pytest.fail(f"a Ctrl-C in the last step interrupted the finished run: {stop}")
    assert finished.steps == 3
    assert [path.name for path in checkpoint_paths(tmp_path / "last")] == ["step_00000003.pt"]


def test_second_ctrl_c_stops_at_once(capsys):
    import torch

    from mmtk.train.engine import StopRequest
    from mmtk.runtime import DistInfo

    before = signal.getsignal(signal.SIGINT)
    info = DistInfo(0, 1, 0, None)
    with StopRequest() as request:
        assert not request.agreed(float(request.flag(torch.device("cpu"))), info)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (main) thread right away
        assert request.agreed(float(request.flag(torch.device("cpu"))), info)
        assert request.agreed(0.0, info)  # one process: a request after the step's reduction counts too
        assert not request.agreed(0.0, DistInfo(0, 2, 0, None))  # several: only what the reduction carried
        assert "finishing this step and writing a checkpoint (Ctrl-C again stops at once)" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------
# Progress that fits


def test_progress_line_at_80_columns_keeps_step_rate_and_eta():
    from mmtk.progress import format_eta, progress_text

    losses = {"loss": 12.3102, "rgb": 3.0925, "norm_rgb": 3.1, "depth": 2.9, "semseg": 3.2}
    line = progress_text(1234, 1600, 0, 8, 95.3, 3723, losses, 1.56e-4, 79)
    assert len(line) <= 79
    assert line.startswith("step 1234/1600 ") and "95.3 img/s" in line and "eta 1:02:03" in line
    assert "semseg" not in line  # task losses drop first
    narrow = progress_text(3, 1600, 5, 8, 2.5, 7 * 3600, losses, 1.56e-4, 50)
    assert narrow == "step 3/1600 micro 5/8 2.5 img/s eta 7:00:00" and "loss" not in narrow
    wide = progress_text(1234, 1600, 0, 8, 95.3, 3723, losses, 1.56e-4, 200)
    assert all(f"{name} {value:.4f}" in wide for name, value in losses.items()) and "lr 1.56e-04" in wide
    assert format_eta(float("nan")) == "eta --"


def test_plain_progress_lines_when_not_a_terminal(sample_h5, tmp_path):
    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", tmp_path / "run",
                           *sets(FAST + ["optim.epochs=5", "train.max_steps=3"]))
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(" img/s eta " in line and "loss " in line for line in lines)
    assert "\r" not in output and "\x1b[" not in output


# ---------------------------------------------------------------------------------------------
# Messages that name the real problem and a fix that exists for that command


def test_messages_name_the_fix_of_that_command(work, sample_h5, sync_h5):
    code, output = run_cli("convert", "--rgbd", REPO / "samples" / "nyuv2_multimae", sample_h5, "--no-progress")
    assert code == 2 and "already exists; add --force" in output and "force=True" not in output

    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, *sets(FAST + ["data.train_split=nope"]))
    assert code == 2 and "--set data.train_split=NAME" in output and "--split" not in output

    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", "pre", *sets(FAST))
    assert code == 0, output
    code, output = run_cli("eval", "--run", "pre", "--data", sync_h5, "--split", "all")  # no semseg in that file
    assert code == 2 and "pass --data with a file that has it" in output and "--set" not in output

    (work / "empty").mkdir()
    code, output = run_cli("eval", "--checkpoint", "empty")
    assert code == 2 and "this folder holds no checkpoint" in output and "does not exist" not in output

    code, output = run_cli("finetune", "tiny_finetune_semseg", "--init", sample_h5, "--data", sample_h5)
    assert code == 2 and "is an HDF5 data file" in output and "corrupt" not in output

    code, output = run_cli("finetune", "tiny_finetune_semseg", "--init", "pre", "--data", sample_h5, "--out", "ft",
                           *sets(TINY_SEMSEG + ["optim.batch_size=4", "train.max_steps=1"]))
    assert code == 0, output
    report = next(line for line in output.splitlines() if line.startswith("init from "))
    parts = report.split(": ", 1)[1].split("; ")
    assert parts[1].startswith("encoder: all ") and parts[1].endswith(" loaded")
    assert parts[2].startswith("pretraining decoders: ") and parts[2].endswith(" not used (expected when finetuning)")
    assert parts[3] == "tokenizers of semseg: 4 not used (this model's inputs are rgb, depth)"
    assert parts[4].startswith("head: ") and parts[4].endswith(" new")


# ---------------------------------------------------------------------------------------------
# Degenerate settings refused


def test_degenerate_budgets_and_sizes_are_refused():
    import mmtk
    from helpers import random_batch

    model = mmtk.create_model("multimae-tiny", verbose=False)  # 98 visible tokens, sized for 224 px
    with pytest.raises(MmtkError, match=r"visible budget 98 for inputs with 48 tokens .* must be 1 to 47"):
        model(random_batch(1, (64, 64), num_classes=40))
    with pytest.raises(MmtkError, match="num_visible 0: the encoder would see no token"):
        mmtk.create_model("multimae-tiny", image_size=64, num_visible=0, verbose=False)
    with pytest.raises(MmtkError, match="image size 8x8 px is smaller than one 16 px patch"):
        mmtk.create_model("multimae-tiny", image_size=8, verbose=False)


# ---------------------------------------------------------------------------------------------
# Output files


def test_point_cloud_files_get_the_users_umask(tmp_path):
    from mmtk.pointcloud import PointCloud, write_cloud

    previous = os.umask(0o022)
    try:
        write_cloud(tmp_path / "c.ply", PointCloud(np.random.default_rng(0).random((10, 3)).astype(np.float32)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "c.ply").stat().st_mode) == 0o644


# ---------------------------------------------------------------------------------------------
# Issue 20: a newcomer's first hour, continued


def test_export_takes_a_run_folder_as_eval_and_predict_do(tmp_path):
    """Issue 20 item 14: `mmtk export RUN --onnx ...` exports the run's newest checkpoint."""
    import importlib.util

    import torch

    import mmtk
    from mmtk.train.checkpoint import link_last, save_checkpoint

    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("ONNX export is an optional extra (mmtk[onnx])")
    args = dict(dim=64, depth=2, num_heads=2, image_size=(32, 32), num_classes=5, head="convnext", task="semseg",
                inputs=("rgb",), convnext_dim=64, convnext_depth=1)
    model = mmtk.create_model("multimae-tiny", verbose=False, **args)
    run = tmp_path / "run"
    link_last(save_checkpoint({"model_name": "multimae-tiny", "model_args": args, "model": model.state_dict()},
                              run / "checkpoints" / "step_00000001.pt"))
    out = tmp_path / "model.onnx"
    code, output = run_cli("export", run, "--onnx", out)
    assert code == 0, output
    assert out.is_file() and "max |onnxruntime - pytorch|" in output
    code, output = run_cli("export", tmp_path, "--onnx", out)  # a folder without checkpoints: one line
    assert code == 2 and "this folder holds no checkpoint" in output


def test_quick_commands_answer_without_importing_torch():
    """Issue 20 item 15: --help, --version, recipes, models and runs answer without importing torch (about a
    second), and `mmtk models`' fixed table is what the registry builds."""
    import torch

    import mmtk
    from mmtk.model.sizes import NAMED_MODELS, PARAMETERS

    for name in NAMED_MODELS:
        with torch.device("meta"):
            model = mmtk.create_model(name, verbose=False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMETERS[name], name
    probe = ("import sys\nfrom mmtk.cli.main import main\nsys.argv = ['mmtk', *sys.argv[1:]]\ntry:\n    main()\n"
             "except SystemExit as done:\n    assert done.code in (0, None), f'exit {done.code}'\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    for args in (["--help"], ["--version"], ["recipes"], ["models"], ["runs"], ["pretrain", "--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                              env={**ONE_THREAD_ENV, "COLUMNS": "120"})
        assert done.returncode == 0, (args, done.stderr[-2000:])
    done = subprocess.run([sys.executable, "-c", probe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(f"mmtk {mmtk.__version__} (torch ")


def test_help_reads_as_usual_and_devices_agree(monkeypatch):
    """Issue 20 item 15: no `<bool>` after flags, RECIPE / [OUT] in usage lines, --device on pretrain and finetune
    (the recipe's train.device), predict's --device defaults to auto as eval's, eval --batch-size has a text;
    counts are written '1 frame', '2 frames' (one helper)."""
    from mmtk.progress import counted

    monkeypatch.setenv("COLUMNS", "200")
    texts = {}
    for command in ("pretrain", "finetune", "predict", "eval", "convert"):
        code, texts[command] = run_cli(command, "--help")
        assert code == 0 and "<bool>" not in texts[command] and "{" not in texts[command].split("\n\n")[0]
    assert "mmtk pretrain [OPTIONS] RECIPE" in texts["pretrain"] and "mmtk convert [OPTIONS] [OUT]" in texts["convert"]
    code, text = run_cli("--help")
    assert code == 0 and "--version" in text and "<bool>" not in text
    for command in ("pretrain", "finetune"):
        assert "--device" in texts[command] and "train.device" in texts[command]
    for command in ("predict", "eval"):
        device_line = next(line for line in texts[command].splitlines() if "--device" in line)
        assert "[default: auto]" in device_line
    batch_line = next(line for line in texts["eval"].splitlines() if "--batch-size" in line)
    assert "Frames per forward pass" in batch_line
    assert (counted(1, "frame"), counted(2, "step"), counted(0, "frame")) == ("1 frame", "2 steps", "0 frames")


def test_pretrain_device_option_is_the_recipes_train_device(work, sample_h5):
    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", "run", "--device", "cpu", *sets(FAST))
    assert code == 0, output
    assert "pretrain done: 2 steps" in output
    assert "device: cpu" in (work / "run" / "recipe.yaml").read_text()


def test_one_name_is_one_model(sample_h5, tmp_path):
    """Issue 20 item 16: the tiny recipe's 4-block model is not reported as multimae-tiny (12 blocks)."""
    import mmtk
    from mmtk.train.checkpoint import load_checkpoint
    from mmtk.model.sizes import reported_name

    code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", tmp_path / "run",
                           *sets(["optim.batch_size=4", "train.max_steps=1", "data.num_workers=0"]))
    assert code == 0, output
    code, output = run_cli("weights", tmp_path / "run" / "last.pt")
    assert code == 0, output
    assert "model: custom (multimae-tiny with 4 blocks), width 192, 4 blocks" in output
    assert "model: multimae-tiny" not in output
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert mmtk.create_model(pretrained=state, verbose=False).model_name == "custom (multimae-tiny with 4 blocks)"
    assert reported_name("multimae-tiny", {"dim": 192, "depth": 12, "num_heads": 3}) == "multimae-tiny"
    assert reported_name("multimae-tiny", {"dim": 768, "depth": 12, "num_heads": 12}) == "multimae-base"
    assert reported_name(None, {"dim": 100, "depth": 3, "num_heads": 2}) == "custom"


def test_a_cpu_run_of_hours_says_so_and_ctrl_c_says_how_long_the_step_takes(capsys, monkeypatch):
    """Issue 20 item 17: after two micro-steps a CPU run estimated beyond an hour says so in one line, with what
    a GPU would take; the first Ctrl-C says how long finishing the step under way takes."""
    from mmtk import progress
    from mmtk.train.engine import StopRequest

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    line = progress.ProgressLine(True, stop=1600, accum=8, images_per_micro=256, on_cpu=True)
    line.live = None
    line.start(0)
    for micro in (1, 2):
        clock[0] += 256 / 2.0  # 2 images/s
        line.micro_step(0, micro)
    err = capsys.readouterr().err
    notes = [text for text in err.splitlines() if text.startswith("note: at 2.0 images/s")]
    assert len(notes) == 1 and "this CPU run needs about 19.0 days for its 1600 steps" in notes[0]
    assert "about 1700 images/s: about 32.1 min" in notes[0]
    assert abs(line.step_time_left() - 6 * 256 / 2.0) < 1e-6  # 6 micro-steps of the step left: 12.8 min
    with StopRequest(line.step_time_left):
        os.kill(os.getpid(), signal.SIGINT)
    assert "Ctrl-C: finishing this step (about 12.8 min more) and writing a checkpoint" in capsys.readouterr().err


def test_runs_lists_the_runs_trained(work, sample_h5, tmp_path, monkeypatch):
    """Issue 20 item 18: `mmtk runs` lists the runs of the index, newest first, with the newest checkpoint's step."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    code, output = run_cli("runs")
    assert code == 0 and "no runs recorded yet" in output
    for name in ("first", "second"):
        code, output = run_cli("pretrain", "tiny", "--data", sample_h5, "--out", name, *sets(FAST))
        assert code == 0, output
    code, output = run_cli("runs")
    rows = output.strip().splitlines()[1:]
    assert code == 0 and len(rows) == 2
    assert rows[0].split()[2:] == ["2", str(work / "second"), "*"] and rows[1].split()[2:4] == ["2", str(work / "first")]
