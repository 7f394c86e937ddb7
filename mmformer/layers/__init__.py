"""Transformer building blocks: attention, positions, norms, MLPs, blocks and stacks."""

from mmformer.layers.attention import Attention, reference_attention
from mmformer.layers.block import Block, DropPath, Stack
from mmformer.layers.cache import KVCache
from mmformer.layers.documents import Documents, document_attention
from mmformer.layers.mlp import MixtureOfExperts, Mlp, make_mlp, pop_aux_loss
from mmformer.layers.norms import make_norm
from mmformer.layers.positions import (
    AbsolutePositions,
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    resample_patch_positions,
    sinusoids,
)

__all__ = [
    "AbsolutePositions",
    "Attention",
    "Block",
    "Documents",
    "DropPath",
    "KVCache",
    "MixtureOfExperts",
    "Mlp",
    "RotaryEmbedding",
    "Stack",
    "alibi_bias",
    "alibi_slopes",
    "document_attention",
    "make_mlp",
    "make_norm",
    "pop_aux_loss",
    "reference_attention",
    "resample_patch_positions",
    "sinusoids",
]
