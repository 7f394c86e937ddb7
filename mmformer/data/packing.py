"""Token budgets for packed training batches: batches of as many samples as fit a budget of text tokens and/or audio
seconds, instead of a fixed sample count (``data.packing: true`` with ``max_tokens`` / ``max_batch_seconds``).

A packed batch (see :class:`mmformer.layers.Documents`) costs what its real tokens cost, so a budget keeps every step
about equally expensive, whatever the length distribution: many short captions or few long clips.
:class:`TokenBudgetSampler` cuts each epoch's seeded permutation into such batches, deterministically, so that a
resumed run skips exactly the batches it had trained on (:class:`~mmformer.data.loaders.ResumableLoader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from mmformer.data.loaders import GlobalBatchSampler

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer


def sample_costs(
    dataset: Dataset,
    tokenizer: Tokenizer | None,
    *,
    text_max_length: int | None = None,
    seconds: bool = False,
) -> list[tuple[float, ...]]:
    """Per sample, its text tokens (as the collator will tokenize and truncate them; 0 without a tokenizer) and,
    with ``seconds``, its audio duration (the manifest's ``duration`` column), read from the index without loading
    any media."""
    records = _records(dataset)
    texts = [r.text if isinstance(r.text, str) and r.text.strip() else "" for r in records]
    tokens = [0] * len(records)
    if tokenizer is not None:
        masks = tokenizer([t or " " for t in texts], max_length=text_max_length, return_tensors=False)
        tokens = [sum(row) for row in masks["attention_mask"]]
    if not seconds:
        return [(float(t),) for t in tokens]
    missing = [r.source for r in records if getattr(r, "duration", None) is None]
    if missing:
        raise ValueError(
            f"max_batch_seconds: needs each sample's audio duration (a manifest `duration` column); "
            f"{len(missing)} samples have none, e.g. {missing[:3]}"
        )
    return [(float(t), float(r.duration)) for t, r in zip(tokens, records)]


def _records(dataset: Dataset) -> list[Any]:
    if isinstance(dataset, ConcatDataset):
        return [r for d in dataset.datasets for r in _records(d)]
    records = getattr(dataset, "records", None)
    if records is None and hasattr(dataset, "dataset"):  # a wrapper (augmentation): the index is the inner set's
        return _records(dataset.dataset)
    if records is None:
        raise ValueError(
            f"packing with a token budget needs a map-style data set with an index (manifest, COCO, LibriSpeech, "
            f"ImageFolder), got {type(dataset).__name__}"
        )
    return records


def budget_batches(costs: Sequence[Sequence[float]], order: Sequence[int], budgets: Sequence[float | None]) -> list:
    """Cut ``order`` into consecutive batches whose summed costs stay within every budget (None: no limit); a sample
    over a budget on its own makes a batch of one."""
    batches: list[list[int]] = []
    batch: list[int] = []
    totals = [0.0] * len(budgets)
    for i in order:
        cost = costs[i]
        fits = all(b is None or t + c <= b for t, c, b in zip(totals, cost, budgets))
        if batch and not fits:
            batches.append(batch)
            batch, totals = [], [0.0] * len(budgets)
        batch.append(i)
        totals = [t + c for t, c in zip(totals, cost)]
    if batch:
        batches.append(batch)
    return batches


class TokenBudgetSampler(GlobalBatchSampler):
    """The training order in batches that fit a token budget: each item is one batch (a list of indices).

    Epoch e's permutation is seeded by ``seed + e`` (as :class:`GlobalBatchSampler`) and cut into batches by
    :func:`budget_batches`; global step s is batches s*W … s*W+W-1 of that list, rank r taking the r-th (W ranks). A
    last incomplete global step is dropped with ``drop_last``, else completed from the epoch's first batches, so
    every rank runs as many steps. ``start`` skips that many of this rank's batches (a resumed run).

    Args:
        dataset: the map-style data set (only its length is used).
        costs: per sample, its costs (e.g. text tokens, audio seconds), as many as ``budgets``.
        budgets: the most of each cost a batch may hold (None: unlimited).
        num_replicas, rank, shuffle, seed, drop_last: as :class:`GlobalBatchSampler`.
    """

    yields_batches = True  # ResumableLoader: items are batches (batch_size=None), `start` counts batches

    def __init__(
        self,
        dataset: Dataset,
        costs: Sequence[Sequence[float]],
        budgets: Sequence[float | None],
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__(dataset, 1, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if len(costs) != len(dataset):
            raise ValueError(f"costs: expected one per sample ({len(dataset)}), got {len(costs)}")
        if any(b is not None and not b > 0 for b in budgets) or all(b is None for b in budgets):
            raise ValueError(f"budgets: expected at least one budget > 0 (None = unlimited), got {list(budgets)}")
        self.costs, self.budgets = [tuple(c) for c in costs], list(budgets)

    def _batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, from its beginning."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        batches = budget_batches(self.costs, order, self.budgets)
        world = self.num_replicas
        steps, rest = divmod(len(batches), world)
        if rest and not self.drop_last:
            batches += [batches[i % len(batches)] for i in range(world - rest)]  # complete the last global step
            steps += 1
        return batches[self.rank : steps * world : world]

    def __len__(self) -> int:
        return len(self._batches())

    def indices(self) -> list[list[int]]:
        return self._batches()


class BatchedDataset(Dataset):
    """``dataset[list of indices]`` → the list of samples: the data set a loader of :class:`TokenBudgetSampler`
    batches reads (with ``batch_size=None``, the collate function receives each list)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list:
        return [self.dataset[i] for i in indices]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to an augmented data set (it seeds each sample by epoch and index)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
