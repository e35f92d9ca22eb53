"""Weight decay and layer-wise lr per parameter against the official MultiMAE finetuning's rules.

The official rules (EPFL-VILAB/MultiMAE, utils/optim_factory.py and run_finetuning_{semseg,depth}.py), restated
here independently of mmtk.train.optim, on the official parameter names:
  - no decay when the parameter is 1-D, its name ends in ".bias", or its name is exactly one of the model's
    no_weight_decay() entries: "global_tokens", "input_adapters.<t>.pos_emb", "input_adapters.semseg.class_emb"
    (the last names a module, so the embedding's ".weight" does not match and is decayed);
  - layer id: global tokens and input adapters 0, encoder block i i + 1, everything else (the head) L + 1;
    lr scale layer_decay ** (L + 1 - id).
The official pretraining passes the whole model to AdamW without groups: every parameter decays.
"""

from __future__ import annotations

import re

import pytest

import mmtk
from mmtk.train.optim import param_groups
from mmtk.train.checkpoint import _legacy_weight_decay

WEIGHT_DECAY, LAYER_DECAY = 0.05, 0.75


def official_name(name: str) -> str:
    """The official model's name of an mmtk parameter."""
    name = name.replace("encoder.tokenizers.", "input_adapters.").replace("encoder.global_tokens", "global_tokens")
    name = re.sub(r"^encoder\.blocks\.", "encoder.", name)
    return re.sub(r"^head\.", "output_adapters.task.", name)


def official_rule(name: str, shape: tuple[int, ...], inputs: list[str], num_layers: int) -> tuple[float, float]:
    """(lr scale, weight decay) of one parameter as the official finetuning assigns them."""
    skip = {"global_tokens"} | {f"input_adapters.{t}.pos_emb" for t in inputs}
    skip |= {"input_adapters.semseg.class_emb"} if "semseg" in inputs else set()
    decay = 0.0 if len(shape) == 1 or name.endswith(".bias") or name in skip else WEIGHT_DECAY
    if name in ("global_tokens", "pos_embed", "cls_token", "mask_token") or name.startswith("input_adapters"):
        layer = 0
    elif name.startswith("encoder"):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = num_layers + 1
    return LAYER_DECAY ** (num_layers + 1 - layer), decay


def mmtk_rule(model, rule: str = "weights") -> dict[str, tuple[float, float]]:
    groups = param_groups(model, lr=1.0, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY, rule=rule)
    return {name: (group["lr_scale"], group["weight_decay"]) for group in groups for name in group["names"]}


MODELS = {
    "convnext semseg from rgb + semseg": dict(inputs=["rgb", "semseg"], head="convnext", task="semseg",
                                              main_inputs=["rgb"], num_classes=5),
    "dpt depth from rgb": dict(inputs=["rgb"], head="dpt", task="depth", hooks=[0, 1, 2, 3], dpt_dim=32,
                               layer_dims=[16, 32, 64, 128]),
}


@pytest.fixture(scope="module", params=list(MODELS))
def finetune_model(request):
    args = MODELS[request.param]
    return mmtk.create_model("multimae-tiny", outputs=[], image_size=[32, 32], depth=4, dim=64, num_heads=2,
                             verbose=False, **args), args["inputs"]


def test_every_parameter_matches_the_official_finetuning(finetune_model):
    model, inputs = finetune_model
    ours = mmtk_rule(model)
    theirs = {name: official_rule(official_name(name), tuple(p.shape), inputs, 4)
              for name, p in model.named_parameters()}
    assert ours.keys() == theirs.keys()
    differ = {name: (ours[name], theirs[name]) for name in ours if ours[name] != pytest.approx(theirs[name])}
    assert not differ
    # what the old rule got wrong is decayed now: every input projection (and the class embedding)
    assert all(ours[name][1] == WEIGHT_DECAY for name in ours if name.endswith("proj.weight"))
    assert ours["encoder.global_tokens"][1] == 0.0


def test_all_decays_every_parameter_as_the_official_pretraining(finetune_model):
    model, _ = finetune_model
    assert {decay for _, decay in mmtk_rule(model, "all").values()} == {WEIGHT_DECAY}


def test_older_runs_resume_with_the_rule_they_started_with(finetune_model):
    model, _ = finetune_model
    legacy = mmtk_rule(model, "weights-except-tokens")
    assert legacy["encoder.tokenizers.rgb.proj.weight"][1] == 0.0  # the old rule: "token" in the name
    for recorded in ({"weight_decay": 1e-4}, {"weight_decay_on": "weights-except-tokens"}):  # before the option;
        recipe = mmtk.config.load_recipe("tiny_finetune_depth")                          # a resumed legacy run's
        checked = _legacy_weight_decay(recipe, {"optim": recorded})
        assert recipe.optim.weight_decay_on == checked["optim"]["weight_decay_on"] == "weights-except-tokens"
    recipe = mmtk.config.load_recipe("tiny_finetune_depth")
    _legacy_weight_decay(recipe, {"optim": {"weight_decay_on": "all"}})
    assert recipe.optim.weight_decay_on == "weights"  # a recorded value is checked by the resume, not replaced
