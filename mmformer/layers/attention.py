"""Self- and cross-attention through ``F.scaled_dot_product_attention`` (fused flash / memory-efficient kernels).

Mask convention, used everywhere in mmformer: a boolean key-padding mask (B, S) with True = a real token that may be
attended to. Causal attention over right padding (real tokens first, the layout every mmformer tokenizer and
collator produces) takes ``is_causal`` alone, exact for every real position, and builds no (T, S) mask; left padding
(batched generation prompts) combines the key mask with the causal triangle. A query that may attend to nothing (a
left pad) gets zeros from SDPA, and no real query ever reads it.

The padding layout (is anything padded; is it right padding) is a property of the data, so it is decided once per
stack call by :func:`key_mask`, outside the blocks, and never inside attention: a compiled block (``torch.compile``,
``torch.export``) then holds no data-dependent branch and no host sync. Where nothing decided it (a traced whole
model), attention takes the general path, the key mask combined with the causal triangle, exact for any layout.

Additive biases (ALiBi's, T5's learned relative bias) pass to SDPA as a float ``attn_mask`` (nh, T, S) with -inf
where attention is not allowed.

Shape legend: B batch, T query tokens, S key tokens, D width, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmformer.config import StackConfig
from mmformer.layers.cache import KVCache
from mmformer.layers.documents import Documents, document_attention
from mmformer.layers.norms import make_norm
from mmformer.layers.positions import RotaryEmbedding, alibi_bias, alibi_slopes
from mmformer.layers.sdpa import sdpa


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive ``softmax(QKᵀ/√hs + bias + mask) V`` (``scale`` instead of 1/√hs if given) that materialises the (T, S)
    scores. For tests only.

    q (B, nh, T, hs); k, v (B, nkv, S, hs); mask (B, S) key padding; bias broadcastable to (B, nh, T, S).
    Queries are the last T of S positions when causal.
    """
    nh, nkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    if bias is not None:
        scores = scores + bias
    T, S = scores.shape[-2:]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=S - T)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


