"""An explicit, preallocated key/value cache for incremental decoding (no hooks, no hidden state).

The cache owns its whole protocol: how many rows and positions it holds (:attr:`batch_size`, :attr:`capacity`,
:attr:`length`), growing (:meth:`ensure`), which cached positions are padding and where each row's next token sits
(:meth:`track`), writing a layer's new keys/values (:meth:`append`) and moving on (:meth:`advance`), reordering rows
for beam search (:meth:`reorder`), and each layer's cross-attention keys/values (:meth:`has_cross`, :meth:`cross`,
:meth:`set_cross`). Nothing outside this module reads its tensors.

Padding: rows of different lengths are decoded together left-padded (real tokens last, so every row's next token
goes to the same column). The cache then keeps a key-padding mask (B, M) and each row's count of real tokens, so
that later steps mask the padded keys and number each row's tokens as if it were alone. Until a padded row
arrives it keeps neither, and decoding takes the unpadded fast paths.

Shape legend: L layers, B batch, nkv key/value heads, hs head size, M capacity (cached positions), T new tokens,
S memory tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


class KVCache:
    """Keys and values of every block of one stack.

    Self-attention entries grow by T tokens per step into preallocated buffers (L, B, nkv, M, hs); the stack calls
    :meth:`advance` once all its blocks have written. Cross-attention keys/values are computed from the memory once,
    on the first step, and reused.

    Args:
        n_layers, batch_size, n_kv_heads, head_dim: the buffers' layout.
        capacity: positions allocated now; :meth:`ensure` grows it.
        cross_dtype: the dtype the cross-attention keys/values are kept in (:meth:`set_cross`); None: theirs.
    """

    static = False  # a StaticKVCache: fixed shapes, a per-query mask (B, T, M) from track
    cross_dtype: torch.dtype | None = None  # the cross-attention keys/values' dtype; None: the dtype they come in

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        cross_dtype: torch.dtype | None = None,
    ):
        shape = (n_layers, batch_size, n_kv_heads, capacity, head_dim)
        self._use(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self._cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.cross_dtype = cross_dtype
        self.length = 0  # tokens already cached
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # reorder's second buffer
        self._mask: torch.Tensor | None = None  # (B, M) True = real token; None while no row has padding
        self._real: torch.Tensor | None = None  # (B,) real tokens cached per row (with _mask)

    @classmethod
    def from_state(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        cross: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    ) -> StateKVCache:
        """A cache holding explicit state: past self-attention keys and values (L, B, nkv, P, hs), and the
        cross-attention keys and values (L, B, nkv, S, hs), or a sequence of L (B, nkv, S, hs) each (an exported
        step's per-layer inputs, never copied), if any. This is how a decoder step with the cache as inputs and
        outputs (an exported graph) runs the model; :meth:`state` and :meth:`cross_state` give the state back."""
        return StateKVCache(keys, values, cross)

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached self-attention keys and values (L, B, nkv, length, hs)."""
        return self._k[:, :, :, : self.length], self._v[:, :, :, : self.length]

    def cross_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the layers that read the memory, stacked (Lc, B, nkv, S, hs): every
        layer's, or the last Lc's when the first ones have no cross-attention (CoCa's decoder runs its causal text
        layers first)."""
        held = [kv for kv in self._cross if kv is not None]
        if not held or any(kv is None for kv in self._cross[len(self._cross) - len(held) :]):
            raise ValueError("KV cache: the cross-attention layers do not all hold keys/values yet; pass the memory")
        return torch.stack([k for k, _ in held]), torch.stack([v for _, v in held])

    # ------------------------------------------------------------------ layout
    @property
    def n_layers(self) -> int:
        """Blocks the cache holds keys/values for."""
        return self._k.shape[0]

    @property
    def batch_size(self) -> int:
        """Rows (sequences) the cache holds."""
        return self._k.shape[1]

    @property
    def capacity(self) -> int:
        """Positions allocated now."""
        return self._k.shape[3]

    def _use(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold buffers k, v (L, B, nkv, M, hs) and each layer's views of them, made once per buffer (a select per
        layer and step is a measurable share of a decoding step)."""
        self._k, self._v = k, v
        self._layers = [(k[i], v[i]) for i in range(k.shape[0])]  # [(keys, values) (B, nkv, M, hs)] * L

    def ensure(self, n: int, *, limit: int | None = None, step: int = 64) -> None:
        """Make room for at least ``n`` positions, keeping what is cached: grow to ``max(n + step, 2 * capacity)``,
        but not beyond ``limit`` (the most positions decoding can reach, e.g. the prompt plus ``max_new_tokens``).
        Growing as decoding goes on keeps memory proportional to the tokens actually decoded, not to a worst case."""
        if n <= self.capacity:
            return
        if limit is not None and n > limit:
            raise ValueError(f"KV cache: {n} positions requested, more than the limit of {limit}")
        size = max(n + step, 2 * self.capacity)
        size = max(n, min(size, limit)) if limit is not None else size
        k = self._k.new_zeros(*self._k.shape[:3], size, self._k.shape[4])
        v = torch.zeros_like(k)
        k[:, :, :, : self.length] = self._k[:, :, :, : self.length]  # (L, B, nkv, length, hs)
        v[:, :, :, : self.length] = self._v[:, :, :, : self.length]
        self._use(k, v)
        self._spare = None
        if self._mask is not None:
            mask = self._mask.new_ones(self.batch_size, size)
            mask[:, : self._mask.shape[1]] = self._mask
            self._mask = mask

    # ------------------------------------------------------------------ padding and positions
    def track(self, mask: torch.Tensor | None, n_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Record which of the next ``n_tokens`` tokens are real (``mask`` (B, T), True = real; None = all) before
        the layers append their keys.

        Returns:
            The key-padding mask (B, length + T) over every cached and new position, and the position ids (B, T) of
            the new tokens (each row counting only its real tokens); both None while no row has had padding, when
            positions are simply ``length … length+T-1``.
        """
        end = self.length + n_tokens
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; decoding needs {end} (call ensure first)")
        if self._mask is None:
            if mask is None or bool(mask.all()):
                return None, None
            self._mask = torch.ones(self.batch_size, self.capacity, dtype=torch.bool, device=self._k.device)
            self._real = torch.full((self.batch_size,), self.length, dtype=torch.long, device=self._k.device)
        new = self._mask.narrow(1, self.length, n_tokens)  # (B, T)
        if mask is None:
            new.fill_(True)
        else:
            new.copy_(mask)
        positions = self._real[:, None] + new.long().cumsum(dim=1) - 1  # (B, T)
        return self._mask[:, :end], positions.clamp(min=0)

    # ------------------------------------------------------------------ self-attention
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v (B, nkv, T, hs) after the cached ones; return all keys/values (B, nkv, length+T, hs)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; decoding needs {end} (call ensure first)")
        keys, values = self._layers[layer]  # (B, nkv, M, hs); narrow/copy_ are cheaper than slice indexing
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` more cached positions, once every layer has appended them."""
        if self._mask is not None:
            self._real += self._mask[:, self.length : self.length + n_tokens].sum(dim=1)
        self.length += n_tokens

    # ------------------------------------------------------------------ cross-attention
    def has_cross(self, layer: int) -> bool:
        """Whether ``layer``'s cross-attention keys/values are cached (they are computed once per memory)."""
        return self._cross[layer] is not None

    def cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s cached cross-attention keys and values (B or B/G, nkv, S, hs)."""
        kv = self._cross[layer]
        if kv is None:
            raise ValueError(f"KV cache: layer {layer} holds no cross-attention keys/values yet; pass the memory")
        return kv

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``layer``'s cross-attention keys and values (B or B/G, nkv, S, hs), contiguous: the fused kernel reads
        strided views (heads interleaved in each row) ~2.5x slower at every decoding step; in ``cross_dtype`` if set
        (bf16: half the bytes every step reads, :func:`mmformer.layers.sdpa.sdpa` meets them in their dtype)."""
        dtype = self.cross_dtype or k.dtype
        self._cross[layer] = (k.to(dtype).contiguous(), v.to(dtype).contiguous())

    # ------------------------------------------------------------------ beams
    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep batch rows ``index`` (beam search reorders hypotheses after each step).

        Only the filled positions are copied, into a second buffer that then swaps with the first (allocated on the
        first reorder), so a step costs one pass over the cached tokens rather than over the capacity.
        ``cross=False`` leaves the cross-attention keys/values alone: exact when each row is only replaced by rows
        that read the same memory, as beams of one sample do.
        """
        if index.shape[0] != self.batch_size:  # a new number of rows: new buffers
            self._use(self._k.index_select(1, index), self._v.index_select(1, index))
            self._spare = None
        else:
            if self._spare is None:
                self._spare = (torch.empty_like(self._k), torch.empty_like(self._v))
            n = self.length
            spare_k, spare_v = self._spare
            torch.index_select(self._k[:, :, :, :n], 1, index, out=spare_k[:, :, :, :n])  # (L, B, nkv, n, hs)
            torch.index_select(self._v[:, :, :, :n], 1, index, out=spare_v[:, :, :, :n])
            self._spare = (self._k, self._v)
            self._use(spare_k, spare_v)
        if self._mask is not None:
            self._mask, self._real = self._mask.index_select(0, index), self._real.index_select(0, index)
        if cross:
            self._cross = [
                None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                for kv in self._cross
            ]


class StateKVCache(KVCache):
    """The cache of one decoding step whose state is its inputs and outputs (an exported graph's,
    :meth:`KVCache.from_state`): each layer's past keys/values (B, nkv, P, hs) as given, the step's new ones joined on
    by concatenation, and :meth:`state` stacks the layers once at the end.

    Nothing is written in place: the exported form of a write into one layer's view of a stacked buffer is a scatter
    over the whole buffer, per layer and per keys/values — onnxruntime's ScatterElements took 20.6 of a 48-ms step at
    whisper-tiny dimensions (batch 8, 32 cached tokens), and the copies grow with every token. Rows carry no padding
    (a key-padding mask for the self-attention is refused), and the cache holds exactly one step.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        cross: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    ):
        if keys.shape != values.shape or keys.ndim != 5:
            raise ValueError(
                f"keys, values: expected two (L, B, nkv, P, hs) tensors of one shape, got {tuple(keys.shape)} and "
                f"{tuple(values.shape)}"
            )
        self._past = list(zip(keys, values))  # [(keys, values) (B, nkv, P, hs)] * L: views of the inputs
        self._joined: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * keys.shape[0]
        held = [] if cross is None else list(zip(cross[0], cross[1]))  # the last len(held) layers' (cross_state)
        if len(held) > keys.shape[0]:
            raise ValueError(f"cross: expected keys/values of at most {keys.shape[0]} layers, got {len(held)}")
        self._cross = [None] * (keys.shape[0] - len(held)) + held
        self.length = keys.shape[3]

    @property
    def n_layers(self) -> int:
        return len(self._past)

    @property
    def batch_size(self) -> int:
        return self._past[0][0].shape[0]

    @property
    def capacity(self) -> int:
        """The positions held: no room is kept, a step's keys are joined on by concatenation."""
        return self.length

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values after the step, stacked (L, B, nkv, P + T, hs)."""
        if any(kv is None for kv in self._joined):
            raise ValueError("KV cache: the step has not run through every layer yet")
        return torch.stack([k for k, _ in self._joined]), torch.stack([v for _, v in self._joined])

    def ensure(self, n: int, *, limit: int | None = None, step: int = 64) -> None:
        raise ValueError("KV cache: a state cache holds one step's inputs and cannot grow; decode with make_cache")

    def track(self, mask: torch.Tensor | None, n_tokens: int) -> tuple[None, None]:
        """Rows carry no padding here: ``mask`` must be None (every new token real)."""
        if mask is not None:
            raise ValueError("mask: a state cache (an exported step) decodes rows without padding; got a mask")
        return None, None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Join new k, v (B, nkv, T, hs) onto the layer's past ones; return all keys/values (B, nkv, P + T, hs)."""
        past_k, past_v = self._past[layer]
        self._joined[layer] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        return self._joined[layer]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        raise ValueError("KV cache: a state cache holds one step; reorder the state outside the graph")


def _fixed_address(t: torch.Tensor) -> None:
    """Tell dynamo that a CUDA buffer keeps its address (a CUDA graph reads it in place instead of copying it in at
    each replay). Not on CPU, where nothing is captured: inductor's freezing folds such marked tensors into the
    compiled code as constants, as it does parameters, and a static cache's buffers change at every step."""
    if t.device.type == "cuda":
        torch._dynamo.mark_static_address(t)


def _device_memory(device: torch.device | str | None) -> int | None:
    """Bytes of memory the device has in all (None where unknown): the most any allocation there can get."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def _check_fits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> None:
    """Refuse a static cache whose keys and values (``shape`` each) exceed the device's whole memory, before trying:
    with relative positions (RoPE) nothing else bounds its length, and a huge ``max_new_tokens`` (a "no limit"
    10**9) met the allocator's bare "can't allocate memory" (where memory is overcommitted, zero-filling it could get
    the process killed instead). The growing cache takes only what the decoded tokens use."""
    layers, rows, heads, positions, head_dim = shape
    needed = 2 * layers * rows * heads * positions * head_dim * dtype.itemsize
    total = _device_memory(device)
    if total is not None and needed > total:
        raise ValueError(
            f"max_new_tokens: a static KV cache of {positions} positions (prompt + max_new_tokens) for {rows} rows "
            f"needs {needed / 2**30:,.1f} GiB of keys and values, more than the {torch.device(device or 'cpu').type} "
            f"memory's {total / 2**30:,.1f} GiB; lower max_new_tokens, or decode with cache='dynamic' (it grows with "
            "the tokens actually decoded)"
        )


class StaticKVCache(KVCache):
    """A :class:`KVCache` preallocated to its full length whose decoding step has fixed shapes and reads no host
    value, so that ``torch.compile`` traces it once and, on CUDA, ``mode="reduce-overhead"`` captures it as a CUDA
    graph (Hugging Face's ``StaticCache``).

    What differs from the growing cache, all of it so that no shape and no Python number changes from step to step:

    - attention reads the whole buffers (B, nkv, M, hs) at every step; positions not yet written (or written by a
      padding token) are masked out by a per-query mask (B, T, M) that :meth:`track` returns, causality included
      (the mask convention's (B, T, S) form);
    - the next write position, each row's count of real tokens and the mask live in device tensors, updated in
      place; :attr:`length` reads the position back (a host sync: for the code around a step, never inside it);
    - the buffers never move (:meth:`reorder` copies in place; :meth:`ensure` cannot grow them), and on CUDA are
      marked as static addresses for CUDA graphs (:func:`_fixed_address`), the cross-attention keys/values too (a
      graph copies any other input into its own buffers at every replay); :meth:`reset` empties the cache for the
      next decoding of the same shape, keeping every buffer where it is, so a captured graph replays on them.

    Position ids are always given per row, so absolute positions and RoPE work; ALiBi and T5's relative bias, which
    assume the queries are the last of the keys, are refused where the cache is made (:meth:`Stack.make_cache`).
    """

    static = True

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if capacity < 1:
            raise ValueError(f"capacity: a static KV cache needs at least one position, got {capacity}")
        shape = (n_layers, batch_size, n_kv_heads, capacity, head_dim)
        _check_fits(shape, dtype, device)
        self._use(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self._cross = [None] * n_layers
        self._spare = None
        self._mask = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, M) written and real
        self._real = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) real tokens written per row
        self._position = torch.zeros((), dtype=torch.long, device=device)  # the next column to write
        self._columns = torch.arange(capacity, device=device)  # (M,)
        self._cross_buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        for t in (self._k, self._v, self._mask, self._real, self._position, self._columns):
            _fixed_address(t)
        for k, v in self._layers:
            _fixed_address(k)
            _fixed_address(v)

    @property
    def length(self) -> int:
        """Tokens already cached (read back from the device: a host sync)."""
        return int(self._position)

    def fits(self, batch_size: int, capacity: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this cache has exactly this layout (it can then be :meth:`reset` and decode again)."""
        return (self.batch_size, self.capacity, self._k.device, self._k.dtype) == (batch_size, capacity, device, dtype)

    def reset(self) -> None:
        """Empty the cache in place for a new decoding: nothing cached, no cross-attention keys/values (their buffers
        are kept and refilled by :meth:`set_cross`)."""
        for t in (self._k, self._v, self._mask, self._real, self._position):
            t.zero_()
        self._cross = [None] * self.n_layers

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``layer``'s cross-attention keys and values in buffers of fixed address (refilled in place when the
        layout is the same as the last decoding's)."""
        held = self._cross_buffers[layer]
        if held is None or held[0].shape != k.shape or held[0].dtype != k.dtype or held[0].device != k.device:
            held = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))  # contiguous
            for t in held:
                _fixed_address(t)
            self._cross_buffers[layer] = held
        held[0].copy_(k)
        held[1].copy_(v)
        self._cross[layer] = held

    def ensure(self, n: int, *, limit: int | None = None, step: int = 64) -> None:
        """Check that ``n`` positions fit: a static cache never grows (its buffers are a compiled graph's inputs)."""
        if n > self.capacity:
            raise ValueError(
                f"static KV cache holds {self.capacity} positions; decoding needs {n}: make it for the longest "
                "sequence (prompt + max_new_tokens)"
            )

    def _new_columns(self, n_tokens: int) -> torch.Tensor:
        return self._position + self._columns[:n_tokens]  # (T,) the columns the next tokens are written to

    def track(self, mask: torch.Tensor | None, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record which of the next ``n_tokens`` tokens are real (``mask`` (B, T), True = real; None = all).

        Returns:
            The keys each new token may attend to (B, T, M): written, real, and at or before its own column; and
            the position ids (B, T) of the new tokens, each row counting only its real tokens.
        """
        columns = self._new_columns(n_tokens)  # (T,)
        new = (
            torch.ones(self.batch_size, n_tokens, dtype=torch.bool, device=self._mask.device)
            if mask is None
            else mask.bool()
        )  # (B, T)
        self._mask.index_copy_(1, columns, new)
        positions = (self._real[:, None] + new.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        allowed = self._mask[:, None, :] & (self._columns[None, None, :] <= columns[None, :, None])  # (B, T, M)
        return allowed, positions

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v (B, nkv, T, hs) at the next columns; return the whole buffers (B, nkv, M, hs)."""
        keys, values = self._layers[layer]
        columns = self._new_columns(k.shape[2])
        keys.index_copy_(2, columns, k)
        values.index_copy_(2, columns, v)
        return keys, values

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` more cached positions (device tensors only)."""
        self._real.add_(self._mask.index_select(1, self._new_columns(n_tokens)).sum(dim=1))
        self._position.add_(n_tokens)

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep batch rows ``index`` (B,), copied in place (the buffers keep their addresses); every position is
        copied (a fixed-shape copy). A static cache keeps its batch size."""
        if index.shape[0] != self.batch_size:
            raise ValueError(f"index: a static KV cache keeps its {self.batch_size} rows, got {index.shape[0]}")
        for buffer in (self._k, self._v):
            buffer.copy_(buffer.index_select(1, index))
        self._mask.copy_(self._mask.index_select(0, index))
        self._real.copy_(self._real.index_select(0, index))
        if cross:
            self._cross = [
                None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                for kv in self._cross
            ]
