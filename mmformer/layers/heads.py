"""Output heads over token states that need more than one linear layer.

Shape legend: B batch, T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from mmformer.config import StackConfig
from mmformer.layers.mlp import ACTIVATIONS
from mmformer.layers.norms import make_norm


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense → activation → norm → a vocabulary projection tied to the token embedding, plus
    a per-token output bias (``BertForMaskedLM``'s ``cls.predictions``).

    The activation is the text stack's MLP activation (the gate's, for gated kinds); the norm is its norm kind and
    epsilon. ``decoder.weight`` is tied by the model (:meth:`~mmformer.MultimodalTransformer.tie_weights`).
    """

    def __init__(self, stack: StackConfig, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(stack.width, stack.width)
        self.act = ACTIVATIONS[stack.mlp]
        self.norm = make_norm(stack.norm, stack.width, stack.norm_eps)
        self.decoder = nn.Linear(stack.width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token states (B, T, D) → vocabulary logits (B, T, V)."""
        return self.decoder(self.norm(self.act(self.dense(x)))) + self.bias
