"""MultimodalTransformer: modality embedders → routed stacks → pooling and projection heads, plus a causal text
decoder that cross-attends to image, audio or text tokens — or, without a memory, is a decoder-only language model —
and an optional masked-LM head on the text encoder (BERT).

Shape legend: B batch, Np image patch tokens, N audio frame tokens, T text tokens, S memory tokens, D width,
E joint embedding size, V vocabulary.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.config import MODALITIES, ModelConfig
from mmformer.embedders import AudioEmbedder, ImageEmbedder, TextEmbedder
from mmformer.embedders.checks import check_memory, check_packed_memory, check_positions, check_prefix
from mmformer.generation import completion
from mmformer.generation import decoding as generation
from mmformer.io import pretrained, quantized_files, weights
from mmformer.layers.attention import CrossAttentionScores, right_padded
from mmformer.layers.block import Stack
from mmformer.layers.cache import KVCache
from mmformer.layers.documents import Documents
from mmformer.layers.heads import MaskedLMHead
from mmformer.layers.mlp import pop_aux_loss
from mmformer.layers.norms import make_norm
from mmformer.layers.pooling import AttentionPool
from mmformer.layers.positions import positions_from_mask

if TYPE_CHECKING:
    from typing import Self  # Python 3.11's; annotations are not evaluated (3.10 runs this module)


def pack(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[Documents, torch.Tensor]:
    """Right-padded rows x (B, T, ...) with mask (B, T) → their :class:`~mmformer.layers.Documents` (one per row)
    and the real tokens back to back in one row (1, N, ...)."""
    if mask is None:
        return Documents.from_lengths([x.shape[1]] * x.shape[0], device=x.device), x.reshape(1, -1, *x.shape[2:])
    mask = mask.bool()
    if not right_padded(mask):
        raise ValueError("mask: packing needs right-padded rows (real tokens first), got a row with a gap")
    return Documents(mask.sum(dim=1)), x[mask].unsqueeze(0)


class MultimodalTransformer(nn.Module):
    """Images, audio and text through one shared stack (by default) or through separate stacks (routes).

    ``encode_*`` return pooled, projected and (by default) L2-normalised embeddings for contrastive use;
    ``encode_*_tokens`` return the token states a decoder cross-attends to; :meth:`decode` runs the causal text
    decoder to LM logits. Generation lives in :mod:`mmformer.generation.decoding`; training in :mod:`mmformer.tasks`.

    A subclass with fields of its own (a new head's size) names its ModelConfig subclass as ``config_class``, as
    Hugging Face models do: :meth:`from_pretrained` reads a saved config as that class (see docs/extending.md).
    """

    config_class: type[ModelConfig] = ModelConfig  # the class configs are built and read as (a subclass's own)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            expected = pretrained.config_class_name(self.config_class)
            raise TypeError(
                f"config: expected {expected} ({type(self).__name__}.config_class), got {type(config).__name__}"
            )
        self.config = config
        routes = config.routes
        self.stacks = nn.ModuleDict({name: Stack(cfg) for name, cfg in config.stacks.items()})
        stack_cfg = lambda route: config.stacks[routes[route]]  # noqa: E731
        self.image_embed = ImageEmbedder(config.image, stack_cfg("image")) if "image" in routes else None
        self.audio_embed = AudioEmbedder(config.audio, stack_cfg("audio")) if "audio" in routes else None
        text_route = "text" if "text" in routes else "decoder" if "decoder" in routes else None
        self.text_embed = TextEmbedder(config.text, stack_cfg(text_route)) if text_route else None

        def projection(route: str) -> nn.Module | None:
            if route not in routes:
                return None
            kind = config.projections.get(route, "linear")
            if config.embed_dim is None or kind == "none":
                return nn.Identity()
            width, out = config.feature_width(route), config.embed_dim
            if kind == "mlp":  # open_clip's proj_type='mlp'
                hidden = (width + out) // 2
                return nn.Sequential(
                    nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out, bias=False)
                )
            return nn.Linear(width, out, bias=config.projection_bias)

        self.image_proj, self.audio_proj, self.text_proj = (projection(m) for m in MODALITIES)
        self.image_pool = self.image_resampler = self.image_pool_norm = None
        if "image" in routes:
            self._image_heads(config)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = None if config.logit_bias_init is None else nn.Parameter(torch.empty(()))
        self.lm_head = None
        if "decoder" in routes:
            self.lm_head = nn.Linear(config.width("decoder"), config.text.vocab_size, bias=False)
        self.mlm_head = MaskedLMHead(stack_cfg("text"), config.text.vocab_size) if config.mlm_head else None
        self.tie_weights()
        self.ctc_head = nn.Linear(config.width("audio"), config.text.vocab_size) if config.ctc_head else None
        self.processor: Any = None  # the Processor loaded with the weights (from_pretrained), if any
        self.quantization: Any = None  # how torchao quantized the weights (mmformer.compress.quantization), if it did
        self.reset_parameters()

    def _image_heads(self, config: ModelConfig) -> None:
        """The image tower's optional attention pooling (SigLIP / timm MAP head), CoCa's attentional pooler (the
        resampler) and a norm on the pooled features (timm's fc_norm)."""
        image, stack = config.image, config.stacks[config.routes["image"]]
        common = dict(norm=stack.norm, eps=stack.norm_eps, bias=stack.bias)
        if image.pool == "map":
            self.image_pool = AttentionPool(
                in_width=stack.width, width=stack.width, n_heads=stack.n_heads, mlp_hidden=stack.hidden_dim,
                mlp=stack.mlp, **common,
            )  # fmt: skip
        if image.resampler_queries:
            heads = image.resampler_heads or stack.n_heads
            self.image_resampler = AttentionPool(
                in_width=stack.width, width=config.feature_width("image"), n_heads=heads,
                n_queries=image.resampler_queries, query_norm=True, input_norm=True, out_norm=True, **common,
            )  # fmt: skip
        if image.pool_norm:
            self.image_pool_norm = make_norm(stack.norm, config.feature_width("image"), stack.norm_eps)

    def reset_parameters(self) -> None:
        """Initial values of the model's own parameters (the logit scale and bias; submodules initialise theirs)."""
        with torch.no_grad():
            self.logit_scale.fill_(float(self.config.logit_scale_init))
            if self.logit_bias is not None:
                self.logit_bias.fill_(float(self.config.logit_bias_init))

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when the config ties them, and always with the masked-LM
        head's vocabulary projection (as BERT does)."""
        if self.lm_head is not None and self.config.tie_lm_head:
            self.lm_head.weight = self.text_embed.tokens.weight
        if self.mlm_head is not None:
            self.mlm_head.decoder.weight = self.text_embed.tokens.weight

    # ---------------------------------------------------------------- token states
    def stack(self, route: str) -> Stack:
        if route not in self.config.routes:
            raise ValueError(f"this model has no {route!r} route; its routes are {sorted(self.config.routes)}")
        return self.stacks[self.config.routes[route]]

    def _embedder(self, modality: str) -> nn.Module:
        embedder = getattr(self, f"{modality}_embed")
        if embedder is None or modality not in self.config.routes:
            raise ValueError(f"this model has no {modality} encoder; its routes are {sorted(self.config.routes)}")
        return embedder

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) → image token states (B, Np, D) and no mask; with CoCa's attentional pooler, its queries'
        states (B, Q, D) and a mask that keeps the pooled first query out of what a decoder reads."""
        x, mask = self._embedder("image")(pixel_values)
        x = self.stack("image")(x, modality="image")
        if self.image_resampler is not None:
            x = self.image_resampler(x)  # (B, Q, D)
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, 0] = False  # open_clip's CoCa decodes from the other queries only
        return x, mask

    def encode_audio_tokens(
        self,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveforms (B, S) or log-mel (B, M, frames) → audio token states (B, N, D) and a (B, N) mask."""
        if (audio is None) == (audio_features is None):
            raise ValueError("pass exactly one of `audio` (waveforms) and `audio_features` (log-mel)")
        x, mask = self._embedder("audio")(
            audio, audio_lengths, features=audio_features, feature_lengths=feature_lengths
        )
        return self.stack("audio")(x, modality="audio", mask=mask), mask

    def encode_audio_documents(
        self,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Documents]:
        """:meth:`encode_audio_tokens` padding-free: each clip's real tokens, packed into one row (1, M, D), and
        their :class:`~mmformer.layers.Documents` (one per clip). The stack never computes a padding frame and
        attention stays inside each clip; ``documents.pad(tokens)`` with ``documents.mask`` gives back (B, N, D)."""
        if (audio is None) == (audio_features is None):
            raise ValueError("pass exactly one of `audio` (waveforms) and `audio_features` (log-mel)")
        x, mask = self._embedder("audio")(
            audio, audio_lengths, features=audio_features, feature_lengths=feature_lengths
        )  # (B, N, D), (B, N): positions are added per clip, before packing
        documents, x = pack(x, mask)
        return self.stack("audio")(x, modality="audio", documents=documents), documents

    def encode_text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        documents: Documents | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T) → text token states (B, T, D) and the mask of real tokens; causal when the text config
        says so (CLIP). A ``fixed_length`` text encoder pads the ids to its full length first (SigLIP, CoCa); an
        ``append_cls`` one returns (B, T + 1, D), the appended token last (CoCa). ``inputs_embeds`` (B, T, D)
        replaces the token table's rows (a learned prompt's context vectors); the ids still locate the
        end-of-text token for pooling.

        With ``documents``, ids (R, T) are a packed batch of them (no padding, no mask): positions restart and
        attention stays within each document (see :mod:`mmformer.layers.documents`).
        """
        if documents is not None:
            return self._packed_text_states(input_ids, segment_ids, documents, inputs_embeds), None
        x, mask, _ = self._text_states(input_ids, attention_mask, segment_ids, inputs_embeds)
        return x, mask

    def _packed_text_states(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor | None,
        documents: Documents,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token states (R, T, D) of a packed batch of documents."""
        embed, text = self._embedder("text"), self.config.text
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: learned prompts are not supported with packed documents")
        if text.fixed_length or embed.cls_token is not None or text.attend_padding or text.pool == "last":
            raise ValueError(
                "documents: packed text needs a text encoder that reads each text as it is; this one is fixed_length, "
                "appends a class token, attends to padding or pools the last position (SigLIP/CoCa layouts)"
            )
        embed.check(input_ids, None, longest=documents.max_length)
        x = embed(input_ids, segment_ids=segment_ids, positions=documents.positions.view_as(input_ids))
        return self.stack("text")(x, modality="text", causal=text.causal, documents=documents)

    def _text_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(token states, mask of real tokens, the ids the encoder read (padded when fixed_length))."""
        embed, text = self._embedder("text"), self.config.text
        embed.check(input_ids, attention_mask)
        if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"inputs_embeds: expected shape (B, T, D) with (B, T) = {tuple(input_ids.shape)} of input_ids, "
                f"got {tuple(inputs_embeds.shape)}"
            )
        mask = None if attention_mask is None else attention_mask.bool()
        pad = text.max_tokens - input_ids.shape[1]
        # (B, T) → (B, max_tokens), as the checkpoint was trained; also when pad is 0 (no branch on T: an exported
        # graph serves every length up to max_tokens)
        if text.fixed_length and pad >= 0:
            mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
            input_ids, mask = F.pad(input_ids, (0, pad), value=text.pad_id), F.pad(mask, (0, pad), value=False)
            segment_ids = None if segment_ids is None else F.pad(segment_ids, (0, pad))
            if inputs_embeds is not None:  # the padding's rows come from the token table, as its ids' would
                padding = embed.tokens(input_ids[:, text.max_tokens - pad :]).to(inputs_embeds.dtype)
                inputs_embeds = torch.cat([inputs_embeds, padding], dim=1)
        x = embed(input_ids, segment_ids=segment_ids, append_cls=True, inputs_embeds=inputs_embeds)
        attend = mask
        if embed.cls_token is not None and mask is not None:  # the appended token is real
            ones = mask.new_ones(mask.shape[0], 1)
            mask = torch.cat([mask, ones], dim=1)
            # open_clip's CoCa checkpoints were trained with the key mask shifted by one (correct_cls_mask=False)
            attend = torch.cat([ones, attend], dim=1) if text.legacy_cls_mask else mask
        if text.attend_padding:
            attend = None
        # CoCa's class token follows the padding: a real query there (the shifted mask makes it look padded)
        padded_queries = embed.cls_token is not None
        x = self.stack("text")(x, modality="text", mask=attend, causal=text.causal, padded_queries=padded_queries)
        return x, mask, input_ids

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        *,
        documents: Documents | None = None,
    ) -> torch.Tensor:
        """Masked-LM logits (B, T, V) of token ids (B, T): the text encoder's states through the masked-LM head
        (``BertForMaskedLM``'s logits). With ``documents``, ids (R, T) are a packed batch of them (see
        :meth:`encode_text_tokens`)."""
        if self.mlm_head is None:
            raise ValueError("mlm_logits: this model has no masked-LM head (ModelConfig.mlm_head=False)")
        x, _ = self.encode_text_tokens(input_ids, attention_mask, segment_ids, documents=documents)
        return self.mlm_head(x)

    # ---------------------------------------------------------------- pooled embeddings
    @staticmethod
    def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    def _finish(self, pooled: torch.Tensor, proj: nn.Module, normalize: bool) -> torch.Tensor:
        out = proj(pooled)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) normalised pixels → (B, E) image embeddings."""
        x, _ = self.encode_image_tokens(pixel_values)
        return self.pool_image(x, normalize)

    def pool_image(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image token states (B, Np, D) from :meth:`encode_image_tokens` → (B, E) embeddings, so that a training
        step can feed one encoder pass to both the contrastive head and the decoder."""
        cfg = self.config.image
        if cfg.pool == "cls":
            pooled = tokens[:, 0]
        elif cfg.pool == "mean":
            pooled = tokens.mean(dim=1)
        elif cfg.pool == "mean_patches":
            pooled = tokens[:, cfg.n_prefix :].mean(dim=1)
        else:  # map: the attention-pooling head reads the patch tokens
            pooled = self.image_pool(tokens[:, cfg.n_prefix :])[:, 0]
        if self.image_pool_norm is not None:
            pooled = self.image_pool_norm(pooled)
        return self._finish(pooled, self.image_proj, normalize)

    def encode_audio(
        self,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        normalize: bool = True,
        packed: bool = False,
    ) -> torch.Tensor:
        """Waveforms (B, S) with sample counts (B,), or log-mel features → (B, E) audio embeddings; ``packed`` runs
        the stack padding-free (:meth:`encode_audio_documents`), with the same result."""
        encode = self.encode_audio_documents if packed else self.encode_audio_tokens
        x, mask = encode(audio, audio_lengths, audio_features=audio_features, feature_lengths=feature_lengths)
        if packed:
            x, mask = mask.pad(x), mask.mask
        return self.pool_audio(x, mask, normalize)

    def pool_audio(self, tokens: torch.Tensor, mask: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
        """Audio token states (B, N, D) and mask (B, N) from :meth:`encode_audio_tokens` → (B, E) embeddings."""
        return self._finish(self._masked_mean(tokens, mask), self.audio_proj, normalize)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        segment_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        documents: Documents | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Token ids (B, T) with mask (B, T) → (B, E) text embeddings (``inputs_embeds``: see
        :meth:`encode_text_tokens`).

        ``packed`` runs the stack padding-free on the masked (right-padded) rows, with the same result;
        ``documents`` says the ids (R, T) already are a packed batch (no mask): one embedding per document.
        """
        if packed and documents is None:
            documents, input_ids = pack(input_ids, attention_mask)
            segment_ids = None if segment_ids is None else pack(segment_ids, attention_mask)[1]
        if documents is not None:  # per-document rows (n, L), the layout pooling reads
            x = documents.pad(self._packed_text_states(input_ids, segment_ids, documents, inputs_embeds))
            input_ids, mask = documents.pad(input_ids), documents.mask
        else:
            x, mask, input_ids = self._text_states(input_ids, attention_mask, segment_ids, inputs_embeds)
        return self.pool_text(x, input_ids, mask, normalize)

    def pool_text(
        self, tokens: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None, normalize: bool = True
    ) -> torch.Tensor:
        """Text token states (B, T, D) of ids (B, T) with mask (B, T) → (B, E) embeddings (cls, mean, max, last or
        end-of-text pooling, as the text config says)."""
        pool = self.config.text.pool
        if pool == "mean":
            pooled = self._masked_mean(tokens, mask)
        elif pool == "cls":
            pooled = tokens[:, 0]
        elif pool == "max":  # sentence-transformers' max pooling: per feature, the largest over the real tokens
            pooled = tokens if mask is None else tokens.masked_fill(~mask.bool()[..., None], -1e9)
            pooled = pooled.amax(dim=1)
        elif pool in ("last", "append_cls"):
            pooled = tokens[:, -1]
        else:
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_positions(input_ids, mask)]
        return self._finish(pooled, self.text_proj, normalize)

    def eot_positions(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per row, the first end-of-text token; rows without one use their last real token."""
        T = input_ids.shape[1]
        last = (
            (mask.long().sum(dim=1) - 1).clamp(min=0) if mask is not None else torch.full_like(input_ids[:, 0], T - 1)
        )
        eos = self.config.text.eos_id
        if eos is None:
            return last
        is_eos = input_ids == eos
        if mask is not None:
            is_eos = is_eos & mask  # an eos id in the padding is not the end of the text
        first = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), last)
        return first

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings of whatever is given, plus ``logit_scale`` (already exponentiated) as in open_clip."""
        out: dict[str, torch.Tensor] = {}
        if pixel_values is not None:
            out["image_features"] = self.encode_image(pixel_values)
        if audio is not None:
            out["audio_features"] = self.encode_audio(audio, audio_lengths)
        if input_ids is not None:
            out["text_features"] = self.encode_text(input_ids, attention_mask)
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    # ---------------------------------------------------------------- decoder
    def decode(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        documents: Documents | None = None,
        memory_documents: Documents | None = None,
        cross_scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        """Causal decoder: ids (B, T) reading memory (B, S, D) → logits (B, T, V). Without memory (or without a
        cross-attention sublayer) it is a decoder-only language model.

        With a cache, ``input_ids`` are only the new tokens; memory may be None once the cache holds its keys, and
        ``attention_mask`` covers the new tokens only (the cache remembers the padding of earlier ones).
        Memory may also have B / G rows, each read by G consecutive id rows (the beams of one sample): its
        cross-attention keys/values are then computed, stored and read once per sample rather than once per beam.

        Padding may be on either side. Left-padded rows (batched prompts) number their tokens from their first real
        one, as Hugging Face ``generate`` does, so that each row's logits are those it would have alone.
        ``positions`` (B, T) overrides the position ids (packed documents restart them per document).
        ``prefix_embeds`` (P, D): learned vectors the decoder reads before the ids (prompt tuning, see
        :mod:`mmformer.adapt.prompts`); they take positions 0..P-1 (and the cache's first P slots) and return no logits.

        With ``documents``, ids (R, T) are a packed batch of n documents (teacher forcing without padding): document
        i reads memory row i of memory (n, S, D), or memory document i of a packed memory (1, M, D) with
        ``memory_documents``. ``cross_scores`` (opt-in) collects the cross-attention scores of chosen heads (Whisper's
        alignment heads, for word timestamps).
        """
        if self.lm_head is None:
            raise ValueError(f"this model has no decoder; its routes are {sorted(self.config.routes)}")
        self.text_embed.check(input_ids, attention_mask, longest=None if documents is None else documents.max_length)
        weight, width = weights.base_layer(self.lm_head).weight, self.config.width("decoder")
        if documents is not None:
            check_packed_memory(memory, memory_documents, documents, cache, width)
        else:
            check_memory(memory, memory_mask, input_ids.shape[0], width, weight, cache)
        if memory is not None and memory.dtype != weight.dtype and not torch.is_autocast_enabled(memory.device.type):
            memory = memory.to(weight.dtype)  # as the embedders cast their inputs (float64 memory, a bf16 encoder)
        mask = None if attention_mask is None else attention_mask.bool()
        if positions is not None:
            check_positions(positions, input_ids)
        elif cache is None and mask is not None and (torch.compiler.is_compiling() or not right_padded(mask)):
            # left padding: each row counts from its first real token (while tracing, for any layout: the same
            # positions as consecutive ones at every real token of a right-padded row)
            positions = positions_from_mask(mask)
        if prefix_embeds is not None:
            if documents is not None:
                raise ValueError("prefix_embeds: a learned decoder prefix is not supported with packed documents")
            check_prefix(prefix_embeds, width, cache)
        docs = {} if documents is None else {"documents": documents, "memory_documents": memory_documents}
        if cross_scores is not None:
            docs["cross_scores"] = cross_scores
        h = self.decode_step(
            input_ids,
            memory=memory,
            memory_mask=memory_mask,
            mask=mask,
            cache=cache,
            positions=positions,
            prefix_embeds=prefix_embeds,
            **docs,
        )
        return h if return_hidden else self.lm_head(h)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        *,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        documents: Documents | None = None,
        memory_documents: Documents | None = None,
        cross_scores: CrossAttentionScores | None = None,
    ) -> torch.Tensor:
        """:meth:`decode` without its input checks, returning the final hidden states (B, T, D): the inner step of
        token-by-token generation, whose ids come from the model itself (the checks cost as much as a layer)."""
        B, T = input_ids.shape
        P = 0 if prefix_embeds is None else prefix_embeds.shape[0]
        docs: dict[str, Any] = {}
        if documents is not None:  # a packed batch: positions restart in every document
            x = self.text_embed(input_ids, positions=documents.positions.view_as(input_ids))
            docs, positions = {"documents": documents}, None
        else:
            if P:  # the prefix's positions come first, all real
                if mask is not None:
                    mask = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P + T)
                if positions is not None:
                    first = torch.arange(P, device=positions.device).expand(B, P)
                    positions = torch.cat([first, positions + P], dim=1)  # (B, P + T)
            if cache is not None:  # the cache keeps the padding of earlier steps and numbers each row's tokens
                mask, tracked = cache.track(mask, P + T)
                positions = tracked if positions is None else positions
            # the cache's length only without position ids (a static cache always gives them: its compiled step
            # reads no host value)
            offset = cache.length if cache is not None and positions is None else 0
            if positions is None:
                x = self.text_embed(input_ids, offset=offset + P)  # (B, T, D)
            else:
                x = self.text_embed(input_ids, positions=positions[:, P:])
            if P:
                vectors = prefix_embeds.to(x.dtype).expand(B, -1, -1)
                where = dict(offset=offset) if positions is None else dict(positions=positions[:, :P])
                x = torch.cat([self.text_embed(None, inputs_embeds=vectors, **where), x], dim=1)  # (B, P + T, D)
        first_layer = 0
        if self.config.decoder_input == "text":  # CoCa: the text tower's causal states, before its final norm
            text = self.stack("text")
            x = text(
                x, modality="text", mask=mask, causal=True, cache=cache, final_norm=False, positions=positions, **docs
            )
            first_layer = text.cfg.depth
        if documents is not None:
            docs["memory_documents"] = memory_documents
        if cross_scores is not None:
            docs["cross_scores"] = cross_scores
        h = self.stack("decoder")(
            x,
            modality="text",
            mask=mask,
            causal=True,
            memory=memory,
            memory_mask=memory_mask,
            cache=cache,
            first_layer=first_layer,
            positions=positions,
            **docs,
        )
        return h[:, P:] if P else h

    def make_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        *,
        static: bool = False,
        cross_dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A preallocated KV cache for the decoder stack, of ``max_length`` positions (default: the text position
        table's); :meth:`KVCache.ensure` grows it. ``static``: a fixed-size
        :class:`~mmformer.layers.cache.StaticKVCache` (fixed-shape decoding steps for CUDA graphs). ``cross_dtype``:
        the dtype the cross-attention keys/values are kept in (bf16: half the bytes each step reads)."""
        ref = weights.base_layer(self.text_embed.tokens).weight
        length = max_length or self.config.text.max_length
        extra = self.stack("text").cfg.depth if self.config.decoder_input == "text" else 0
        return self.stack("decoder").make_cache(
            batch_size, length, device=ref.device, dtype=ref.dtype, extra_layers=extra, static=static,
            cross_dtype=cross_dtype,
        )  # fmt: skip

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The mean mixture-of-experts load-balancing loss over every MoE layer call recorded since the last pop
        (None without any), and forget them. MoE layers record one per call while training; a training step pops
        once before its forward passes (dropping leftovers, e.g. gradient checkpointing's recomputation in backward)
        and once after."""
        return pop_aux_loss(self)

    # ---------------------------------------------------------------- pretrained I/O and generation
    def save_pretrained(self, directory: str | os.PathLike, processor: Any = None, *, overwrite: bool = True) -> None:
        """Write config.json + model.safetensors (and the processor's files) into ``directory``, atomically; see
        :func:`mmformer.io.pretrained.save_pretrained`."""
        pretrained.save_pretrained(self, directory, processor=processor, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        map_location: str | torch.device | Any = "cpu",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        config: ModelConfig | None = None,
        max_parameters: int | None = None,
    ) -> Self:
        """Load a model from a save_pretrained directory, a Lightning ``.ckpt``, or a weights file beside a config.json.

        The model is built on the meta device and checked against the file's header (names, shapes, dtypes, the
        parameter count) before anything is allocated; then the file's tensors are assigned (see
        :mod:`mmformer.io.weights`), so loading costs about one read of the file, whatever its config declares.
        Called on a subclass, it builds that class, reading the stored config as its :attr:`config_class`.

        Args:
            path: the directory or file (see :func:`mmformer.io.pretrained.read_checkpoint`).
            map_location: where tensors are read to (``torch.load``'s argument; a device for safetensors).
            device: put the model there (default: where the tensors were read to).
            dtype: the floating-point dtype of the model (default float32), or its name (``"bfloat16"``); stored
                tensors are cast to it.
            strict: refuse missing and unexpected keys (False: load the rest, initialise the missing ones and warn,
                listing them). Tensors with another shape are refused either way.
            config: use this config (a :attr:`config_class`) instead of the one stored with the weights.
            max_parameters: the most parameters the config may declare (default: what the file holds; with
                ``strict=False`` twice that plus 16 M, for new heads).

        Returns:
            The model in eval mode; ``model.processor`` holds the processor saved beside it, or None.

        Raises:
            FileNotFoundError: ``path`` does not exist, or a needed config.json / model.safetensors is missing.
            ValueError: the file is not a checkpoint, is corrupt, is a pickle that is not weights-only, or its
                weights do not fit the config; the message names the file.
            TypeError: ``dtype`` is neither a floating-point dtype nor its name.
        """
        dtype = pretrained.load_dtype(dtype)
        checkpoint = pretrained.read_checkpoint(
            path, config=config, map_location=map_location, config_class=cls.config_class
        )
        if checkpoint.quantization is not None:  # torchao tensors: checked by their logical shapes, like any weights
            where = (
                device if device is not None else map_location if isinstance(map_location, str | torch.device) else None
            )
            checkpoint = quantized_files.open_quantized(checkpoint, device=where, dtype=dtype)
            dtype = checkpoint.quantization.torch_dtype
        held = sum(spec.numel for spec in checkpoint.specs.values())
        floor = checkpoint.config.parameter_floor()
        ceiling = weights.parameter_ceiling(held, strict, max_parameters)
        # Far beyond the file (building even on the meta device could take a while): refused before building
        # anything. Closer configs are built on the meta device and refused listing every key that differs.
        if floor > 4 * ceiling:
            summary = weights.size_summary(floor, held, checkpoint.source, at_least=True)
            raise ValueError(weights.too_many_parameters(checkpoint.source, summary, ceiling, max_parameters))
        model = weights.build_on_meta(cls, checkpoint.config)
        if dtype is not None:
            model.to(dtype=dtype)
        if device is None and isinstance(map_location, (str, torch.device)):
            device = map_location
        weights.fill(
            model,
            checkpoint.specs,
            checkpoint.read,
            strict=strict,
            source=checkpoint.source,
            device=device,
            max_parameters=max_parameters,
        )
        model.processor = checkpoint.processor
        model.quantization = checkpoint.quantization
        return model.eval()

    def generate(self, input_ids: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """Token ids (B, T) decoded from images, audio, text or a prompt alone; ``input_ids`` (first, as in Hugging
        Face) is a decoder-only model's prompt, a text encoder's input otherwise. See
        :func:`mmformer.generation.decoding.generate`."""
        return generation.generate(self, input_ids=input_ids, **inputs)

    def complete(self, prompts: Any, processor: Any = None, **decoding: Any) -> list[str]:
        """Continuations of text prompts (a str, a list of str, or prompt ids) by a decoder-only language model;
        see :func:`mmformer.generation.completion.complete`."""
        return completion.complete(self, prompts, processor=processor, **decoding)

    def caption(self, images: Any, processor: Any = None, **decoding: Any) -> list[str]:
        """Captions for images (pixel tensors, or anything the processor accepts)."""
        return generation.caption(self, images, processor=processor, **decoding)

    def transcribe(self, waveforms: Any, sample_rate: int = 16000, processor: Any = None, **decoding: Any) -> list[str]:
        """Transcripts of waveforms (or audio file paths)."""
        return generation.transcribe(self, waveforms, sample_rate=sample_rate, processor=processor, **decoding)
