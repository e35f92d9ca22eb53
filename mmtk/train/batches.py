"""The resumable data feed of a run: whole optimizer steps per epoch, per-sample seeded augmentation."""

from __future__ import annotations

import itertools
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from mmtk.config import loader_workers
from mmtk.data.mixture import Mixture, mixture_order, seeded_rngs
from mmtk.errors import MmtkError
from mmtk.progress import counted
from mmtk.runtime import DistInfo, main_process_print
from mmtk.train.settings import FeedSettings


class RunSampler(Sampler):
    """``(epoch, index)`` keys for a whole run, epoch after epoch, from any optimizer step on.

    Each epoch is a DistributedSampler permutation (this process's share) cut to whole optimizer
    steps, so a batch never straddles two epochs and a run resumed at step s sees the same keys as
    an uninterrupted one. The stream is endless: one loader iterator serves the whole run, and its
    workers keep prefetching across epoch boundaries (with a few steps per epoch, restarting the
    loader every epoch would leave the GPU waiting for each epoch's first batch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, samples_per_step: int,
                 epoch_order: DistributedSampler | None = None) -> None:
        self.epoch_order = epoch_order or DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                                             shuffle=True, seed=seed, drop_last=True)
        self.samples_per_step = samples_per_step
        self.steps_per_epoch = self.epoch_order.num_samples // samples_per_step
        self.start_step = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, done = divmod(self.start_step, self.steps_per_epoch)
        first, end = done * self.samples_per_step, self.steps_per_epoch * self.samples_per_step
        while True:
            self.epoch_order.set_epoch(epoch)
            for index in itertools.islice(self.epoch_order, first, end):
                yield epoch, int(index)
            epoch, first = epoch + 1, 0


class WeightedEpochs(DistributedSampler):
    """A DistributedSampler whose epoch is a weighted draw over the datasets of a mixture (``data.weights``).

    Every process draws the same epoch (:func:`mixture_order`, seeded by seed + epoch) and takes every
    ``num_replicas``-th draw from its rank on, as DistributedSampler does with its permutation; so one
    process and several, at the same global batch, train on the same samples.
    """

    def __init__(self, sizes: list[int], weights: tuple[float, ...], length: int, num_replicas: int, rank: int,
                 seed: int) -> None:
        draws = range(length)  # what DistributedSampler counts and deals out: the epoch's draws
        super().__init__(draws, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,  # type: ignore[arg-type]
                         drop_last=True)
        self.sizes, self.weights = sizes, weights

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = mixture_order(self.sizes, self.weights, len(self.dataset), generator)  # type: ignore[arg-type]
        return iter(order[self.rank:self.total_size:self.num_replicas].tolist())


class SeededDataset(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index) only.

    The global torch/numpy/python RNGs are re-seeded around each ``dataset[index]`` and restored
    afterwards, so the crop of a frame does not depend on the worker count, on the process count or
    on where a resumed run restarted. An index beyond the dataset is a further pass over it (frame
    ``index % len``, its own seed): weighted mixtures draw a frame more than once per epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63)
        with seeded_rngs(sample_seed):
            return self.dataset[index % len(self)]


@dataclass
class Batches:
    """The resumable data feed of a run."""

    loader: DataLoader
    sampler: RunSampler
    micro: int  # samples per process per micro-step
    accum_steps: int  # micro-steps per optimizer step
    steps_per_epoch: int  # optimizer steps

    def from_step(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from optimizer step ``step`` on, endlessly (``accum_steps`` per optimizer step)."""
        self.sampler.start_step = step
        return iter(self.loader)


def make_batches(feed: FeedSettings, train_set: Dataset, info: DistInfo, micro_batch: int | None = None,
                 workers: int | None = None) -> Batches:
    """Split the global batch over processes and accumulation steps; seed sampling and augmentation.

    ``micro_batch`` and ``workers`` are the resolved values of ``optim.micro_batch`` and ``data.num_workers``
    (:func:`plan_memory` resolves ``auto``); by default the settings' numbers.
    """
    if micro_batch is None and isinstance(feed.micro_batch, int):
        micro_batch = feed.micro_batch
    if workers is None:
        workers = loader_workers(feed.num_workers, info.device.type, info.world_size)
    accum = accum_steps_for(feed, info.world_size, micro_batch)
    micro = feed.batch_size // (info.world_size * accum)
    repeat = feed.repeat
    if len(train_set) * repeat < feed.batch_size:  # e.g. 795 NYUv2 frames and the paper's batch of 2048
        repeat = math.ceil(feed.batch_size / len(train_set))
        if info.is_main:
            main_process_print(f"note: {counted(len(train_set), 'frame')} x data.repeat {feed.repeat} is less than one "
                               f"global batch of {feed.batch_size}; each epoch repeats the frames {repeat} times")
    epoch_order = None
    if feed.weights is not None:  # a weighted draw of len x repeat per epoch, passes over a frame included
        sizes = train_set.sizes if isinstance(train_set, Mixture) else [len(train_set)]
        epoch_order = WeightedEpochs(sizes, feed.weights, len(train_set) * repeat, info.world_size, info.rank,
                                     feed.seed)
    elif repeat > 1:
        train_set = ConcatDataset([train_set] * repeat)
    sampler = RunSampler(train_set, info.world_size, info.rank, feed.seed, micro * accum, epoch_order)
    # Its own generator: creating an iterator must not draw from the global RNG (the masks' RNG).
    loader = DataLoader(SeededDataset(train_set, feed.seed), batch_size=micro, sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(feed.seed), worker_init_fn=_ignore_sigint,
                        pin_memory=feed.pin_memory and info.device.type == "cuda")
    return Batches(loader, sampler, micro, accum, sampler.steps_per_epoch)


def accum_steps_for(feed: FeedSettings, world_size: int, micro_batch: int | None) -> int:
    """Micro-steps per optimizer step: optim.accum_steps, or more so that no micro-batch exceeds ``micro_batch``."""
    accum = feed.accum_steps
    if micro_batch is not None:  # e.g. the paper's 2048 on one GPU: 8 micro-steps of 256
        accum = max(accum, math.ceil(feed.batch_size / (world_size * micro_batch)))
    if feed.batch_size % (world_size * accum):
        raise MmtkError(f"optim.batch_size {feed.batch_size} must be divisible by processes x accumulation steps "
                        f"= {world_size} x {accum}; change optim.batch_size or optim.micro_batch")
    return accum


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the loader workers too, and SIGTERM where a scheduler signals every process of the job; the
    # main process decides when to stop (both are save points) and then ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
