"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the base rate, per optimizer step.

Its length is ``schedule.max_steps`` or the optimizer steps the trainer will take (:func:`schedule_length`), and it
steps once per optimizer step (:func:`counts_updates`)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from mmformer.values import is_int

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities.types import LRSchedulerConfig


class WarmupCosine:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    Step s (0-based) gets ``(s + 1) / warmup_steps`` during warmup (open_clip's ramp, so that the first step
    already trains), then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with p going from 0 to 1
    over the remaining ``max_steps - warmup_steps`` steps, and ``min_lr_ratio`` after ``max_steps``.

    A callable object rather than a closure: ``LambdaLR.state_dict`` stores its plain attributes, so checkpoints
    stay loadable with ``torch.load(weights_only=True)``. A resumed run follows the curve its configuration gives
    (:func:`take_saved_curves`, :func:`resume_curves`): the same one when resuming an interrupted run, a longer one
    when a finished run is continued with more steps.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0):
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not is_int(max_steps) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :class:`WarmupCosine` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))


def schedule_length(max_steps: int | None, trainer: Trainer | None) -> int:
    """The cosine's length: ``max_steps`` (``schedule.max_steps``) if set, else the optimizer steps ``trainer`` will
    take (at least 1: a run of ``max_steps=0`` builds, checks and saves, and the schedule still needs a length).

    Lightning's ``estimated_stepping_batches`` divides by the trainer's ``accumulate_grad_batches``, which a
    ``GradientAccumulationScheduler`` changes only as its epochs come: the steps are counted from its scheduling
    instead (a 3-epoch run accumulating {0: 1, 1: 4} over 4 batches an epoch steps 4 + 1 + 1 times, not 12, and its
    cosine stopped half-way)."""
    if max_steps:
        return max_steps
    if trainer is None:
        raise ValueError("schedule.max_steps: expected an int outside a Trainer (the length comes from the trainer's)")
    total = trainer.estimated_stepping_batches  # also loads the training data, for num_training_batches
    accumulation = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if accumulation is not None and math.isfinite(batches) and epochs not in (None, -1):
        total = sum(math.ceil(batches / accumulation.get_accumulate_grad_batches(e)) for e in range(max(epochs, 1)))
        total = min(total, trainer.max_steps) if trainer.max_steps != -1 else total
    if not math.isfinite(total) or total < 0:  # -1: streaming data of unknown length and no max_steps
        raise ValueError(
            "schedule.max_steps: the trainer's number of steps is unknown (max_steps=-1 with max_epochs=-1, or "
            "streaming data without trainer.max_steps), so the cosine schedule needs an explicit max_steps"
        )
    return max(1, int(total))


def counts_updates(scheduler: Any, configs: list[LRSchedulerConfig]) -> bool:
    """Whether ``scheduler`` counts optimizer steps (a step-interval schedule that reads no metric, as the task's),
    and so steps only as far as the trainer's global step. An epoch-interval or metric-driven one (a subclass's
    ``ReduceLROnPlateau``) steps as Lightning steps it."""
    return any(c.scheduler is scheduler and c.interval == "step" and not c.reduce_on_plateau for c in configs)


def take_saved_curves(checkpoint: dict[str, Any]) -> list[list[dict[str, Any] | None]]:
    """Remove the curves' settings from a checkpoint's ``LambdaLR`` states (``load_state_dict`` would put them over
    the configured ones) and return them, per scheduler. A finished 4-step run continued to 8 steps kept its saved
    ``max_steps=4`` and trained at the rate's floor, 0 by default, without a word; with them removed the configured
    curve applies, as with Lightning's and Hugging Face's closures (which are not saved)."""
    saved = []
    for state in checkpoint.get("lr_schedulers") or []:
        curves = state.get("lr_lambdas")
        saved.append(list(curves) if curves else [])
        if curves:
            state["lr_lambdas"] = [None] * len(curves)
    return saved


def resume_curves(schedulers: list[Any], saved: list[list[dict[str, Any] | None]]) -> None:
    """When training starts again: each ``LambdaLR``'s rates from its configured curve at the restored step (the
    optimizer's saved rates are the old curve's), and a warning naming what changed against the saved curve."""
    for scheduler, curves in zip(schedulers, saved):
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            continue
        olds = curves or [None] * len(scheduler.lr_lambdas)
        for group, base, curve, old in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, olds
        ):
            if isinstance(curve, WarmupCosine) and isinstance(old, dict):
                changed = {k: (v, getattr(curve, k)) for k, v in old.items() if getattr(curve, k, v) != v}
                if changed:
                    warnings.warn(
                        "schedule: the resumed run's curve differs from the checkpoint's ("
                        + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                        + f"); the learning rate follows the new one from step {scheduler.last_epoch}",
                        stacklevel=2,
                    )
            group["lr"] = base * curve(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
