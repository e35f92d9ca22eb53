"""Mixtures of sensor sets: a sample lacking a modality gets no tokens and no loss for it, in a batch with
samples that have it (the model side; the data side is in tests/test_mixture_data.py)."""

from __future__ import annotations

import torch

import mmtk
from helpers import TINY, random_batch, tiny_model

NAMES = ("rgb", "depth", "semseg")


def _masks(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(batch, 16, generator=gen) < 0.7 for name in NAMES}


def _alone(batch: dict, index: int, drop: tuple[str, ...] = ()) -> dict:
    return {name: value[index:index + 1] for name, value in batch.items() if name not in drop}


def test_a_sample_without_depth_gives_what_it_gives_alone_in_a_mixed_batch():
    torch.manual_seed(0)
    model = tiny_model().eval()
    batch = random_batch(2)
    batch["depth"][0] = 0.0  # the placeholder the data side gives a sample without depth
    valid = {"depth": torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3)) < 0.8}
    masks = _masks(2, seed=1)
    present = {"depth": torch.tensor([False, True])}
    with torch.no_grad():
        mixed = model(batch, masks=masks, valid=valid, present=present)
        without = model(_alone(batch, 0, drop=("depth",)), masks=_alone(masks, 0, drop=("depth",)))
        with_depth = model(_alone(batch, 1), masks=_alone(masks, 1), valid=_alone(valid, 1))
    assert mixed.masks["depth"][0].all()  # no depth token of sample 0 is seen
    assert not without.masks.get("depth") and "depth" not in without.losses
    for task in ("rgb", "norm_rgb", "semseg"):
        torch.testing.assert_close(mixed.preds[task][0:1], without.preds[task], rtol=1e-6, atol=1e-6)
    for task in mixed.preds:
        torch.testing.assert_close(mixed.preds[task][1:2], with_depth.preds[task], rtol=1e-6, atol=1e-6)
    # depth: only the sample that has it counts (numerator and denominator); the others: mean of the two
    torch.testing.assert_close(mixed.losses["depth"], with_depth.losses["depth"], rtol=1e-6, atol=1e-6)
    for task in ("rgb", "norm_rgb", "semseg"):
        expected = (without.losses[task] + with_depth.losses[task]) / 2
        torch.testing.assert_close(mixed.losses[task], expected, rtol=1e-6, atol=1e-6)


def test_sampled_masks_give_an_absent_modality_no_token_and_its_budget_to_the_others():
    torch.manual_seed(0)
    model = tiny_model(num_visible=12)
    batch = random_batch(64)
    present = {"depth": torch.arange(64) % 2 == 0, "semseg": torch.arange(64) % 3 != 0}
    out = model(batch, present=present)
    visible = {name: (~mask).sum(dim=1) for name, mask in out.masks.items()}
    assert visible["depth"][~present["depth"]].eq(0).all()
    assert visible["semseg"][~present["semseg"]].eq(0).all()
    assert sum(visible.values()).tolist() == [12] * 64  # the budget is spent on what each sample has
    assert visible["depth"][present["depth"]].sum() > 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_all_present_is_the_path_without_presence():
    model = tiny_model().eval()
    batch, masks = random_batch(3), _masks(3, seed=2)
    with torch.no_grad():
        plain = model(batch, masks=masks)
        marked = model(batch, masks=masks, present={name: torch.ones(3, dtype=torch.bool) for name in NAMES})
    for task in plain.preds:
        assert torch.equal(plain.preds[task], marked.preds[task]), task
    assert all(torch.equal(plain.losses[t], marked.losses[t]) for t in plain.losses)


def test_finetuning_a_sample_without_an_input_gives_what_it_gives_alone():
    torch.manual_seed(0)
    for head, extra in (("convnext", dict(convnext_dim=64, convnext_depth=1)),
                        ("dpt", dict(hooks=(0, 1, 1, 1), layer_dims=(8, 16, 32, 64), dpt_dim=32))):
        for main in (("rgb",), ("depth",)):
            model = mmtk.create_model("multimae-tiny", **{**TINY, **extra}, image_size=64, head=head, task="semseg",
                                      inputs=("rgb", "depth"), main_inputs=main).eval()
            batch = {name: value for name, value in random_batch(2).items() if name != "semseg"}
            batch["depth"][0] = 0.0
            with torch.no_grad():
                mixed = model(batch, present={"depth": torch.tensor([False, True])})
                without = model(_alone(batch, 0, drop=("depth",)))
                with_depth = model(_alone(batch, 1))
            torch.testing.assert_close(mixed[0:1], without, rtol=1e-6, atol=1e-6, msg=f"{head} {main}")
            torch.testing.assert_close(mixed[1:2], with_depth, rtol=1e-6, atol=1e-6, msg=f"{head} {main}")
