"""Feed-forward sublayers: GELU / QuickGELU MLPs, SwiGLU, and a top-k mixture of experts.

Shape legend: B batch, T tokens, D width, H hidden width, E experts, K experts per token, N = B*T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.config import StackConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the activation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """:func:`quick_gelu` as a module, for code that composes activations as modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# plain functions, not modules: an activation has no state, and a module call costs as much as a small kernel when
# decoding token by token
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "quickgelu": quick_gelu, "swiglu": F.silu}


class Mlp(nn.Module):
    """Linear → activation → dropout → linear; SwiGLU gates the hidden layer with a second projection."""

    def __init__(self, dim: int, hidden: int, kind: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.swiglu = kind == "swiglu"
        self.fc1 = nn.Linear(dim, 2 * hidden if self.swiglu else hidden, bias=bias)
        self.act = ACTIVATIONS[kind]
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, h = h.chunk(2, dim=-1)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        if self.training and self.drop.p > 0:  # the identity otherwise: skip the call
            h = self.drop(h)
        return self.fc2(h)


class MixtureOfExperts(nn.Module):
    """Top-k routed experts (Switch / Mixtral style) with the Switch load-balancing loss.

    After each forward, ``aux_loss`` holds ``E * sum_e f_e * P_e`` (fraction of tokens routed to expert e times
    the mean router probability of e); it is 1 for a perfectly balanced router. The training task adds it to the
    loss with a weight; the model never reads it.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, hidden, kind, bias, dropout) for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, K)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        n_experts = probs.shape[-1]
        routed = F.one_hot(chosen, n_experts).sum(dim=1).float().mean(dim=0) / self.top_k  # f_e, (E,)
        self.aux_loss = n_experts * (routed * probs.mean(dim=0)).sum()
        return out.reshape(shape)


def make_mlp(cfg: StackConfig) -> nn.Module:
    if cfg.n_experts:
        return MixtureOfExperts(
            cfg.width, cfg.hidden_dim, cfg.n_experts, cfg.experts_top_k, cfg.mlp, cfg.bias, cfg.dropout
        )
    return Mlp(cfg.width, cfg.hidden_dim, cfg.mlp, cfg.bias, cfg.dropout)
