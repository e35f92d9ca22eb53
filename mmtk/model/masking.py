"""Multi-modal masking: how many tokens of each modality the encoder sees.

Per sample, a Dirichlet(alpha) draw splits a fixed budget of visible tokens over the input
modalities (MultiMAE, Sec. 3.2). The split is exact: the per-modality counts add up to the budget
(largest-remainder rounding), never exceed what a modality has, and what one modality cannot take
goes to the others. Within a modality the visible patches are uniform at random among the eligible
ones (e.g. patches that are not depth holes). A sample that lacks a modality has no eligible token of it
(capacity 0), so its whole budget goes to the modalities it has.

Everything runs on the tokens' device with fixed shapes and no read-back to the host, so a compiled
training step can include the masking (`train.compile: step`) and never waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmtk.errors import MmtkError


def sample_shares(batch: int, alphas: Tensor, sample_subsets: bool = False) -> Tensor:
    """Dirichlet(alphas) shares [B, M] on the device of `alphas`, optionally over a uniformly drawn
    non-empty subset.

    With `sample_subsets`, each sample first picks one of the 2^M - 1 non-empty subsets of
    modalities uniformly; modalities outside it get share 0.
    """
    num, device = alphas.numel(), alphas.device
    gammas = torch._standard_gamma(alphas.expand(batch, num).contiguous())  # Dirichlet = normalised Gammas
    gammas = gammas.clamp_min(torch.finfo(gammas.dtype).tiny)  # tiny alphas can underflow to 0
    if sample_subsets:
        subset_id = torch.randint(1, 2**num, (batch, 1), device=device)
        chosen = (subset_id >> torch.arange(num, device=device)) & 1  # bit m of the subset id: modality m chosen
        gammas = gammas * chosen
    return gammas / gammas.sum(dim=1, keepdim=True)


def largest_remainder(ideal: Tensor, total: Tensor) -> Tensor:
    """Round non-negative [B, M] amounts to integers summing to `total` [B] per row."""
    counts = ideal.floor()
    short = (total - counts.sum(dim=1)).round().long()  # [B], 0 <= short < M
    rank = torch.argsort(torch.argsort(counts - ideal, dim=1, stable=True), dim=1)  # 0 = largest remainder
    return (counts + (rank < short[:, None]).to(counts.dtype)).long()


def apportion(shares: Tensor, budget: int, capacity: Tensor) -> Tensor:
    """Split `budget` visible tokens per sample by `shares` [B, M] within `capacity` [B, M].

    Returns integer counts [B, M] with counts <= capacity and sum = min(budget, capacity.sum()).
    Tokens a full modality cannot take are re-split among the others by their shares (uniformly
    when none of the others has a share).
    """
    capacity = capacity.long()
    total = torch.clamp(capacity.sum(dim=1), max=budget)  # [B]
    counts = torch.zeros_like(capacity)
    # M + 1 rounds always suffice (each round fills a modality or places every token); a round with nothing
    # remaining adds zeros. Stopping early reads `remaining` back to the host: free in eager CPU code, a sync
    # on a GPU and a graph break in a compiled step, so only there.
    may_stop = total.device.type == "cpu" and not torch.compiler.is_compiling()
    for _ in range(shares.shape[1] + 1):
        remaining = total - counts.sum(dim=1)
        if may_stop and not bool((remaining > 0).any()):
            break
        room = capacity - counts
        weights = shares * (room > 0)
        no_share = weights.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(no_share, (room > 0).to(shares.dtype), weights)
        weights = torch.where(remaining[:, None] > 0, weights, torch.ones_like(weights))  # avoid 0/0
        weights = weights / weights.sum(dim=1, keepdim=True)  # rows without room have remaining == 0
        extra = largest_remainder(weights * remaining[:, None].to(weights.dtype), remaining)
        counts = counts + torch.minimum(extra, room)
    return counts


def choose_visible(counts: Tensor, eligible: Tensor) -> Tensor:
    """Pick `counts` [B] visible tokens uniformly among `eligible` [B, N]; returns hidden [B, N]."""
    noise = torch.rand(eligible.shape, device=eligible.device)
    noise = torch.where(eligible, noise, 2.0)  # ineligible tokens sort last
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return rank >= counts[:, None]


def sample_masks(
    eligible: dict[str, Tensor],
    budget: int,
    alphas: dict[str, float],
    sample_subsets: bool = False,
) -> dict[str, Tensor]:
    """Random token masks for one batch (True = hidden).

    Args:
        eligible: per input modality, [B, N_m] bool of tokens that may be visible.
        budget: visible tokens per sample, over all modalities together.
        alphas: Dirichlet concentration per modality.
        sample_subsets: first pick a non-empty subset of modalities uniformly per sample.
    """
    names = list(eligible)
    tokens = sum(mask.shape[1] for mask in eligible.values())
    if not 0 < budget < tokens:  # e.g. a model configured for 224 px (98 visible) fed 64 px frames (48 tokens)
        raise MmtkError(f"visible budget {budget} for inputs with {tokens} tokens ({', '.join(names)}): it must be 1 "
                        f"to {tokens - 1}, else nothing is {'seen' if budget <= 0 else 'hidden and every loss is 0'}; "
                        f"lower num_visible (model.num_visible in a recipe) or build the model for the frames' "
                        f"size (image_size)")
    batch = next(iter(eligible.values())).shape[0]
    device = next(iter(eligible.values())).device
    # Filled on the device (a tensor from a list would be a host-to-device copy every step).
    alpha = torch.stack([torch.full((), float(alphas[name]), device=device) for name in names])  # [M]
    shares = sample_shares(batch, alpha, sample_subsets)  # [B, M]
    capacity = torch.stack([eligible[name].sum(dim=1) for name in names], dim=1)  # [B, M]
    counts = apportion(shares, budget, capacity)  # [B, M]
    return {name: choose_visible(counts[:, i], eligible[name]) for i, name in enumerate(names)}
