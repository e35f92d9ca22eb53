"""`create_model(pretrained=...)` is the one place a weights file's sizes are checked: every path that builds a
model from a file (library, `finetune --init`, `mmtk weights`, eval and predict) refuses a forged file in one
line before it allocates anything."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
import torch

import mmtk
import mmtk.io
from cli_helpers import invoke
from engine_helpers import sample_h5  # noqa: F401  (fixture)
from mmtk.config import shipped_recipes
from mmtk.train.checkpoint import save_checkpoint
from mmtk.errors import MmtkError

ARGS = dict(dim=64, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, image_size=[64, 64],
            inputs=["rgb", "depth"], outputs=["rgb", "depth"])


def _checkpoint(path: Path, state: dict | None = None, **model_args) -> Path:
    """A real tiny pretraining checkpoint whose recorded model_args are ARGS changed by `model_args`."""
    if state is None:
        state = mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict()
    save_checkpoint({"model_name": "multimae-tiny", "model_args": {**ARGS, **model_args}, "model": state,
                     "kind": "pretrain"}, path)
    return path


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("forged, expected", [
    (dict(dim=8192, depth=48, num_heads=16), "model_args describe a model of"),  # ~40 GB of weights in a 1 MB file
    (dict(depth=10**9), r"model_args.depth = 1000000000 is outside the plausible 0..256"),
    (dict(dim="wide"), r"model_args.dim = 'wide' is outside the plausible"),
    (dict(dim="w" * 10**5), r"model_args.dim = 'w{5,}\.\.\.w+' is outside the plausible"),  # shortened
    (dict(image_size=[64, 60]), "model_args do not describe a model .*not divisible by the patch size"),
    (dict(head="h" * 10**5), r"model_args do not describe a model \(.*h{100} \.\.\.\)$"),  # shortened
    (dict(alphas="many"), r"model_args do not describe a model \(alphas = 'many': the Dirichlet concentration"),
])
def test_create_model_refuses_forged_model_args_before_allocating(tmp_path, monkeypatch, forged, expected):
    import mmtk.registry as registry

    path = _checkpoint(tmp_path / "forged.pt", **forged)
    assert path.stat().st_size < 2 * 2**20
    devices = []  # where each model is built: only on the meta device (shapes, no memory) before the refusal
    build = registry.build_model
    monkeypatch.setattr(registry, "build_model", lambda config: devices.append(torch.empty(0).device.type)
                        or build(config))
    before = _max_rss_bytes()  # a high-water mark: meaningful when this test runs first
    with pytest.raises(mmtk.MmtkError, match=expected) as err:
        mmtk.create_model(pretrained=path, verbose=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 500
    assert set(devices) <= {"meta"} and _max_rss_bytes() - before < 200 * 2**20
    if "model of" in expected:
        assert "corrupt or forged" in str(err.value) and "GiB" in str(err.value)


def test_create_model_refuses_implausible_sizes_read_from_tensor_names(tmp_path):
    state = mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict()
    state["encoder.blocks.99999.norm1.weight"] = torch.ones(64)  # would make a 100000-block encoder
    path = tmp_path / "forged.pth"
    torch.save({"model": state}, path)  # no model_args: the sizes come from the tensors
    with pytest.raises(mmtk.MmtkError, match=r"depth \(read from its tensors\) = 100000 is outside the plausible"):
        mmtk.create_model(pretrained=path, verbose=False)


@pytest.mark.parametrize("name, value", [("encoder.blocks.0.attn.qkv.weight", torch.zeros(3)),
                                         ("encoder.tokenizers.rgb.pos_emb", torch.zeros(3)),
                                         ("encoder.blocks.0.mlp.fc1.weight", 5)])
def test_weights_with_a_forged_tensor_shape_are_refused_in_one_line(tmp_path, name, value):
    """The sizes read from the tensors' shapes are the file's too: a tensor of the wrong rank is one line."""
    state = mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict()
    state[name] = value
    path = tmp_path / "forged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(mmtk.MmtkError) as err:
        mmtk.create_model(pretrained=path, verbose=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    code, output = invoke("weights", path)
    assert code == 2 and str(path) in _one_error_line(output)


def test_a_checkpoint_whose_first_input_is_an_unloaded_plugin_names_the_plugin_file(tmp_path):
    """The modalities a checkpoint records are checked before its tensors are read by modality (the first
    tokenizer's stride): every path names the plugin file, not just 'unknown modality'. (lwir: a name no test
    registers; the plugin tests register an ir.)"""
    state = mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict()
    state = {name.replace("tokenizers.rgb.", "tokenizers.lwir.").replace("decoders.rgb.", "decoders.lwir."): tensor
             for name, tensor in state.items()}
    plugin = tmp_path / "lwir_adapter.py"
    checkpoint = {"model": state, "modalities": {"lwir": f"file:{plugin}", "depth": "mmtk"}}
    with pytest.raises(mmtk.MmtkError, match=re.escape(f"uses modality 'lwir' from the plugin {plugin}; pass --plugin")):
        mmtk.create_model(pretrained=checkpoint, verbose=False)


@pytest.mark.parametrize("entry", [dict(modalities=5), dict(modalities={"rgb": 5}), dict(data=[1]),
                                   dict(data={"class_names": 5}), dict(model_name=["x"]), dict(model_name=5)])
def test_predict_refuses_forged_checkpoint_entries_in_one_line(tmp_path, entry):
    from mmtk.registry import model_from_checkpoint

    path = _checkpoint(tmp_path / "forged.pt")
    checkpoint = {**torch.load(path, weights_only=True), **entry}
    checkpoint.pop("sha256")  # a forger drops the digest (or writes a matching one): the entries are checked still
    torch.save(checkpoint, path)
    with pytest.raises(mmtk.MmtkError, match="corrupt or forged") as err:
        model_from_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_model_from_checkpoint_takes_a_file_a_model_folder_and_a_run_folder(tmp_path):
    """One loader for what `--checkpoint` names: a file, a model folder (`mmtk weights --to`), and a run folder,
    whose newest checkpoint it reads (last.pt, else the highest step; RUN/checkpoints/ means the same run)."""
    from mmtk.registry import model_from_checkpoint
    from mmtk.weights.folders import write_model_folder

    older, newer = (mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict() for _ in range(2))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _checkpoint(run / "checkpoints" / "step_00000009.pt", older)
    _checkpoint(run / "checkpoints" / "step_00000010.pt", newer)  # newest by step, not by name order
    folder = write_model_folder(newer, tmp_path / "folder", "multimae-tiny", ARGS)

    def loads(source: Path, expected: dict) -> bool:
        return all(torch.equal(t, expected[k]) for k, t in model_from_checkpoint(source).state_dict().items())

    assert loads(run / "checkpoints" / "step_00000009.pt", older)
    assert loads(folder, newer) and loads(run, newer) and loads(run / "checkpoints", newer)
    _checkpoint(run / "last.pt", older)  # what the run points at wins over the step files
    assert loads(run, older)
    (run / "last.pt").unlink()
    for step in (run / "checkpoints").iterdir():
        step.unlink()
    with pytest.raises(MmtkError, match="holds no model.safetensors .* and no checkpoint") as err:
        model_from_checkpoint(run)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", [[], "x", {"model_type": "mmtk-multimae", "model_args": 5}])
def test_a_model_folder_whose_config_json_is_not_a_description_is_refused_in_one_line(tmp_path, config):
    import json

    from mmtk.weights.folders import write_model_folder

    folder = write_model_folder(mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict(),
                                tmp_path / "folder", "multimae-tiny", ARGS)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(mmtk.MmtkError, match="config.json is not a model description") as err:
        mmtk.create_model(pretrained=folder, verbose=False)
    assert "\n" not in str(err.value)


def test_create_model_refuses_a_model_larger_than_free_memory(tmp_path, monkeypatch):
    import mmtk.io

    path = _checkpoint(tmp_path / "honest.pt")
    assert mmtk.create_model(pretrained=path, verbose=False).config.dim == 64  # the check passes real files
    monkeypatch.setattr(mmtk.io, "available_ram", lambda: 1000)
    with pytest.raises(mmtk.MmtkError, match=r"the model needs \d+\.\d KiB of memory but only 1000 B are available"):
        mmtk.create_model(pretrained=path, verbose=False)


def test_finetune_init_and_weights_refuse_forged_model_args_in_one_line(tmp_path, sample_h5):
    forged = _checkpoint(tmp_path / "forged.pt", depth=10**9)
    before = _max_rss_bytes()
    code, output = invoke("finetune", "tiny_finetune_semseg", "--init", forged, "--data", sample_h5,
                          "--out", tmp_path / "run")
    assert code == 2
    line = _one_error_line(output)
    assert str(forged) in line and "model_args.depth = 1000000000 is outside the plausible" in line
    code, output = invoke("weights", _checkpoint(tmp_path / "big.pt", dim=8192, depth=48, num_heads=16))
    assert code == 2 and "model_args describe a model of" in _one_error_line(output)
    assert _max_rss_bytes() - before < 200 * 2**20


def test_describe_weights_builds_the_meta_model_once(tmp_path, monkeypatch):
    import mmtk.registry as registry

    path = _checkpoint(tmp_path / "tiny.pt")
    builds = []
    build = registry.build_model
    monkeypatch.setattr(registry, "build_model", lambda config: builds.append(config) or build(config))
    weights, config, tensors, notes = registry.describe_weights(path)
    assert len(builds) == 1 and builds[0] == config
    assert list(tensors) == list(mmtk.create_model("multimae-tiny", verbose=False, **ARGS).state_dict())
    builds.clear()
    code, output = invoke("weights", path, "--to", tmp_path / "folder")
    assert code == 0 and len(builds) == 1, output
    builds.clear()  # an override that changes no tensor costs one more build (of the changed config), not three
    assert registry.describe_weights(path, num_visible=10)[1].num_visible == 10 and len(builds) == 2
    with pytest.raises(mmtk.MmtkError, match="changes the tensors of the model"):
        registry.describe_weights(path, decoder_dim=16)


# ------------------------------------------------------------------ the named models declare the modalities

PAPER_INPUTS = ("rgb", "depth", "semseg")  # what ModelConfig and the recipe defaulted to before the registry
PAPER_OUTPUTS = ("rgb", "norm_rgb", "depth", "semseg")


def test_named_models_declare_their_modalities_and_the_core_names_none():
    from mmtk.modality import list_modalities
    from mmtk.model.multimae import ModelConfig

    for name in mmtk.list_models():
        config = mmtk.model_config(name)
        assert (config.inputs, config.outputs, config.main_inputs) == (PAPER_INPUTS, PAPER_OUTPUTS, ("rgb",))
    with pytest.raises(mmtk.MmtkError, match="needs at least one input modality"):
        ModelConfig()
    assert ModelConfig(inputs=("depth", "rgb")).main_inputs == ("depth",)  # the head reads the first input's tokens
    core = Path(mmtk.__file__).parent
    for module in ("config.py", "model/multimae.py"):
        text = (core / module).read_text()
        assert not [m for m in list_modalities() if f'"{m}"' in text or f"'{m}'" in text], module


@pytest.mark.parametrize("recipe", sorted(shipped_recipes()))
def test_shipped_recipes_resolve_the_modalities_they_leave_out_as_before(recipe):
    """A recipe without model.inputs/outputs gets the paper's (now the named model's), as the old defaults gave."""
    import yaml

    from mmtk.config import load_recipe, shipped_recipe_text

    written = yaml.safe_load(shipped_recipe_text(recipe))["model"]
    model = load_recipe(recipe, ["data.path=null"]).model
    assert model.inputs == tuple(written.get("inputs", PAPER_INPUTS))
    assert model.outputs == tuple(written.get("outputs", PAPER_OUTPUTS))


def test_recipe_modalities_come_from_its_named_model(tmp_path):
    from mmtk.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("kind: pretrain\nmodel:\n  name: multimae-tiny\n  outputs: [depth]\n")
    model = load_recipe(path).model
    assert (model.inputs, model.outputs) == (PAPER_INPUTS, ("depth",))
    path.write_text("kind: pretrain\nmodel:\n  name: multimae-huge\n")
    with pytest.raises(mmtk.MmtkError, match=r"r.yaml: model.name: unknown model 'multimae-huge'; choose one of "
                                             r"multimae-tiny, "):
        load_recipe(path)


def test_models_lists_the_named_models_with_what_they_are_pretrained_on():
    code, output = invoke("models")
    text = " ".join(output.replace("│", " ").split())
    assert code == 0 and "pretraining: rgb, depth, semseg in; rgb, norm_rgb, depth, semseg out; 40 classes" in text
    assert "multimae-tiny 192 12 3 16.0" in text and "multimae-large 1024 24 16 315.6" in text


@pytest.mark.parametrize("data", [[1], {"path": 5}])
def test_eval_without_data_refuses_a_forged_recorded_data_file_in_one_line(tmp_path, data):
    path = _checkpoint(tmp_path / "forged.pt")
    torch.save({**torch.load(path, weights_only=True), "data": data}, path)
    code, output = invoke("eval", "--checkpoint", path)
    assert code == 2 and f"{path} records no data file" in _one_error_line(output)


def test_old_checkpoints_without_recorded_modalities_load_as_before(tmp_path):
    """A checkpoint whose model_args leave inputs/outputs to the old ModelConfig defaults (the paper's) loads
    with them: its tensors say which; a head put on it reads the rgb tokens, as the old default did."""
    sizes = {key: value for key, value in ARGS.items() if key not in ("inputs", "outputs")}
    model = mmtk.create_model("multimae-tiny", verbose=False, **sizes)
    path = tmp_path / "old.pt"
    save_checkpoint({"model_name": "multimae-tiny", "model_args": sizes, "model": model.state_dict()}, path)
    loaded = mmtk.create_model(pretrained=path, verbose=False)
    assert (loaded.config.inputs, loaded.config.outputs) == (PAPER_INPUTS, PAPER_OUTPUTS)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    finetune = mmtk.create_model(pretrained=path, verbose=False, head="convnext", task="semseg", outputs=())
    assert finetune.config.main_inputs == ("rgb",) and finetune.config.inputs == PAPER_INPUTS


def test_a_head_reads_the_named_models_main_input_only_where_the_inputs_keep_it():
    """MultiMAE-B's head reads rgb; a model built without rgb reads its first input (it fell back silently to
    tokens that are never there), and main_inputs outside the inputs are refused in one line."""
    head = dict(head="convnext", task="semseg", num_classes=5, image_size=64, convnext_dim=64, convnext_depth=1,
                verbose=False)
    assert mmtk.create_model("multimae-tiny", inputs=("depth",), **head).config.main_inputs == ("depth",)
    assert mmtk.create_model("multimae-tiny", inputs=("depth", "rgb"), **head).config.main_inputs == ("rgb",)
    with pytest.raises(MmtkError, match="main_inputs rgb are not all among the inputs depth"):
        mmtk.create_model("multimae-tiny", inputs=("depth",), main_inputs=("rgb",), **head)


def test_building_refuses_absurd_sizes_and_models_beyond_memory_before_allocating(monkeypatch, sample_h5, tmp_path):
    """Sizes a user gives (not only a file's) are bounded, and the model is weighed on the meta device first:
    ``num_classes=10**9`` tried to allocate 256 GB and died with a RuntimeError traceback."""
    with pytest.raises(MmtkError, match=r"num_classes = 1000000000 is outside the plausible 0\.\.65535"):
        mmtk.create_model("multimae-tiny", num_classes=10**9)
    code, output = invoke("pretrain", "tiny", "--data", sample_h5, "--out", tmp_path / "run",
                          "--set", "data.num_classes=1000000000", "--set", "train.max_steps=1")
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: model option num_classes")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(mmtk.io, "available_ram", lambda: 1000)
    with pytest.raises(MmtkError, match=r"a model of width 192, 12 blocks.*but only 1000 B are available"):
        mmtk.create_model("multimae-tiny")