class CrossAttentionScores:
    """An explicit, opt-in collector of the cross-attention scores ``q·kᵀ·scale`` (B, n, T, S) of chosen heads, before
    the softmax (Whisper's word timestamps read its alignment heads, and take the softmax over the audio frames
    that hold speech). Passed as ``cross_scores=`` to :meth:`~mmformer.MultimodalTransformer.decode`; the attention
    output itself still comes from SDPA. ``heads`` maps a decoder block's index to the heads to keep."""

    def __init__(self, heads: dict[int, list[int]]):
        self.heads = {int(layer): list(h) for layer, h in heads.items()}
        self.scores: dict[int, torch.Tensor] = {}  # block index → (B, len(heads[layer]), T, S)

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        """Keep the scores of this block's chosen heads: q (B, nh, T, hs), k (B, nkv, S, hs)."""
        if layer not in self.heads:
            return
        heads = torch.tensor(self.heads[layer], device=q.device)
        kv_heads = heads // (q.shape[1] // k.shape[1])  # the key/value head each query head reads (GQA)
        scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
        keys = k[:, kv_heads].to(q.dtype)  # a cache's bf16 keys, read in the queries' dtype
        self.scores[layer] = (q[:, heads] @ keys.transpose(-1, -2)).float() * scale  # (B, n, T, S)


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row is real tokens followed only by padding (a host sync: call it outside compiled code)."""
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())


def key_mask(mask: torch.Tensor | None, *, causal_alone: bool = False) -> torch.Tensor | None:
    """The key-padding mask (B, S) attention still needs after looking at the data once: None when nothing is padded
    (SDPA then picks its fastest kernel), or when ``causal_alone`` — causal self-attention whose queries are all the
    keys, over right padding, with no padded query that matters — makes ``is_causal`` exact for every real position.

    It reads the data (a host sync), so a :class:`~mmformer.layers.block.Stack` calls it once per forward, before its
    blocks; while tracing (``torch.compile`` of a whole model, ``torch.export``) it keeps the mask as it is, which is
    exact for any layout."""
    if mask is None or mask.ndim != 2 or torch.compiler.is_compiling():
        return mask  # a (B, T, S) mask (a static cache's) is already exact per query
    if bool(mask.all()) or (causal_alone and right_padded(mask)):
        return None
    return mask


class Attention(nn.Module):
    """Multi-head, multi-query or grouped-query attention over the input itself or over a memory.

    Self-attention projects q, k and v with one fused linear layer; cross-attention projects q from the input and
    k, v (fused) from the memory, once per memory when a :class:`KVCache` is given.
    """

    def __init__(self, cfg: StackConfig, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv_bias, out_bias = cfg.attention_bias
        if cross:
            self.q = nn.Linear(cfg.width, q_dim, bias=qkv_bias)
            self.kv = nn.Linear(cfg.width, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(cfg.width, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(q_dim, cfg.width, bias=out_bias)
        # CoCa's ln_1_kv: the memory is normed before its keys and values (once per memory, like them)
        self.memory_norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cross and cfg.cross_memory_norm else None
        self.q_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_dropout = cfg.attn_dropout
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(hs)
        relative = "none" if cross else cfg.position
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if relative == "rope" else None
        self.alibi = relative == "alibi"  # slopes derived from n_heads where they are used

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def _memory_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """Projected memory k|v (B, S, 2 nkv*hs), after the memory norm where the config has one."""
        return self.kv(memory if self.memory_norm is None else self.memory_norm(memory))

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        memory: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        documents: Documents | None = None,
        memory_documents: Documents | None = None,
        positions: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        """Attend from x (B, T, D).

        Args:
            mask: key padding (B, S), True = real; for cross-attention it masks the memory. With a cache, S counts
                the cached keys too. Applied as given (with the causal triangle when causal): the caller drops a
                mask that is not needed (:func:`key_mask`); without one, causal attention with T == S is
                ``is_causal``.
            causal: queries see only earlier keys (self-attention only).
            memory: (B, S, D) keys/values source for cross-attention; may be None after the cache holds them.
                (B/G, S, D) is read by G consecutive rows each (beams of one sample), as are its cached keys/values.
            cache: incremental decoding state; self-attention appends to it, cross-attention fills it once.
            layer: this block's index in the cache.
            documents: x is a packed batch (R, T, D) of these documents (see :mod:`mmformer.layers.documents`):
                each token attends only within its own document, whose positions start at 0.
            memory_documents: cross-attention over a packed memory (1, S, D) of these documents, query document i
                reading memory document i; without it, memory (n, S, D) has one row per query document.
            positions: per-row position ids (B, T) of the queries for RoPE (left-padded prompts; default:
                consecutive from the cache).
            bias: an additive score bias (nh, T, S) of self-attention (a stack's T5 relative bias); over packed
                documents, (nh, L, L) of the longest one (each document's rows read its top-left corner).
            scores: cross-attention only: records this layer's scores of the collector's heads.
        """
        if documents is not None:
            return self._forward_documents(x, mask, causal, memory, documents, memory_documents, bias)
        # the cache's length only where positions are not given (a static cache always gives them: its step reads
        # no host value)
        offset = cache.length if cache is not None and not self.cross and positions is None else 0
        cached = cache is not None and self.cross and cache.has_cross(layer)  # memory keys projected on the 1st call
        kv_in = self._memory_kv(memory) if self.cross and memory is not None and not cached else None
        q_in = self.q(x) if self.cross else self.qkv(x)
        out = self._attend(q_in, kv_in, mask, causal, cache, layer, offset, positions, bias, scores)
        return self.proj(out)

    def _attend(
        self,
        q_in: torch.Tensor,
        kv_in: torch.Tensor | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None,
        layer: int,
        offset: int,
        positions: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        """The attention between the projections and ``proj``: projected queries (B, T, nh*hs) — or q|k|v (B, T,
        (nh + 2 nkv)*hs) for self-attention — and projected memory k|v ``kv_in`` (B, S, 2 nkv*hs) → (B, T, nh*hs)."""
        B, T, _ = q_in.shape
        if self.cross:
            q = self._heads(q_in, self.n_heads)
            if cache is not None and cache.has_cross(layer):
                k, v = cache.cross(layer)
            else:
                if kv_in is None:
                    raise ValueError("cross-attention needs `memory` (B, S, D) on the first call")
                k, v = self._memory_heads(kv_in)
                if cache is not None:  # once per memory
                    cache.set_cross(layer, k, v)
                    k, v = cache.cross(layer)
            causal = False
        else:
            # the fused projection's q|k|v rows are nh|nkv|nkv heads of hs: one view and one transpose split all three
            # into heads (the same strided views as splitting first, in fewer ops: it counts when decoding by token)
            heads = self._heads(q_in, self.n_heads + 2 * self.n_kv_heads)  # (B, nh + 2 nkv, T, hs)
            q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.rope is not None:
                k = self.rope(k, offset, positions=positions)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rope is not None:
            q = self.rope(q, offset, positions=positions)
        if scores is not None and self.cross:
            scores.record(layer, q, k, self.scale)
        if cache is not None and not self.cross:
            k, v = cache.append(layer, k, v)

        attn_mask, is_causal = self._mask(mask, causal, T, k.shape[2], q.device)
        if self.alibi:
            bias = alibi_bias(alibi_slopes(self.n_heads, q.device), T, k.shape[2], causal)  # (nh, T, S)
        if bias is not None and not self.cross:
            bias = bias[:, :T, : k.shape[2]]  # a packed document's rows: the top-left corner of the longest's bias
            allowed = attn_mask if attn_mask is not None else torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
            if is_causal:
                allowed = allowed & torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril()
            attn_mask, is_causal = bias.to(q.dtype).masked_fill(~allowed, float("-inf")), False
        # > 1: each memory row serves `groups` consecutive query rows (beams)
        groups = B // k.shape[0] if self.cross and 0 < k.shape[0] < B else 1
        if groups > 1:  # (B, nh, T, hs) → (B/G, nh, G*T, hs): the beams' queries read their sample's keys once
            q = q.view(-1, groups, self.n_heads, T, self.head_dim).transpose(1, 2).flatten(2, 3)
        out = sdpa(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, nh, T, hs), or (B/G, nh, G*T, hs)
        if groups > 1:
            out = out.unflatten(2, (groups, T)).permute(0, 2, 3, 1, 4)  # (B/G, G, T, nh, hs)
        else:
            out = out.transpose(1, 2)  # (B, T, nh, hs)
        return out.reshape(B, T, self.n_heads * self.head_dim)

    def _memory_heads(self, kv_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected memory k|v (B, S, 2 nkv*hs) → keys and values (B, nkv, S, hs)."""
        k, v = kv_in.chunk(2, dim=-1)
        k = self._heads(k, self.n_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, self._heads(v, self.n_kv_heads)

    def _forward_documents(
        self,
        x: torch.Tensor,
        memory_mask: torch.Tensor | None,
        causal: bool,
        memory: torch.Tensor | None,
        documents: Documents,
        memory_documents: Documents | None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed documents x (R, T, D): the projections run on the packed tokens (no padding); attention runs per
        document, nested-jagged or regrouped into padded per-document rows (see :mod:`mmformer.layers.documents`)."""
        R, T, _ = x.shape
        if self.cross and memory is None:
            raise ValueError("cross-attention over documents needs `memory` (no KV cache with packed documents)")
        q_in = self.q(x) if self.cross else self.qkv(x)  # (R, T, ·)
        kv_in = self._memory_kv(memory) if self.cross else None
        biased = self.alibi or (bias is not None and not self.cross)
        if documents.use_jagged(bias=biased) and (not self.cross or memory_documents is not None):
            out = self._jagged(q_in.view(1, R * T, -1), kv_in, documents, memory_documents, causal)
            return self.proj(out.view(R, T, -1))
        # dense: per-document rows (n, L) right-padded, through the usual path (rope restarts at 0 in each row)
        if not self.cross and documents.buckets is not None:  # long documents of unequal lengths: by length bucket
            outs = [
                self._attend(
                    documents.pad_bucket(q_in, b), None, None if causal else b.mask, causal, None, 0, 0, bias=bias
                )  # (n_b, L_b, ·)
                for b in documents.buckets
            ]
            return self.proj(documents.unpad_buckets(outs, R))
        q_in = documents.pad(q_in)  # (n, L, ·)
        if self.cross and memory_documents is not None:
            kv_in, memory_mask = memory_documents.pad(kv_in), memory_documents.key_mask()
        mask = memory_mask if self.cross else documents.key_mask(causal=causal)
        out = self._attend(q_in, kv_in, mask, causal, None, 0, 0, bias=bias)  # (n, L, nh*hs)
        return self.proj(documents.unpad(out, R))

    def _jagged(
        self,
        q_in: torch.Tensor,
        kv_in: torch.Tensor | None,
        documents: Documents,
        memory_documents: Documents | None,
        causal: bool,
    ) -> torch.Tensor:
        """Nested-jagged SDPA over packed projections (1, N, ·) → (N, nh*hs)."""
        positions = documents.positions
        if self.cross:
            q = self._heads(q_in, self.n_heads)
            k, v = self._memory_heads(kv_in.reshape(1, memory_documents.tokens, -1))
            kv_docs, causal = memory_documents, False
        else:
            heads = self._heads(q_in, self.n_heads + 2 * self.n_kv_heads)  # (1, nh + 2 nkv, N, hs)
            q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.rope is not None:
                k = self.rope(k, positions=positions)
            kv_docs = documents
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rope is not None:
            q = self.rope(q, positions=positions)
        flat = lambda t: t[0].transpose(0, 1)  # noqa: E731  (1, h, N, hs) → (N, h, hs)
        dropout = self.attn_dropout if self.training else 0.0
        out = document_attention(
            flat(q), flat(k), flat(v), documents, kv_docs, causal=causal, dropout_p=dropout, scale=self.scale
        )
        return out.reshape(documents.tokens, self.n_heads * self.head_dim)

    @staticmethod
    def _mask(
        mask: torch.Tensor | None, causal: bool, T: int, S: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """Turn a key-padding mask and causality into SDPA's (attn_mask, is_causal), with no (T, S) mask when there
        is no key mask (:func:`key_mask` has dropped the masks that ``is_causal`` alone makes exact). Nothing here
        reads the data: the same code traces into one graph for every padding layout. A (B, T, S) mask (a static
        cache's) already says which keys each query may read, causality included."""
        if mask is not None and mask.ndim == 3:
            return mask[:, None], False  # (B, 1, T, S)
        # T == S first: a traced graph (torch.export) with a symbolic T == S then needs no guard on T == 1
        if causal and T == S and mask is None:
            return None, True
        if causal and T == 1:
            causal = False  # one new query after the cache sees every cached key
        allowed = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            tril = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # queries are the last T
            allowed = tril if allowed is None else allowed & tril
        return allowed, False
