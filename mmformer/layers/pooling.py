"""Attention pooling: learned queries that read a sequence of tokens through cross-attention.

One module serves two published layouts, chosen by its arguments (configured by :class:`~mmformer.config.ImageConfig`):

- the *MAP head* of SigLIP and timm (``global_pool='map'``, ``AttentionPoolLatent``): one query of the tokens'
  width, then a residual MLP ``x + mlp(norm(x))``; its output is the pooled embedding;
- CoCa's *attentional pooler* (open_clip ``AttentionalPooler`` followed by ``ln_post``): n queries of another width
  (normed), keys and values from the normed tokens, a final norm; its outputs replace the image tokens.

Shape legend: B batch, N input tokens, Q queries, Din input width, D pool width, nh heads, hs head size.
"""

from __future__ import annotations

import torch
from torch import nn

from mmformer.layers.mlp import Mlp
from mmformer.layers.norms import make_norm
from mmformer.layers.sdpa import sdpa


class AttentionPool(nn.Module):
    """``queries`` (Q, D) attend to tokens (B, N, Din) → (B, Q, D).

    Args:
        in_width: width of the tokens read (Din).
        width: width of the queries and the output (D).
        n_heads: attention heads (D must be divisible by them).
        n_queries: learned queries (Q).
        norm, eps: the norm kind and epsilon of every norm here.
        bias: biases in the query, key/value and output projections.
        mlp_hidden: > 0 adds the residual MLP ``x + mlp(norm(x))`` of this hidden width (the MAP head).
        mlp: the MLP's activation kind.
        query_norm: norm the queries before projecting them (CoCa's ``ln_q``).
        input_norm: norm the tokens before the keys and values (CoCa's ``ln_k``).
        out_norm: norm the outputs (CoCa's ``ln_post``, which follows the pooler).
    """

    def __init__(
        self,
        *,
        in_width: int,
        width: int,
        n_heads: int,
        n_queries: int = 1,
        norm: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
        mlp_hidden: int = 0,
        mlp: str = "gelu",
        query_norm: bool = False,
        input_norm: bool = False,
        out_norm: bool = False,
    ):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"AttentionPool: n_heads ({n_heads}) must divide width ({width})")
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.queries = nn.Parameter(torch.empty(n_queries, width))
        self.query_norm = make_norm(norm, width, eps) if query_norm else None
        self.input_norm = make_norm(norm, in_width, eps) if input_norm else None
        self.q = nn.Linear(width, width, bias=bias)
        self.kv = nn.Linear(in_width, 2 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.mlp_norm = make_norm(norm, width, eps) if mlp_hidden else None
        self.mlp = Mlp(width, mlp_hidden, mlp, bias=bias) if mlp_hidden else None
        self.out_norm = make_norm(norm, width, eps) if out_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Queries start N(0, 1/D), as timm's latent query."""
        with torch.no_grad():
            self.queries.normal_(0.0, self.queries.shape[-1] ** -0.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, Din) → pooled queries (B, Q, D)."""
        B = x.shape[0]
        if self.input_norm is not None:
            x = self.input_norm(x)
        queries = self.queries if self.query_norm is None else self.query_norm(self.queries)
        q = self._heads(self.q(queries).to(x.dtype).expand(B, -1, -1))  # (B, nh, Q, hs)
        k, v = (self._heads(t) for t in self.kv(x).chunk(2, dim=-1))  # (B, nh, N, hs) each
        out = sdpa(q, k, v)  # (B, nh, Q, hs)
        out = self.proj(out.transpose(1, 2).reshape(B, -1, self.n_heads * self.head_dim))  # (B, Q, D)
        if self.mlp is not None:
            out = out + self.mlp(self.mlp_norm(out))
        return out if self.out_norm is None else self.out_norm(out)
