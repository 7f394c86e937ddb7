"""Training steps with a NaN/Inf loss or gradient: ``stop`` raises :class:`NonFiniteLossError`, ``skip`` warns and
drops the step's update. Weights are never updated with non-finite values either way.

Every check is decided jointly by all ranks (one boolean all-reduce), so that DDP's collectives stay in step: one host
sync per step for the loss, one more for the gradients when there is no GradScaler (with fp16's GradScaler, inf
gradients are the scaler's business: it skips the step and lowers its scale).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

POLICIES = ("skip", "stop")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN/Inf loss or gradient and ``nonfinite='stop'`` was configured."""


class NonFiniteGuard:
    """What a task does with a non-finite step, by ``policy`` (``skip`` or ``stop``)."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite: expected one of {list(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0  # steps skipped so far
        self._skip = False  # the current step's loss was non-finite somewhere

    def check_loss(
        self, trainer: L.Trainer, loss: torch.Tensor, parts: dict[str, torch.Tensor], batch: dict, batch_idx: int
    ) -> None:
        """After the forward pass: a non-finite loss on any rank stops training or marks the step to be skipped."""
        local = not bool(torch.isfinite(loss.detach()))
        if trainer.strategy.reduce_boolean_decision(local, all=False):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            self._report(trainer, f"loss ({values})" if local else "loss on another rank", batch, batch_idx)
            # skip: backward still runs (Lightning forbids skipping it under DDP, where every rank must join the
            # gradient all-reduce); before_optimizer_step then drops the gradients, so nothing is updated.
            self._skip = True

    def before_optimizer_step(
        self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter]
    ) -> None:
        """Before the update: check the gradients (without a GradScaler), and drop the update of a skipped step."""
        skip, self._skip = self._skip, False
        parameters = list(parameters)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not skip and scaler is None:  # a finite loss can still give NaN/Inf gradients
            grads = [p.grad for p in parameters if p.grad is not None]
            local = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if trainer.strategy.reduce_boolean_decision(local, all=False):
                self._report(trainer, "gradient", {}, trainer.fit_loop.epoch_loop.batch_idx)
                skip = True
        if skip:
            raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
            if scaler is not None and getattr(raw, "_step_supports_amp_scaling", False):
                # A fused optimizer unscales inside its step, so the GradScaler has not looked at the gradients
                # yet: make them non-finite and the scaler skips the step itself (and lowers its scale).
                for param in parameters:
                    if param.grad is not None:
                        param.grad.fill_(float("nan"))
            else:
                optimizer.zero_grad(set_to_none=True)  # no gradient, no update: optimizers skip such parameters

    def _report(self, trainer: L.Trainer, what: str, batch: dict[str, Any], batch_idx: int) -> None:
        """Raise (``stop``) or warn (``skip``), naming the step, the batch and its first samples."""
        sources = batch.get("source") or []
        rank = f"rank {trainer.global_rank}, " if trainer.world_size > 1 else ""
        where = (
            f"global step {trainer.global_step} ({rank}epoch {trainer.current_epoch}, batch {batch_idx}"
            + (f", samples {list(sources[:4])}{' …' if len(sources) > 4 else ''}" if sources else "")
            + ")"
        )
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at {where}; weights were not updated. Lower the learning rate, check the data, "
                "or pass nonfinite='skip' to skip such steps"
            )
        self.skipped += 1
        warnings.warn(f"skipping the step at {where}: non-finite {what} ({self.skipped} skipped so far)", stacklevel=3)
