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
        self._use(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.length = 0  # tokens already cached
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # reorder's second buffer
        self.max_length = max_length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v (B, nkv, T, hs) after the cached ones; return all keys/values (B, nkv, length+T, hs)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; decoding needs {end}")
        keys, values = self.layers[layer]  # (B, nkv, M, hs); narrow/copy_ are cheaper than slice indexing
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def _use(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold buffers k, v (L, B, nkv, M, hs) and each layer's views of them, made once per buffer (a select per
        layer and step is a measurable share of a decoding step)."""
        self.k, self.v = k, v
        self.layers = [(k[i], v[i]) for i in range(k.shape[0])]  # [(keys, values) (B, nkv, M, hs)] * L

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep batch rows ``index`` (beam search reorders hypotheses after each step).

        Only the filled positions are copied, into a second buffer that then swaps with the first (allocated on the
        first reorder), so a step costs one pass over the cached tokens rather than over ``max_length``.
        ``cross=False`` leaves the cross-attention keys/values alone: exact when each row is only replaced by rows
        that read the same memory, as beams of one sample do.
        """
        if index.shape[0] != self.k.shape[1]:  # a new number of rows: new buffers
            self._use(self.k.index_select(1, index), self.v.index_select(1, index))
            self._spare = None
        else:
            if self._spare is None:
                self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
            n = self.length
            spare_k, spare_v = self._spare
            torch.index_select(self.k[:, :, :, :n], 1, index, out=spare_k[:, :, :, :n])  # (L, B, nkv, n, hs)
            torch.index_select(self.v[:, :, :, :n], 1, index, out=spare_v[:, :, :, :n])
            self._spare = (self.k, self.v)
            self._use(spare_k, spare_v)
        if cross:
            self.cross = [
                None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                for kv in self.cross
            ]
