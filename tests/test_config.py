"""Recipe loading: typed values, one-line errors naming the key and file, --set overrides, shipped recipes."""

from pathlib import Path

import pytest
import yaml

from mmtk.config import Recipe, load_recipe, recipe_to_dict, save_recipe
from mmtk.errors import MmtkError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1e-3\n  betas: [0.9, 0.99]\nmodel:\n  inputs: [rgb]\n"))
    assert isinstance(recipe, Recipe)
    assert recipe.optim.lr == pytest.approx(1e-3)  # YAML reads '1e-3' as a string; it is converted
    assert recipe.optim.betas == (0.9, 0.99)
    assert recipe.model.inputs == ("rgb",)
    assert recipe.optim.weight_decay == 0.05  # default kept


@pytest.mark.parametrize("text, words", [
    ("optim:\n  lrr: 1\n", ["unknown key 'optim.lrr'", "r.yaml"]),
    ("optim:\n  batch_size: eight\n", ["optim.batch_size", "expected an integer", "r.yaml"]),
    ("optim:\n  batch_size: 8.5\n", ["optim.batch_size", "expected an integer"]),
    ("train:\n  precision: fp8\n", ["train.precision", "'bf16'"]),
    ("train:\n  compile: 1\n", ["train.compile", "'none', 'blocks', 'step'"]),
    ("optim:\n  betas: [0.9]\n", ["optim.betas", "2 values"]),
    ("data:\n  path: /no/such/file.h5\n", ["data.path", "/no/such/file.h5", "not found"]),
    ("optim:\n  warmup_epochs: 50\n  epochs: 10\n", ["optim.warmup_epochs"]),
    ("kind: finetune\n", ["model.head"]),
    ("kind: finetune\nmodel: {head: dpt, task: depth}\ntrain: {loss: ce}\n", ["train.loss"]),
    ("train: {loss_reduction: batch, target_norm: [2.0, 1.0]}\n", ["train.loss_reduction, train.target_norm",
                                                                    "pretraining scores each output"]),
    ("optim: 3\n", ["optim", "mapping"]),
    ("- a\n- b\n", ["r.yaml", "mapping"]),
    ("optim: [\n", ["r.yaml", "not valid YAML"]),
])
def test_errors_are_one_line_naming_key_and_file(tmp_path, text, words):
    with pytest.raises(MmtkError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_set_overrides_and_data_flag(tmp_path):
    data = tmp_path / "frames.h5"
    data.write_bytes(b"")
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1e-4\n"),
                         ["optim.lr=2e-4", "model.inputs=rgb,depth", "train.max_steps=5", "model.overrides.depth=2"],
                         data_path=str(data))
    assert recipe.optim.lr == pytest.approx(2e-4)
    assert recipe.model.inputs == ("rgb", "depth")
    assert recipe.train.max_steps == 5
    assert recipe.model.overrides == {"depth": 2}
    assert recipe.data.path == str(data)
    with pytest.raises(MmtkError, match="unknown key 'optim.nope'"):
        load_recipe(write(tmp_path, ""), ["optim.nope=1"])
    with pytest.raises(MmtkError, match="KEY=VALUE"):
        load_recipe(write(tmp_path, ""), ["optim.lr"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim: {lr: 3e-4, epochs: 7, warmup_epochs: 1}\n"))
    out = tmp_path / "resolved.yaml"
    save_recipe(recipe, out)
    values = yaml.safe_load(out.read_text())
    assert values["optim"]["lr"] == pytest.approx(3e-4) and values["optim"]["epochs"] == 7
    assert load_recipe(out) == recipe
    assert recipe_to_dict(recipe) == values


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path, ["data.path=null"])
    assert recipe.kind in ("pretrain", "finetune")


def test_base_recipe_has_paper_values():
    recipe = load_recipe(RECIPES / "base.yaml", ["data.path=null"])
    assert recipe.model.inputs == ("rgb", "depth", "semseg")
    assert recipe.model.outputs == ("rgb", "norm_rgb", "depth", "semseg")
    assert recipe.model.num_visible == 98 and recipe.model.alphas == 1.0
    assert recipe.optim.betas == (0.9, 0.95) and recipe.optim.weight_decay == 0.05
    assert recipe.optim.weight_decay_on == "all"  # the official pretraining decays every parameter
    assert recipe.optim.lr == pytest.approx(1e-4) and recipe.optim.scale_lr
    assert (recipe.optim.warmup_epochs, recipe.optim.epochs) == (40, 1600)
    assert recipe.data.crop_scale == (0.2, 1.0) and recipe.data.hflip and recipe.train.precision == "bf16"
