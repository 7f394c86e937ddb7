"""Batch order that resumes exactly: epoch e of map-style data is a permutation seeded by ``seed + e``, cut into
global batches of ``batch_size`` times the number of processes, rank r taking the r-th block of each
(:class:`GlobalBatchSampler`); the training loader (:class:`ResumableLoader`) saves its position within the epoch in
every checkpoint and continues at the next batch. Evaluation data on several processes is split without repeats
(:class:`EvaluationSampler`). Streaming data sets are told the epoch before each pass
(:class:`EpochLoader`). The data module (:mod:`mmformer.data.datamodule`) and the token-budget batches
(:mod:`mmformer.data.packing`) build on these.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mmformer.data.seeding import mix_seed
from mmformer.values import is_int


def niced(increment: int) -> Callable[[int], None] | None:
    """A DataLoader ``worker_init_fn`` that adds ``increment`` to each worker's niceness (None for 0): see
    the data module's ``worker_nice``."""
    return functools.partial(_renice, increment) if increment else None


def _renice(increment: int, worker_id: int) -> None:
    os.nice(increment)


class EpochLoader(DataLoader):
    """A DataLoader that tells a streaming data set the epoch before each pass (for its shuffle).

    Lightning calls ``set_epoch`` on samplers only, and an IterableDataset has none; the data set is copied
    into worker processes when iteration starts, so setting it here reaches them. The epoch is ``epoch()`` (the
    trainer's, so a resumed run reshuffles as the interrupted one did) or, where that gives None, the number of
    passes so far; it is read at the first ``next``, after Lightning has moved to the epoch.
    """

    def __init__(self, dataset: IterableDataset, *args: Any, epoch: Callable[[], int | None] | None = None, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.epoch, self._passes = epoch, 0

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = self.epoch() if self.epoch is not None else None
        self.dataset.set_epoch(self._passes if epoch is None else epoch)
        self._passes += 1
        yield from super().__iter__()


class GlobalBatchSampler(DistributedSampler):
    """The training order: a permutation of the data set seeded by ``(seed, epoch)``, cut into global batches of
    ``batch_size * num_replicas`` samples, each rank taking its own contiguous block of every global batch.

    So the samples of global step s are the same whatever the number of processes, as long as the global batch is:
    rank r's batch s is ``perm[s*G + r*B : s*G + (r+1)*B]`` (G = B * num_replicas), and the ranks' batches
    concatenated in rank order are exactly the batch s of one process with ``batch_size=G``. (Torch's
    DistributedSampler interleaves instead: rank r takes ``perm[r::num_replicas]``.) A last incomplete global batch
    is dropped with ``drop_last``; otherwise it is split evenly over the ranks, padded from the start of the
    permutation when it does not divide (as DistributedSampler pads), so that every rank runs as many steps.

    ``start`` (set by :class:`ResumableLoader`) skips that many of this rank's indices of the epoch: a resumed run
    skips indices, never loads samples it does not use. It is a DistributedSampler so that Lightning keeps it
    under DDP instead of substituting its own (which always shuffles and interleaves).

    Args:
        dataset: the map-style data set (only its length is used).
        batch_size: samples per batch and rank.
        num_replicas: number of processes (ranks).
        rank: this process's rank.
        shuffle: permute each epoch; otherwise the data set order.
        seed: seed of the permutation (epoch e uses ``seed + e``, as DistributedSampler).
        drop_last: drop the last incomplete global batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.start = 0

    def _layout(self) -> tuple[int, int]:
        """(full global batches, samples per rank in the last partial global batch) of an epoch."""
        n, world = len(self.dataset), self.num_replicas
        full, rest = divmod(n, self.batch_size * world)
        return full, 0 if self.drop_last or rest == 0 else -(-rest // world)

    def __len__(self) -> int:
        full, tail = self._layout()
        return full * self.batch_size + tail

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, from its beginning."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        b, world = self.batch_size, self.num_replicas
        full, tail = self._layout()
        mine = []
        for step in range(full):
            base = step * b * world + self.rank * b
            mine.extend(order[base : base + b])
        if tail:
            last = order[full * b * world :]
            last += [order[i % n] for i in range(tail * world - len(last))]  # pad from the start
            mine.extend(last[self.rank * tail : (self.rank + 1) * tail])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])


class EvaluationSampler(DistributedSampler):
    """Evaluation batches of several processes: each sample exactly once across the ranks, in order, and every rank
    as many batches.

    Torch's DistributedSampler, which Lightning puts into evaluation loaders, pads the data set with repeats to a
    multiple of the ranks, and the metrics counted them: 23 samples on 2 ranks scored 24. Here the data set is cut
    in order into ``steps * num_replicas`` consecutive batches of near-equal sizes, rank r taking batches r, r + W,
    r + 2W, ... (W ranks): every rank runs the same number of steps (the contrastive loss gathers features from all
    ranks at each one), of at most ``batch_size`` samples (one more where ``batch_size`` is 1 and the ranks do not
    divide the samples). With fewer samples than ranks, the ranks left without one repeat one (with a warning).

    Each item is a batch (a list of indices) for ``DataLoader(BatchedDataset(dataset), sampler=..., batch_size=None)``.
    It is a DistributedSampler so that Lightning keeps it instead of substituting its own.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0):
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size
        if 0 < len(dataset) < num_replicas:
            rank_zero_warn(
                f"evaluation data: {len(dataset)} samples on {num_replicas} processes; those without a sample "
                "evaluate a repeat of one, which the metrics count twice"
            )

    def batches(self) -> list[list[int]]:
        """This rank's batches."""
        n, world = len(self.dataset), self.num_replicas
        if n == 0:
            return []
        steps = max(1, min(-(-n // (self.batch_size * world)), n // world))  # every batch of every rank non-empty
        size, rest = divmod(n, steps * world)
        starts = [k * size + min(k, rest) for k in range(steps * world + 1)]  # the first `rest` batches one larger
        mine = [list(range(a, b)) for a, b in zip(starts[self.rank :: world], starts[self.rank + 1 :: world])]
        return [batch or [self.rank % n] for batch in mine]  # empty only with fewer samples than ranks

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


class ResumableLoader(DataLoader):
    """A training DataLoader whose position within an epoch is saved in and restored from checkpoints.

    Give it a :class:`GlobalBatchSampler` (``ResumableLoader(dataset, sampler=GlobalBatchSampler(dataset, 32))``;
    the batch size defaults to the sampler's). Lightning stores ``state_dict()`` (the epoch, the batches yielded
    in it, and the layout they refer to) in every checkpoint, and calls ``load_state_dict`` on resume before it
    asks for the first batch. The iterator is built lazily, at the first ``next``: by then Lightning has called
    ``sampler.set_epoch``, so a saved position applies only to the epoch it was saved in (a checkpoint from the
    end of an epoch resumes at the start of the next), and the skipped batches are skipped as indices, never
    loaded. Workers' seeds derive from ``(seed, epoch, rank)`` through the loader's own generator, so neither
    creating an iterator nor a resume touches the global random state the model draws dropout from.

    Exact when the data set, seed, shuffle and global batch size (batch size times processes) are those of the
    saved run; the number of processes may change. Otherwise the epoch resumes at the same batch count with a
    warning. With another sampler (Lightning substitutes one for ``overfit_batches``) it is a plain DataLoader.
    """

    def __init__(self, dataset: Dataset, batch_size: int | None = None, shuffle: bool | None = None, **kwargs: Any):
        sampler = kwargs.get("sampler")
        if getattr(sampler, "yields_batches", False):  # a TokenBudgetSampler: each item is a whole batch
            batch_size = None
        elif batch_size is None:
            batch_size = sampler.batch_size if isinstance(sampler, GlobalBatchSampler) else 1
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)
        self._epoch = getattr(self.sampler, "epoch", 0)
        self._batches = 0
        self._pending: dict[str, Any] | None = None

    def _layout(self) -> dict[str, Any]:
        s = self.sampler
        if not isinstance(s, GlobalBatchSampler):
            return {"samples": len(self.dataset), "global_batch_size": self.batch_size}
        return {
            "samples": len(self.dataset),
            "global_batch_size": s.batch_size * s.num_replicas,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "drop_last": s.drop_last,
            **({"budgets": list(s.budgets)} if hasattr(s, "budgets") else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: the epoch and the number of batches yielded in it (plain ints, for safe loading)."""
        return {"epoch": self._epoch, "batches": self._batches, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position when iteration next starts in the same epoch."""
        if not isinstance(state, dict) or not {"epoch", "batches"} <= set(state):
            raise ValueError(f"state: expected a ResumableLoader state_dict with epoch and batches; got {state!r}")
        self._pending = dict(state)

    def _start(self, epoch: int) -> int:
        """Batches of ``epoch`` to skip (those a resumed checkpoint had already trained on)."""
        state, self._pending = self._pending, None
        if state is None or state["epoch"] != epoch or not state["batches"]:
            return 0
        skip = min(int(state["batches"]), len(self))
        if not isinstance(self.sampler, GlobalBatchSampler):
            rank_zero_warn(
                f"resuming the training data at batch {skip} of epoch {epoch}: a {type(self.sampler).__name__} "
                "cannot skip, so this epoch restarts from its first batch"
            )
            return 0
        changed = {k: (state[k], v) for k, v in self._layout().items() if k in state and state[k] != v}
        if changed:
            rank_zero_warn(
                f"resuming the training data at batch {skip} of epoch {epoch}, but the data layout changed since "
                f"the checkpoint ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}): the rest of "
                "this epoch will not be the samples the interrupted run would have seen"
            )
        return skip

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()  # a generator: nothing runs before the first next(), after Lightning's set_epoch

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        skip = self._start(epoch)
        self._epoch, self._batches = epoch, skip
        if isinstance(sampler, GlobalBatchSampler):
            sampler.start = skip * sampler.batch_size
            if self.generator is not None:  # the workers' base seed
                self.generator.manual_seed(mix_seed(sampler.seed, epoch, sampler.rank))
        if hasattr(self.dataset, "set_epoch"):  # an augmented set seeds each sample by (seed, epoch, index)
            self.dataset.set_epoch(epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch


def resume_cut_epoch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written when ``fit`` ended at ``max_steps`` part-way through an epoch resume inside that
    epoch, as one written during training does (in place, before Lightning restores its loops).

    Lightning counts the cut epoch as completed when ``fit`` ends, so a run continued from its ``last.ckpt`` with
    more steps started the next epoch: the loader's saved position (epoch e, b batches) no longer applied and the
    rest of epoch e was never trained on. When the loop's epochs completed is the loader's epoch + 1 and the last
    batch was not the epoch's last, that count is taken back. Other checkpoints are left as they are."""
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    loaders = (fit.get("state_dict") or {}).get("combined_loader") or []
    if not isinstance(epochs, dict) or not isinstance(batches, dict) or batches.get("is_last_batch", True):
        return
    saved = {s["epoch"] for s in loaders if isinstance(s, dict) and s.get("batches") and is_int(s.get("epoch"))}
    if len(saved) != 1:
        return
    epoch = saved.pop()
    if epochs.get("current", {}).get("completed") != epoch + 1:
        return
    for part in ("total", "current"):
        for key in ("processed", "completed"):
            epochs[part][key] -= 1
    checkpoint["epoch"] = epoch
