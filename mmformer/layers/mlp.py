"""Feed-forward sublayers: GELU / QuickGELU / ReLU MLPs, gated ones (SwiGLU, GEGLU), and a top-k mixture of experts.

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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# plain functions, not modules: an activation has no state, and a module call costs as much as a small kernel when
# decoding token by token. Gated kinds name the activation of their gate branch.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quickgelu": quick_gelu,
    "relu": F.relu,
    "swiglu": F.silu,  # Llama, Mistral, Qwen
    "geglu": F.gelu,
    "geglu_tanh": _gelu_tanh,  # T5 v1.1's gated-gelu (gelu_new), Gemma
}
GATED = ("swiglu", "geglu", "geglu_tanh")


class Mlp(nn.Module):
    """Linear → activation → dropout → linear; gated kinds (SwiGLU, GEGLU) multiply the activated gate branch with a
    second projection: ``fc1`` holds both, gate rows first."""

    def __init__(self, dim: int, hidden: int, kind: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.gated = kind in GATED
        self.fc1 = nn.Linear(dim, 2 * hidden if self.gated else hidden, bias=bias)
        self.act = ACTIVATIONS[kind]
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, h = h.chunk(2, dim=-1)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        if self.training and self.drop.p > 0:  # the identity otherwise: skip the call
            h = self.drop(h)
        return self.fc2(h)


class MixtureOfExperts(nn.Module):
    """Top-k routed experts (Switch / Mixtral style) with the Switch load-balancing loss.

    While training, each forward records its load-balancing loss ``E * sum_e f_e * P_e`` (fraction of tokens routed
    to expert e times the mean router probability of e; 1 for a perfectly balanced router) in a list that
    :meth:`pop_aux_losses` hands over and clears — the training task collects them through
    :meth:`~mmformer.MultimodalTransformer.pop_aux_loss` and adds their mean to the loss with a weight. In eval mode
    nothing is recorded.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, hidden, kind, bias, dropout) for _ in range(n_experts))
        self._aux_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, K)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # no branch on the token count: an expert no token chose runs on 0 rows and adds nothing, and a count
            # tested in Python is a data-dependent guard torch.export cannot trace
            token, slot = (chosen == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if self.training:
            n_experts = probs.shape[-1]
            routed = F.one_hot(chosen, n_experts).sum(dim=1).float().mean(dim=0) / self.top_k  # f_e, (E,)
            self._aux_losses.append(n_experts * (routed * probs.mean(dim=0)).sum())
        return out.reshape(shape)

    def pop_aux_losses(self) -> list[torch.Tensor]:
        """The load-balancing losses recorded since the last call (one per training forward), cleared."""
        losses, self._aux_losses = self._aux_losses, []
        return losses


def pop_aux_loss(module: nn.Module) -> torch.Tensor | None:
    """The mean load-balancing loss over every call of every :class:`MixtureOfExperts` inside ``module`` recorded
    since the last pop (None without any), and forget them."""
    losses = [loss for m in module.modules() if isinstance(m, MixtureOfExperts) for loss in m.pop_aux_losses()]
    return torch.stack([x.float() for x in losses]).mean() if losses else None


def make_mlp(cfg: StackConfig) -> nn.Module:
    if cfg.n_experts:
        return MixtureOfExperts(
            cfg.width, cfg.hidden_dim, cfg.n_experts, cfg.experts_top_k, cfg.mlp, cfg.bias, cfg.dropout
        )
    return Mlp(cfg.width, cfg.hidden_dim, cfg.mlp, cfg.bias, cfg.dropout)
