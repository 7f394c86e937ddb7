"""An explicit, preallocated key/value cache for incremental decoding (no hooks, no hidden state).

Shape legend: L layers, B batch, nkv key/value heads, hs head size, M maximum cached length, T new tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every block of one stack.

    Self-attention entries grow by T tokens per step into preallocated buffers (L, B, nkv, M, hs); the stack calls
    :meth:`advance` once all its blocks have written. Cross-attention keys/values are computed from the memory once,
    on the first step, and reused.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch_size, n_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.length = 0  # tokens already cached
        self.max_length = max_length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v (B, nkv, T, hs) after the cached ones; return all keys/values (B, nkv, length+T, hs)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; decoding needs {end}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search reorders hypotheses after each step)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.cross = [
            None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index)) for kv in self.cross
        ]
