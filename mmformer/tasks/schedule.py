"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the base rate, per optimizer step."""

from __future__ import annotations

import math

import torch

from mmformer.values import is_int


class WarmupCosine:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    Step s (0-based) gets ``(s + 1) / warmup_steps`` during warmup (open_clip's ramp, so that the first step
    already trains), then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with p going from 0 to 1
    over the remaining ``max_steps - warmup_steps`` steps, and ``min_lr_ratio`` after ``max_steps``.

    A callable object rather than a closure: ``LambdaLR.state_dict`` stores its plain attributes, so checkpoints
    stay loadable with ``torch.load(weights_only=True)`` and a resumed run continues the same curve.
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
