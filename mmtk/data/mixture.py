"""Mixtures of datasets, also of different sensor sets, as one training set.

A :class:`Mixture` concatenates datasets (e.g. RGB-D scans, RGB photos, a robot with a thermal camera).
Every sample carries the keys of every modality of the mixture: a sample whose dataset lacks modality
``m`` gets a placeholder of zeros in each of ``m``'s tensors and ``<m>_present`` False (a bool scalar,
[B] once batched); ``<m>_present`` is only added for modalities some dataset lacks, so a mixture of
datasets with the same modalities gives the samples of a single file. The model gives such a sample
no tokens and no loss for ``m`` (:class:`mmtk.model.multimae.MultiMAE`, ``present=``).

Sampling weights (``data.weights``) are a per-epoch draw (:func:`mixture_order`): each epoch takes
the dataset counts the weights give, exactly, and frames inside a dataset without replacement.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmtk.errors import MmtkError
from mmtk.model.masking import largest_remainder

PRESENT_SUFFIX = "_present"


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the body with the torch (CPU), numpy and python RNGs seeded by ``seed``; restore them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class Mixture(Dataset):
    """Several datasets as one: index ``i`` runs through the first dataset's frames, then the second's, ...

    Args:
        parts: the datasets (e.g. :class:`mmtk.data.H5Dataset`), each of which yields dicts of tensors.
        modalities: the modalities each part has (registered names, same order as ``parts``).
    """

    def __init__(self, parts: Sequence[Dataset], modalities: Sequence[Sequence[str]]) -> None:
        self.parts = list(parts)
        self.modalities = [tuple(names) for names in modalities]
        self.sizes = [len(part) for part in self.parts]  # type: ignore[arg-type]
        self.starts = np.cumsum([0, *self.sizes]).tolist()
        every = set.intersection(*(set(names) for names in self.modalities))
        self.partial = [name for name in dict.fromkeys(n for names in self.modalities for n in names)
                        if name not in every]  # modalities some part lacks: their samples say whether they have it
        # Each part's first sample (its crop drawn from RNGs that are restored afterwards) gives the keys, dtypes
        # and shapes of the placeholders of the parts that lack them.
        with seeded_rngs(0):
            firsts = [part[0] for part in self.parts]
        self.templates: dict[str, Tensor] = {}
        for sample in firsts:
            for key, value in sample.items():
                self.templates.setdefault(key, torch.zeros_like(value))
        self.missing = [[key for key in self.templates if key not in sample] for sample in firsts]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index inside it) of mixture index ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        part, local = self.locate(index)
        sample = dict(self.parts[part][local])
        for key in self.missing[part]:
            sample[key] = self.templates[key]
        for name in self.partial:
            sample[name + PRESENT_SUFFIX] = torch.tensor(name in self.modalities[part])
        return sample


def present_masks(batch: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """The ``<name>_present`` [B] bool masks a batch carries, by modality, for ``names``."""
    return {name: batch[name + PRESENT_SUFFIX] for name in names if name + PRESENT_SUFFIX in batch}


def mixture_order(sizes: Sequence[int], weights: Sequence[float], length: int, generator: torch.Generator) -> Tensor:
    """One epoch of ``length`` draws from datasets of ``sizes`` frames in the proportions ``weights``: [length].

    Dataset ``d`` gets exactly its share of ``length`` (largest-remainder rounding); its frames are drawn
    without replacement, passing through a fresh permutation whenever its share exceeds its size. A draw is
    ``pass * sum(sizes) + index in the mixture``, so two passes over a frame get different augmentation
    seeds; the frame is the draw modulo ``sum(sizes)``. Depends on ``generator`` only (seed and epoch).
    """
    total = sum(sizes)
    share = torch.tensor(weights, dtype=torch.float64)
    if len(sizes) != len(weights) or not bool((share >= 0).all()) or not share.sum() > 0:
        raise MmtkError(f"data.weights {list(weights)}: give one weight >= 0 per dataset ({len(sizes)}), "
                        f"not all 0")
    counts = largest_remainder((share / share.sum() * length)[None], torch.tensor([length]))[0].tolist()
    draws, start = [], 0
    for size, count in zip(sizes, counts):
        passes = -(-count // size)
        frames = torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)] or [torch.zeros(0)])
        draws.append(start + frames[:count].long() + torch.arange(count) // size * total)
        start += size
    order = torch.cat(draws)
    return order[torch.randperm(length, generator=generator)]
