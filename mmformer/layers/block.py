"""Transformer block and stack: every architecture knob comes from :class:`~mmformer.config.StackConfig`.

Shape legend: B batch, T tokens, S memory tokens, D width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmformer.config import StackConfig
from mmformer.layers.attention import Attention, CrossAttentionScores, key_mask
from mmformer.layers.cache import KVCache, StaticKVCache
from mmformer.layers.documents import Documents
from mmformer.layers.freezing import graph_limit
from mmformer.layers.mlp import make_mlp
from mmformer.layers.norms import make_norm
from mmformer.layers.positions import RelativePositionBias

BLOCK_GRAPHS = 32  # dynamo's limit of graphs for a compiled block's forward (Block.compile), shared by every block


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training, rescaling the survivors."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT; timm's ``ls1``/``ls2``, DINOv2), starting at ``init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Sublayer(nn.Module):
    """One residual branch (attention, cross-attention or MLP) with the configured norm placement.

    pre:      x + f(norm(x))                 post: norm(x + f(x))
    sandwich: x + norm_out(f(norm(x)))
    With ``layer_scale`` the branch f(...) is scaled per channel before the residual add.
    """

    def __init__(self, cfg: StackConfig, fn: nn.Module, drop_path: float):
        super().__init__()
        self.placement = cfg.norm_placement
        self.fn = fn
        self.norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.norm_out = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cfg.norm_placement == "sandwich" else None
        self.scale = LayerScale(cfg.width, cfg.layer_scale) if cfg.layer_scale is not None else None
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.placement == "post":
            h = self._scaled(self.fn(x, **kwargs))
            return self.norm(x + (self.regularize(h) if self.training else h))
        h = self.fn(self.norm(x), **kwargs)
        if self.norm_out is not None:
            h = self.norm_out(h)
        h = self._scaled(h)
        return x + (self.regularize(h) if self.training else h)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.scale is None else self.scale(h)

    def regularize(self, h: torch.Tensor) -> torch.Tensor:
        """Dropout then drop-path while training; both are the identity in eval mode (forward skips the call then:
        module calls cost as much as small kernels in token-by-token decoding) or at p = 0."""
        if self.drop.p > 0 or self.drop_path.p > 0:
            return self.drop_path(self.drop(h))
        return h


class MultiwayMlp(nn.Module):
    """One MLP per listed modality behind shared attention (VLMo / BEiT-3); other modalities share ``shared``."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.shared = make_mlp(cfg)
        self.experts = nn.ModuleDict({m: make_mlp(cfg) for m in cfg.multiway})

    def forward(self, x: torch.Tensor, modality: str = "text") -> torch.Tensor:
        return self.experts[modality](x) if modality in self.experts else self.shared(x)


