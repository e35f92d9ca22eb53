"""Property tests of the Dirichlet token budget."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtk.model.masking import apportion, sample_masks, sample_shares


@settings(max_examples=200, deadline=None)
@given(
    shares=st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=1, max_size=6),
    capacity=st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), min_size=1, max_size=6),
    budget=st.integers(0, 120),
)
def test_apportion_is_exact_and_within_capacity(shares, capacity, budget):
    rows = min(len(shares), len(capacity))
    shares_t = torch.tensor(shares[:rows], dtype=torch.float64)
    shares_t = torch.where(shares_t.sum(1, keepdim=True) > 0, shares_t, torch.ones_like(shares_t))
    shares_t = shares_t / shares_t.sum(1, keepdim=True)
    cap = torch.tensor(capacity[:rows])
    counts = apportion(shares_t, budget, cap)
    assert (counts >= 0).all() and (counts <= cap).all()
    assert counts.sum(1).tolist() == torch.clamp(cap.sum(1), max=budget).tolist()


@settings(max_examples=100, deadline=None)
@given(shares=st.lists(st.floats(0.01, 1), min_size=2, max_size=4), budget=st.integers(1, 200))
def test_apportion_without_caps_is_largest_remainder_rounding(shares, budget):
    s = torch.tensor([shares], dtype=torch.float64)
    s = s / s.sum()
    counts = apportion(s, budget, torch.full_like(s, 10_000, dtype=torch.long))
    assert ((counts - s * budget).abs() < 1).all()  # each count within one token of its ideal share


def test_dirichlet_shares_have_the_right_mean():
    torch.manual_seed(0)
    alphas = torch.tensor([1.0, 2.0, 5.0])
    shares = sample_shares(20_000, alphas)
    assert torch.allclose(shares.sum(1), torch.ones(20_000, dtype=shares.dtype))
    torch.testing.assert_close(shares.mean(0), (alphas / alphas.sum()).to(shares.dtype), atol=0.01, rtol=0)


def test_subset_sampling_drops_whole_modalities():
    torch.manual_seed(0)
    shares = sample_shares(7_000, torch.ones(3), sample_subsets=True)
    used = (shares > 0).sum(1)
    assert used.min() >= 1
    # the 7 non-empty subsets are drawn uniformly: 3/7 use one modality, 3/7 two, 1/7 three
    fractions = torch.bincount(used, minlength=4)[1:].double() / len(used)
    torch.testing.assert_close(fractions, torch.tensor([3 / 7, 3 / 7, 1 / 7], dtype=torch.float64), atol=0.02, rtol=0)


def test_masks_pick_uniformly_among_eligible_tokens():
    torch.manual_seed(0)
    eligible = {"a": torch.ones(4000, 10, dtype=torch.bool), "b": torch.ones(4000, 10, dtype=torch.bool)}
    eligible["b"][:, :5] = False
    masks = sample_masks(eligible, budget=6, alphas={"a": 1.0, "b": 1.0})
    visible_a, visible_b = (~masks["a"]).sum(1), (~masks["b"]).sum(1)
    assert ((visible_a + visible_b) == 6).all()
    assert not (~masks["b"][:, :5]).any()  # ineligible tokens are never visible
    assert visible_b.max() <= 5
    per_token = (~masks["a"]).double().mean(0)  # every position equally likely
    assert (per_token.max() - per_token.min()) < 0.05
