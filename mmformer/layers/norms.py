"""Normalisation layers looked up by name, so configs stay plain strings."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm or RMSNorm over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