class Block(nn.Module):
    """Self-attention, an optional cross-attention sublayer (used only when memory is given), then the MLP —
    sequential, or attention and MLP in parallel from one norm. With ``cross_mlp`` (CoCa): self-attention, MLP,
    cross-attention, a second MLP."""

    def __init__(self, cfg: StackConfig, drop_path: float = 0.0):
        super().__init__()
        self.parallel = cfg.parallel
        self.multiway = bool(cfg.multiway)
        self.attn = Sublayer(cfg, Attention(cfg), drop_path)
        self.cross_attn = Sublayer(cfg, Attention(cfg, cross=True), drop_path) if cfg.cross_attention else None
        mlp = MultiwayMlp(cfg) if cfg.multiway else make_mlp(cfg)
        if cfg.parallel:
            self.mlp = mlp
            self.drop = nn.Dropout(cfg.dropout)
        else:
            self.mlp = Sublayer(cfg, mlp, drop_path)
        self.cross_mlp = Sublayer(cfg, make_mlp(cfg), drop_path) if cfg.cross_mlp else None

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` this block in place (its parameters and their keys stay), for the calls without a KV
        cache: training steps and encoding. Sizes are traced as symbols from the first call (``dynamic=True``; a
        size of 1 still gets a graph of its own), so each kind of call (image rows, packed documents, causal text
        over a memory, ..., in training and in eval mode) compiles once, and the blocks of every stack share the
        graphs; nothing of a call that varies per batch is a Python value the graph guards on (the layer index is
        passed only with a cache; :class:`~mmformer.layers.documents.Documents` decides its layout before the blocks).
        Those kinds take more graphs than dynamo keeps per function by default (8, shared by every block), so the
        calls run with a limit of :data:`BLOCK_GRAPHS`. Calls with a cache (decoding token by token) run eagerly: the
        cache's Python state (its length, the layer's slot) would make a graph per step and layer; decoding
        compiles its whole step instead (``generate(compile=True)``)."""
        from torch.fx.experimental import _config as shapes

        kwargs.setdefault("dynamic", True)
        compiled = torch.compile(self._call_impl, *args, **kwargs)
        eager = self._call_impl

        def call(x: torch.Tensor, **k: Any) -> torch.Tensor:
            if k.get("cache") is not None:
                return eager(x, **k)
            # no "duck sizing": sizes equal at a first call (a memory's and the queries' token counts) stay two
            # symbols, not one that the next batch's unequal sizes would fail; x and memory contiguous: the graphs
            # guard on strides, and audio tokens come transposed from the convolutions ((B, N, D), stride 1 along N)
            if k.get("memory") is not None:
                k["memory"] = k["memory"].contiguous()
            with graph_limit(BLOCK_GRAPHS), shapes.patch(use_duck_shape=False):
                return compiled(x.contiguous(), **k)

        self._compiled_call_impl = call

    def forward(
        self,
        x: torch.Tensor,
        *,
        modality: str = "text",
        mask: torch.Tensor | None = None,
        causal: bool = False,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        documents: Documents | None = None,
        memory_documents: Documents | None = None,
        positions: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cross_scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        mlp_kwargs = {"modality": modality} if self.multiway else {}
        attn_kwargs = dict(mask=mask, causal=causal)
        if cache is not None or cross_scores is not None:  # the layer index only where it is read: a compiled
            attn_kwargs.update(cache=cache, layer=layer)  # block would hold a graph per value of it
        # the rest only passed when set: a keyword per call costs in token-by-token decoding
        if positions is not None:
            attn_kwargs["positions"] = positions
        if bias is not None:
            attn_kwargs["bias"] = bias
        cross_kwargs = {}
        if documents is not None:  # packed batches only: decoding steps pass none
            attn_kwargs["documents"] = documents
            cross_kwargs = {"documents": documents, "memory_documents": memory_documents}
        if cross_scores is not None:
            cross_kwargs["scores"] = cross_scores
        if self.parallel:
            attn = self.attn
            h = attn.norm(x)
            out = attn.fn(h, **attn_kwargs) + self.mlp(h, **mlp_kwargs)
            return x + attn.drop_path(self.drop(out))
        x = self.attn(x, **attn_kwargs)
        if self.cross_mlp is not None:  # CoCa's layer order
            x = self.mlp(x, **mlp_kwargs)
        if self.cross_attn is not None and (memory is not None or (cache is not None and cache.has_cross(layer))):
            if cache is not None or cross_scores is not None:
                cross_kwargs.update(cache=cache, layer=layer)
            x = self.cross_attn(x, mask=memory_mask, memory=memory, **cross_kwargs)
            if self.cross_mlp is not None:
                x = self.cross_mlp(x)
        return x if self.cross_mlp is not None else self.mlp(x, **mlp_kwargs)


class Stack(nn.Module):
    """Blocks with linearly increasing drop-path and an optional final norm; with ``position="t5"``, the one learned
    relative position bias every block's self-attention adds (T5 shares it across layers)."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.relative_bias = (
            RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance)
            if cfg.position == "t5"
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        modality: str = "text",
        mask: torch.Tensor | None = None,
        causal: bool = False,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        first_layer: int = 0,
        final_norm: bool = True,
        padded_queries: bool = False,
        documents: Documents | None = None,
        memory_documents: Documents | None = None,
        positions: torch.Tensor | None = None,
        cross_scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        """Run x (B, T, D) through every block; with a cache, x holds only the new tokens (and ``mask`` covers the
        cached ones too).

        ``first_layer`` is this stack's first block in a cache shared with stacks that run before it (CoCa's decoder
        continues its text stack); the stack holding the cache's last layer moves the cache on. ``final_norm=False``
        returns the states before the final norm. ``padded_queries``: queries at masked positions matter (CoCa's class
        token after the padding, under its checkpoints' shifted mask), so a right-padded mask is never replaced by
        ``is_causal``. The masks' layout is decided here, once (:func:`~mmformer.layers.attention.key_mask`), so
        that the blocks, compiled or not, never read the data to decide it. With ``documents``, x is a packed batch
        (R, T, D) of them and ``mask`` is unused (see :mod:`mmformer.layers.documents`). ``positions`` (B, T):
        per-row position ids for RoPE (left-padded prompts). ``cross_scores`` collects chosen heads' cross-attention
        scores.
        """
        if documents is not None and cache is not None:
            raise ValueError("documents: packed batches are for training and encoding; decode with a KV cache unpacked")
        # the padding layout, decided here once for every block (it reads the data; compiled blocks must not)
        if mask is not None and mask.ndim == 2:  # a static cache's (B, T, S) mask is exact as it is
            past = cache.length if cache is not None else 0
            mask = key_mask(mask, causal_alone=causal and past == 0 and not padded_queries)
        memory_mask = key_mask(memory_mask)
        if not torch.compiler.is_compiling():
            for docs in (documents, memory_documents):
                if docs is not None:
                    docs.prepare()
        kwargs = dict(modality=modality, mask=mask, causal=causal, memory=memory, memory_mask=memory_mask, cache=cache)
        if documents is not None:
            kwargs.update(documents=documents, memory_documents=memory_documents)
        if positions is not None:
            kwargs["positions"] = positions
        if cross_scores is not None:
            kwargs["cross_scores"] = cross_scores
        if self.relative_bias is not None:  # computed once, read by every block
            if documents is not None:  # every document's rows start at position 0: the longest one's bias serves all
                kwargs["bias"] = self.relative_bias(documents.max_length, documents.max_length, causal)  # (nh, L, L)
            else:
                past = cache.length if cache is not None else 0
                kwargs["bias"] = self.relative_bias(x.shape[1], past + x.shape[1], causal)  # (nh, T, S)
        for i, block in enumerate(self.blocks):
            if self.cfg.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, layer=first_layer + i, use_reentrant=False, **kwargs)
            else:
                x = block(x, layer=first_layer + i, **kwargs)
        if cache is not None and first_layer + len(self.blocks) == cache.n_layers:
            cache.advance(x.shape[1])
        return self.norm(x) if final_norm else x

    def make_cache(
        self,
        batch_size: int,
        capacity: int,
        *,
        device=None,
        dtype=torch.float32,
        extra_layers: int = 0,
        static: bool = False,
        cross_dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of ``capacity`` positions (it grows on demand); ``extra_layers``
        more for a stack of the same head layout that runs before this one on the same tokens. ``static``: a
        :class:`~mmformer.layers.cache.StaticKVCache` of exactly ``capacity`` positions (fixed-shape steps for
        ``torch.compile`` / CUDA graphs). ``cross_dtype``: the growing cache's cross-attention keys/values' dtype."""
        c = self.cfg
        layers = c.depth + extra_layers
        if not static:
            return KVCache(layers, batch_size, c.n_kv_heads, c.head_dim, capacity, device=device, dtype=dtype,
                           cross_dtype=cross_dtype)  # fmt: skip
        if cross_dtype is not None:
            raise ValueError(
                "cross_dtype: only the growing cache keeps its cross-attention keys/values in another dtype"
            )
        if c.position in ("alibi", "t5"):
            raise ValueError(
                f"cache='static': a decoder with {c.position!r} positions (a bias for queries that are the last keys) "
                "decodes with the growing cache; use cache='dynamic'"
            )
        return StaticKVCache(layers, batch_size, c.n_kv_heads, c.head_dim, capacity, device=device, dtype=dtype)
