"""Small helpers several test files share (import as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer (SIGALRM: the main thread, POSIX)."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def randomize_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random values in every parameter of a reference model (norm scales near 1, the rest N(0, scale²); logit
    scales and biases keep their values), so that a swapped or skipped weight shows in a parity test."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "logit" in name:
                continue
            norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm_scale else scale * torch.randn_like(p))
    return module.eval()


def frozen_tensors() -> list[torch.Tensor]:
    """The tensors inductor's generated modules hold: the constants of frozen graphs (``FrozenCompile``), which torch
    keeps for the process's life unless released."""
    from torch._inductor.codecache import PyCodeCache

    return [v for m in PyCodeCache.modules for v in vars(m).values() if isinstance(v, torch.Tensor)]
