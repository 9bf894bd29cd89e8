"""Data splits as batches for the spiking trainer: in-memory tensors (synthetic tasks, tests) or a run's data set."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from analog_ep.embedding import NO_PAIR_FEATURES, PairFeatures

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Split:
    """A data split as batches: `batches(epoch)` shuffles by (seed, epoch), `batches(None)` keeps the order.

    A function rather than tensors, so a real split is embedded on the fly (never all of it as floats)."""

    make: Callable[[int | None], Iterable[Batch]]
    size: int

    def batches(self, epoch: int | None = None) -> Iterable[Batch]:
        return self.make(epoch)


def epoch_order(n: int, seed: int, epoch: int | None) -> torch.Tensor:
    """The analog trainer's batch order: a function of (seed, epoch), so reruns see the same batches."""
    if epoch is None:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def tensor_split(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Split:
    """An in-memory split (synthetic tasks, tests)."""
    def make(epoch: int | None) -> Iterable[Batch]:
        order = epoch_order(len(y), seed, epoch)
        return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]

    return Split(make, len(y))


def dataset_split(dataset: Any, embedding: torch.Tensor, batch_size: int, dtype: torch.dtype, seed: int = 0,
                  limit: int | None = None, features: PairFeatures = NO_PAIR_FEATURES) -> Split:
    """A `SequenceDataset` split through `analog_ep.train.trainer.batches`. `limit`: N samples drawn afresh each
    epoch (training) or one fixed random subset of N (evaluation, `epoch=None`), never the first N: the
    IMDB splits are sorted by label, so their first N reviews are all negative."""
    from analog_ep.train.trainer import batches, seeded_subset

    subset = seeded_subset(len(dataset), limit, seed)
    n = len(subset)

    def make(epoch: int | None) -> Iterable[Batch]:
        order = epoch_order(len(dataset), seed, epoch)[:n] if epoch is not None else subset
        # `batches` walks the whole data set's length: stop after the batches `order` fills
        return islice(batches(dataset, embedding, batch_size, embedding.device, dtype, order, features=features),
                      -(-n // batch_size))

    return Split(make, n)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split

