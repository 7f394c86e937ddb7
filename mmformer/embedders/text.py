"""Token ids → token embeddings with positions (and BERT's segment embeddings and embedding norm).

Shape legend: B batch, T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from mmformer.config import StackConfig, TextConfig
from mmformer.embedders.checks import check_device, check_token_ids
from mmformer.io.weights import base_layer
from mmformer.layers.positions import AbsolutePositions


class TokenEmbedding(nn.Embedding):
    """The token table, initialised N(0, 0.02) as GPT-2 and CLIP do (``nn.Embedding`` draws N(0, 1))."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class TextEmbedder(nn.Module):
    """(B, T) ids → (B, T, D) tokens; shared by the text encoder and the decoder (whose LM head may tie to it)."""

    def __init__(self, cfg: TextConfig, stack: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = TokenEmbedding(cfg.vocab_size, stack.width)
        self.positions = (
            None
            if cfg.position == "none"
            else AbsolutePositions(cfg.position, cfg.max_length, stack.width, what="text")
        )
        self.segments = nn.Embedding(cfg.n_segments, stack.width) if cfg.n_segments else None
        self.norm = nn.LayerNorm(stack.width, eps=cfg.embed_norm_eps) if cfg.embed_norm else None
        self.drop = nn.Dropout(stack.dropout)
        # CoCa's embed_cls: a learned token appended after the text by the text encoder (not by the decoder)
        self.cls_token = nn.Parameter(torch.empty(stack.width)) if cfg.pool == "append_cls" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial value of the appended class token (the submodules initialise their own)."""
        if self.cls_token is not None:
            with torch.no_grad():
                self.cls_token.normal_(0.0, 0.01)  # as open_clip

    def check(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, longest: int | None = None
    ) -> None:
        """Validate ids (B, T) and their mask; ``longest`` is the longest sequence when it is not T (a packed
        batch's longest document)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a LongTensor (B, T), got {type(input_ids).__name__}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
        check_device("input_ids", input_ids, base_layer(self.tokens).weight)
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected at least one token per row, got shape {tuple(input_ids.shape)}")
        longest = input_ids.shape[1] if longest is None else longest
        if self.positions is not None and longest > self.cfg.max_tokens:
            raise ValueError(
                f"input_ids: expected at most {self.cfg.max_tokens} tokens (TextConfig.max_length, the position "
                f"table{', less the appended class token' if self.cls_token is not None else ''}), got "
                f"{longest}; truncate the text or build the model with a longer max_length"
            )
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask: expected a bool tensor (B, T), True = real token; got {type(attention_mask).__name__}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None:
            check_device("attention_mask", attention_mask, base_layer(self.tokens).weight)
        check_token_ids("input_ids", input_ids, self.cfg.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        *,
        offset: int = 0,
        segment_ids: torch.Tensor | None = None,
        append_cls: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids → (B, T, D), or (B, T + 1, D) with ``append_cls`` (the text encoder of an append_cls model), at
        positions offset … offset+T-1, or at per-row ``positions`` (B, T) (packed documents, left-padded prompts).

        ``inputs_embeds`` (B, T, D) takes the place of the token table's rows (soft prompts, as Hugging Face's
        ``inputs_embeds``); they still get positions, segments and the norm."""
        if segment_ids is not None:
            self.check_segments(input_ids, segment_ids)
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if append_cls and self.cls_token is not None:
            x = torch.cat([x, self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)  # (B, T + 1, D)
            if segment_ids is not None:
                segment_ids = torch.cat([segment_ids, segment_ids[:, -1:]], dim=1)
        if self.positions is not None:
            x = self.positions(x, offset, positions=positions)
        if self.segments is not None:
            x = x + self.segments(
                segment_ids if segment_ids is not None else x.new_zeros(x.shape[:2], dtype=torch.long)
            )
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x) if self.training and self.drop.p > 0 else x  # skip the identity call when decoding

    def check_segments(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> None:
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != input_ids.shape:
            got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
            raise ValueError(f"segment_ids: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise TypeError(f"segment_ids: expected integer segment ids, got {segment_ids.dtype}")
        check_device("segment_ids", segment_ids, base_layer(self.tokens).weight)
        n = self.cfg.n_segments
        check_token_ids("segment_ids", segment_ids, max(n, 1), what="ids", note=f" (TextConfig.n_segments={n})")
