"""The exportable graphs of a model, the one owner of which graphs a model has: each tower, and the decoder's two
calls, as a module of tensors in and tensors out (:class:`Graph`: with example inputs, input and output names and
dynamic axes). :mod:`mmformer.ship.export` writes them (ONNX, ``torch.export``); :mod:`mmformer.compress.pt2e`
quantizes them.

The graphs, as Hugging Face Optimum lays out an encoder–decoder export::

    image_encoder               pixel_values (B, C, H, W) → image_embeds (B, E), image_states (B, Np, D): the
                                decoder's memory is image_states[:, image.memory_start:] (CoCa: its pooled first
                                query is not read), with a mask of ones
    audio_encoder               input_features (B, M, Nf), feature_lengths (B,)
                                → audio_embeds (B, E), audio_states (B, N, D), audio_mask (B, N)
    text_encoder                input_ids (B, T), attention_mask (B, T) → text_embeds (B, E), text_states (B, T, D)
    decoder_model               input_ids (B, T), memory (B, S, D), memory_mask (B, S)
                                → logits (B, T, V), present_keys/values (L, B, nkv, T, hs),
                                  cross_keys/values (Lc, B, nkv, S, hs): the cross-attention layers' (CoCa: Lc < L)
    decoder_with_past_model     input_ids (B, 1), memory_mask (B, S), past_keys/values (L, B, nkv, P, hs),
                                cross_keys_0 … cross_keys_{Lc-1}, cross_values_0 … (B, nkv, S, hs) each
                                → logits (B, 1, V), present_keys/values (L, B, nkv, P + 1, hs)

Every mask is real tokens first, as the encoders give them: ``feature_lengths`` (B,) of the audio graph and
``memory_mask`` (B, S) of the decoder's (whose attention reads it as lengths from opset 24 on: a mask with a hole
would be read as its count of real tokens; :class:`~mmformer.ship.onnx_runner.OnnxModel` only passes the encoders'
masks, and drops the image tokens the model's decoder does not read — ``image.memory_start`` of the export config —
rather than masking them).

The decoder runs as Optimum's pair: ``decoder_model`` reads the prompt and the encoder states once and returns the
self-attention cache and the cross-attention keys/values; ``decoder_with_past_model`` is one greedy step with the
cache as explicit inputs and outputs (:meth:`mmformer.layers.cache.KVCache.from_state`). The step reads the
cross-attention keys/values one input per layer (layer ``i`` of the prefill's stacked output: a view, no copy), as
Optimum's ``past_key_values.{i}.encoder.key`` do: a stacked input is split into per-layer copies inside the graph at
every step — at whisper-tiny dimensions, batch 8 and 30 s of memory, 147 MB copied per token, a quarter of
onnxruntime's step (:class:`~mmformer.ship.onnx_runner.OnnxModel` still runs exports of the stacked layout). The
audio graph takes log-mel features, as Optimum's Whisper encoder does: :mod:`mmformer.ship.onnx_runner` computes them
in numpy with the saved filter bank and matches the model's :class:`~mmformer.embedders.audio.LogMel`.

Shape legend: B batch, C channels, H×W pixels, M mel bins, Nf mel frames, N audio tokens, Np image tokens, T text
tokens, S memory tokens, P cached positions, L decoder layers, Lc of them that read the memory, nkv key/value heads,
hs head size, D width, E embedding size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from mmformer.generation.decoding_rules import reads_memory
from mmformer.io.weights import model_device
from mmformer.layers.cache import KVCache
from mmformer.model import MultimodalTransformer
from mmformer.ship.onnx_runner import cross_inputs

TOWERS = ("image", "audio", "text", "decoder")


# ---------------------------------------------------------------------------------------------- the graphs' modules
class ImageEncoder(nn.Module):
    """pixel_values (B, C, H, W) → image_embeds (B, E) (L2-normalised), image_states (B, Np, D)."""

    def __init__(self, model: MultimodalTransformer):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, _ = self.model.encode_image_tokens(pixel_values)
        return self.model.pool_image(states), states


class AudioEncoder(nn.Module):
    """input_features (B, M, Nf) log-mel, feature_lengths (B,) → audio_embeds (B, E), audio_states (B, N, D),
    audio_mask (B, N) (True = a real token)."""

    def __init__(self, model: MultimodalTransformer):
        super().__init__()
        self.model = model

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states, mask = self.model.encode_audio_tokens(audio_features=input_features, feature_lengths=feature_lengths)
        return self.model.pool_audio(states, mask), states, mask


class TextEncoder(nn.Module):
    """input_ids (B, T), attention_mask (B, T) → text_embeds (B, E), text_states (B, T, D)."""

    def __init__(self, model: MultimodalTransformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one pass through the text stack: its states, pooled as encode_text pools them (with the ids as the stack
        # saw them: fixed-length text towers pad them)
        states, mask, ids = self.model._text_states(input_ids, attention_mask, None)
        return self.model.pool_text(states, ids, mask), states


class DecoderPrefill(nn.Module):
    """The decoder's first call: the prompt input_ids (B, T) reading memory (B, S, D) with memory_mask (B, S) →
    logits (B, T, V), the self-attention cache (L, B, nkv, T, hs) ×2 and the cross-attention keys/values
    (Lc, B, nkv, S, hs) ×2 of the Lc layers that read the memory (all L, or the last ones: CoCa)."""

    def __init__(self, model: MultimodalTransformer):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = self.model.make_cache(input_ids.shape[0], input_ids.shape[1])
        logits = self.model.decode(input_ids, memory, memory_mask, cache=cache)
        return (logits, *cache.state(), *cache.cross_state())


class DecoderStep(nn.Module):
    """One decoding step with an explicit cache: input_ids (B, 1), memory_mask (B, S), past keys/values
    (L, B, nkv, P, hs), then each cross-attention layer's keys and then their values, (B, nkv, S, hs) each
    (``*cross``: 2Lc tensors; ``*cross_keys, *cross_values`` of the prefill's stacked ones) → logits (B, 1, V),
    present keys/values (L, B, nkv, P + 1, hs)."""

    def __init__(self, model: MultimodalTransformer):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        memory_mask: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
        *cross: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layers = self.model.stack("decoder").cfg.depth  # those that read the memory (after CoCa's text layers)
        if len(cross) != 2 * layers:
            raise ValueError(f"cross: expected {2 * layers} tensors (each cross-attention layer's keys, then values), "
                             f"got {len(cross)}")  # fmt: skip
        cache = KVCache.from_state(past_keys, past_values, (cross[:layers], cross[layers:]))
        hidden = self.model.decode_step(input_ids, memory_mask=memory_mask, cache=cache)
        return (self.model.lm_head(hidden), *cache.state())


@dataclass
class Graph:
    """One exported graph: its module, example inputs, names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # name → example tensor, in the module's argument order
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input name → {axis: dimension name}
    dims: dict[str, Any] = field(default_factory=dict)  # dimension name → torch.export Dim (or Dim.AUTO hint)
    varargs: int = 0  # how many of the last inputs the module takes as *args
    # every key-padding mask inside is built from lengths (real tokens first): ONNX may pass it as lengths
    prefix_masks: bool = False

    def dynamic_shapes(self) -> tuple[dict[int, Any] | tuple | None, ...]:
        """torch.export's dynamic_shapes, one entry per positional argument (the *args ones as one tuple)."""
        shapes = [{axis: self.dims[dim] for axis, dim in self.dynamic.get(name, {}).items()} or None
                  for name in self.inputs]  # fmt: skip
        if not self.varargs:
            return tuple(shapes)
        return (*shapes[: -self.varargs], tuple(shapes[-self.varargs :]))


def examples(model: MultimodalTransformer, batch: int = 2, tokens: int = 3, frames: int = 24) -> dict[str, Any]:
    """Example inputs of every graph at the given sizes (tests run the graphs at several)."""
    cfg = model.config
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    if "image" in cfg.routes:
        h, w = cfg.image.image_size
        out["pixel_values"] = torch.randn(batch, cfg.image.channels, h, w, generator=g)
    if "audio" in cfg.routes:
        if cfg.audio.position != "none":
            frames = min(frames, cfg.audio.max_frames)  # a model with a short position table (Whisper's 2 × source)
        out["input_features"] = torch.randn(batch, cfg.audio.n_mels, frames, generator=g)
        out["feature_lengths"] = torch.full((batch,), frames, dtype=torch.long)
        out["feature_lengths"][0] = max(3, frames - 5)
    low = max(t for t in (cfg.text.pad_id, cfg.text.bos_id or 0, cfg.text.eos_id or 0)) + 1
    ids = torch.randint(min(low, cfg.text.vocab_size - 1), cfg.text.vocab_size, (batch, tokens), generator=g)
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones(batch, tokens, dtype=torch.bool)
    out["attention_mask"][0, -1] = False
    return out


def graphs(model: MultimodalTransformer, towers: Sequence[str] | None = None) -> list[Graph]:
    """The graphs of the requested towers (default: every tower the model has), with example inputs.

    Raises:
        ValueError: a tower is unknown or the model has no route for it (the message names it).
    """
    routes = model.config.routes
    have = [t for t in TOWERS if t in routes]
    if towers is None:
        towers = have
    towers = list(towers)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise ValueError(f"towers: expected some of {list(TOWERS)}, got {unknown}")
    missing = [t for t in towers if t not in routes]
    if missing:
        raise ValueError(
            f"towers: this model has no {', '.join(missing)} route to export; its routes are {sorted(routes)}"
        )
    if not towers:
        raise ValueError(f"towers: nothing to export; the model's routes are {sorted(routes)}")
    cfg, device = model.config, model_device(model)
    if "decoder" in towers and not reads_memory(cfg):
        raise ValueError(
            "towers: the decoder of a decoder-only language model is not exportable yet: the decoder graphs "
            "(decoder_model, decoder_with_past_model) read a memory through cross-attention, which this decoder "
            f"lacks (routes {sorted(routes)}); for int8 use torchao's methods (mmformer quantize --method "
            "int8-weight|int4-weight|dynamic)"
        )
    ex = {k: v.to(device) for k, v in examples(model).items()}
    limit = 2**20
    # texts of up to max_tokens ids: the position table, less an appended class token's slot (CoCa)
    positions = cfg.text.max_tokens if cfg.text.position != "none" else limit
    dims = {
        "batch": Dim("batch", min=1, max=4096),
        "tokens": Dim("tokens", min=1, max=positions),
        "text_tokens": Dim("text_tokens", min=2, max=positions),
        "past_tokens": Dim("past_tokens", min=1, max=positions - 1),
        "memory_tokens": Dim("memory_tokens", min=2, max=limit),
        # frames → tokens goes through the strided convolution's floor division, whose guards the constraint
        # solver cannot prove over a whole range: let torch.export derive the range (at least 3 frames, 2 tokens)
        "frames": Dim.AUTO(min=3, max=cfg.audio.max_frames if cfg.audio and cfg.audio.position != "none" else limit),
    }
    out = []
    if "image" in towers:
        out.append(Graph("image_encoder", ImageEncoder(model), {"pixel_values": ex["pixel_values"]},
                         ["image_embeds", "image_states"], {"pixel_values": {0: "batch"}}, dims))  # fmt: skip
    if "audio" in towers:
        out.append(
            Graph(
                "audio_encoder",
                AudioEncoder(model),
                {"input_features": ex["input_features"], "feature_lengths": ex["feature_lengths"]},
                ["audio_embeds", "audio_states", "audio_mask"],
                {"input_features": {0: "batch", 2: "frames"}, "feature_lengths": {0: "batch"}},
                dims,
                prefix_masks=True,  # from feature_lengths
            )
        )
    if "text" in towers:
        out.append(
            Graph(
                "text_encoder",
                TextEncoder(model),
                {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
                ["text_embeds", "text_states"],
                {"input_ids": {0: "batch", 1: "text_tokens"}, "attention_mask": {0: "batch", 1: "text_tokens"}},
                dims,
            )
        )
    if "decoder" in towers:
        out += _decoder_graphs(model, ex, dims)
    return out


def image_memory_start(model: MultimodalTransformer) -> int:
    """How many leading ``image_states`` the model's decoder does not read (CoCa's pooled first query: the mask
    :meth:`~mmformer.model.MultimodalTransformer.encode_image_tokens` gives its decoder); 0 where it reads them all.

    The decoder graphs read ``memory_mask`` as a count of real tokens first
    (:func:`~mmformer.ship.export._lengths_for_masks`), so a mask hiding the first token would hide the last one
    instead: a runner drops these tokens and passes a mask of ones.
    Read from the model's own mask on an example image, so that the export follows whatever the model hides.

    Raises:
        ValueError: the model's image mask hides tokens other than leading ones (no count can say which).
    """
    pixels = examples(model, batch=1)["pixel_values"].to(model_device(model))
    with torch.no_grad():
        _, mask = model.encode_image_tokens(pixels)
    if mask is None:
        return 0
    row = mask[0].tolist()
    start = row.index(True) if True in row else len(row)
    if not all(row[start:]) or start == len(row):
        raise ValueError(f"model: the decoder's image mask {row} is not hidden tokens first, then real ones; the "
                         "decoder graphs read a memory of real tokens")  # fmt: skip
    return start


def _decoder_graphs(model: MultimodalTransformer, ex: dict[str, Any], dims: dict[str, Any]) -> list[Graph]:
    ids = ex["input_ids"]
    B, S, width = ids.shape[0], 5, model.config.width("decoder")
    memory = torch.randn(B, S, width, generator=torch.Generator().manual_seed(1)).to(ids.device)
    memory_mask = torch.ones(B, S, dtype=torch.bool, device=memory.device)
    memory_mask[0, -1] = False
    with torch.no_grad():
        _, keys, values, cross_keys, cross_values = DecoderPrefill(model)(ids, memory, memory_mask)
    cache_axes = {1: "batch", 3: "past_tokens"}
    per_layer = cross_inputs(cross_keys, cross_values)
    prefill = Graph(
        "decoder_model",
        DecoderPrefill(model),
        {"input_ids": ids, "memory": memory, "memory_mask": memory_mask},
        ["logits", "present_keys", "present_values", "cross_keys", "cross_values"],
        {"input_ids": {0: "batch", 1: "tokens"}, "memory": {0: "batch", 1: "memory_tokens"},
         "memory_mask": {0: "batch", 1: "memory_tokens"}},
        dims,
        prefix_masks=True,  # memory_mask: the encoders' real tokens come first
    )  # fmt: skip
    step = Graph(
        "decoder_with_past_model",
        DecoderStep(model),
        {"input_ids": ids[:, :1], "memory_mask": memory_mask, "past_keys": keys, "past_values": values, **per_layer},
        ["logits", "present_keys", "present_values"],
        {"input_ids": {0: "batch"}, "memory_mask": {0: "batch", 1: "memory_tokens"}, "past_keys": cache_axes,
         "past_values": cache_axes, **{name: {0: "batch", 2: "memory_tokens"} for name in per_layer}},
        dims,
        varargs=len(per_layer),
        prefix_masks=True,
    )  # fmt: skip
    return [prefill, step]
