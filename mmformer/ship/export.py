"""Export a model for serving: every tower as its own graph, in ONNX (``torch.onnx.export(dynamo=True)``) or as a
``torch.export`` program (``.pt2``), with dynamic batch and sequence axes.

The graphs, as Hugging Face Optimum lays out an encoder–decoder export (``mmformer export --format onnx``)::

    out/
      image_encoder.onnx          pixel_values (B, C, H, W) → image_embeds (B, E), image_states (B, Np, D): the
                                  decoder's memory is image_states[:, image.memory_start:] (CoCa: its pooled first
                                  query is not read), with a mask of ones
      audio_encoder.onnx          input_features (B, M, Nf), feature_lengths (B,)
                                  → audio_embeds (B, E), audio_states (B, N, D), audio_mask (B, N)
      text_encoder.onnx           input_ids (B, T), attention_mask (B, T) → text_embeds (B, E), text_states (B, T, D)
      decoder_model.onnx          input_ids (B, T), memory (B, S, D), memory_mask (B, S)
                                  → logits (B, T, V), present_keys/values (L, B, nkv, T, hs),
                                    cross_keys/values (Lc, B, nkv, S, hs): the cross-attention layers' (CoCa: Lc < L)
      decoder_with_past_model.onnx   input_ids (B, 1), memory_mask (B, S), past_keys/values (L, B, nkv, P, hs),
                                     cross_keys_0 … cross_keys_{Lc-1}, cross_values_0 … (B, nkv, S, hs) each
                                  → logits (B, 1, V), present_keys/values (L, B, nkv, P + 1, hs)
      export_config.json          the graphs, their inputs/outputs and dynamic axes, the zero-shot logit scale and
                                  bias (SigLIP's: scores read through a sigmoid), the special token ids (end ids
                                  included), the decoder's length limit, the audio window, where the decoder's image
                                  memory starts and the checkpoint's decoding rules (``generation``: Whisper's prompt
                                  tokens and suppressed tokens)
      mel_filters.npy             the log-mel filter bank (n_fft/2 + 1, M), for feature extraction without torch
      config.json, tokenizer.json, preprocessor_config.json

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

Every folder is written through :func:`mmformer.io.pretrained.atomic_directory`: a failed export leaves the target as
it was (no half-written folder).

Shape legend: B batch, C channels, H×W pixels, M mel bins, Nf mel frames, N audio tokens, Np image tokens, T text
tokens, S memory tokens, P cached positions, L decoder layers, nkv key/value heads, hs head size, D width,
E embedding size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from mmformer.generation.decoding_rules import reads_memory
from mmformer.io.pretrained import EXPORT_CONFIG, MEL_FILTERS
from mmformer.io.weights import model_device
from mmformer.layers.cache import KVCache
from mmformer.model import MultimodalTransformer
from mmformer.ship.onnx_runner import cross_inputs

FORMATS = ("onnx", "torch-export")
TOWERS = ("image", "audio", "text", "decoder")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
# 23: scaled_dot_product_attention exports as ONNX's Attention operator instead of MatMul/Softmax around a Transpose
# of the keys, which onnxruntime materialised at every decoding step (the cached cross-attention keys: 4 ms a layer at
# whisper-tiny dimensions, batch 8, 30 s of memory). 24: Attention takes a key-padding mask as lengths
# (``nonpad_kv_seqlen``), which onnxruntime (>= 1.24) runs on its fast kernel; see _lengths_for_masks.
OPSET = 24
MIN_OPSET = 18


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

    The decoder graphs read ``memory_mask`` as a count of real tokens first (:func:`_lengths_for_masks`), so a mask
    hiding the first token would hide the last one instead: a runner drops these tokens and passes a mask of ones.
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


# ---------------------------------------------------------------------------------------------- writing
def export(
    model: MultimodalTransformer,
    directory: str | os.PathLike,
    *,
    format: str = "onnx",
    towers: Sequence[str] | None = None,
    processor: Any = None,
    opset: int = OPSET,
    overwrite: bool = True,
) -> Path:
    """Write the graphs of ``towers`` (default: all the model has) into ``directory``, atomically.

    Args:
        model: the model to export (eval mode; float weights).
        directory: the output folder; replaced as a whole on success, untouched on failure.
        format: ``onnx`` (``torch.onnx.export(dynamo=True)``, opset ``opset``) or ``torch-export`` (``.pt2``
            programs written by ``torch.export.save``).
        towers: some of ``image``, ``audio``, ``text``, ``decoder``.
        processor: saved beside the graphs (default ``model.processor``), so that a runner finds the tokenizer and
            the preprocessing settings.
        overwrite: False refuses to replace a folder that already holds an export or a saved model.

    Raises:
        ValueError: an unknown format or tower, a tower the model lacks, or a quantized model.
    """
    from mmformer.io import pretrained

    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if format == "onnx" and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        # torch.onnx's exporter writes opset 18 or later (asked for less, it converted down, failed, and wrote 18)
        raise ValueError(f"opset: expected an int >= {MIN_OPSET} (torch.onnx.export(dynamo=True)), got {opset!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(
            "model: a torchao-quantized model cannot be exported to ONNX or torch.export here; export the float "
            "model (its tensor subclasses have no ONNX lowering) and quantize with onnxruntime's tools if needed"
        )
    model = model.eval()
    todo = graphs(model, towers)  # refuses bad towers before anything is written
    # the decoder's memory is image_states[:, memory_start:], all real tokens (see image_memory_start)
    image = {"memory_start": image_memory_start(model)} if any(g.name == "image_encoder" for g in todo) else None
    processor = processor if processor is not None else getattr(model, "processor", None)
    with (
        pretrained.atomic_directory(
            directory,
            overwrite=overwrite,
            marker_files=(EXPORT_CONFIG, pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME),
        ) as staging,
        _torchlib_registry_built_once(),
    ):
        records = {}
        for graph in todo:
            path = staging / f"{graph.name}{SUFFIX[format]}"
            (_write_onnx if format == "onnx" else _write_program)(graph, path, opset)
            records[graph.name] = {
                "file": path.name,
                "inputs": list(graph.inputs),
                "outputs": graph.outputs,
                "dynamic_axes": graph.dynamic,
            }
        pretrained.write_config(staging, model.config)
        if processor is not None:
            processor.save_pretrained(staging)
        if "audio_encoder" in records:
            _save_mel_filters(model, staging / MEL_FILTERS)
        text, audio, generation = model.config.text, model.config.audio, model.config.generation
        config = {
            "format": format,
            "opset": opset if format == "onnx" else None,
            "torch_version": torch.__version__,
            "graphs": records,
            "logit_scale": float(model.logit_scale.detach().exp()),  # zero-shot logits = scale * cosine similarity
            # + bias, read through a sigmoid (SigLIP; zero_shot_logits, ZeroShotClassifier.predict_proba); None: softmax
            "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
            "text": {"bos_id": text.bos_id, "eos_id": text.eos_id, "pad_id": text.pad_id,
                     "max_length": text.max_length if text.position != "none" else None,
                     # where generate stops: the position table less CoCa's class-token slot; every end id
                     "max_tokens": text.max_tokens if text.position != "none" else None,
                     "extra_eos_ids": list(text.extra_eos_ids)},
            "image": image,
            "audio": None if audio is None else {
                "sample_rate": audio.sample_rate, "n_fft": audio.n_fft, "hop_length": audio.hop_length,
                "n_mels": audio.n_mels, "mel_filters": MEL_FILTERS if "audio_encoder" in records else None,
                "pad_to_seconds": audio.pad_to_seconds},  # Whisper's fixed window (LogMel)
            # the checkpoint's prompt and suppressed tokens (GenerationConfig; the runner builds the prompt with them)
            "generation": None if generation is None else dataclasses.asdict(generation),
        }  # fmt: skip
        (staging / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def _masked_attention(model: Any) -> list[tuple[Any, Any]]:
    """The ONNX ``Attention`` nodes of ``model``'s graph that take a mask (input 3), with that mask."""
    return [(node, node.inputs[3]) for node in model.graph
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and len(node.inputs) >= 4
            and node.inputs[3] is not None]  # fmt: skip


def _lengths_for_masks(model: Any) -> None:
    """Pass every ``Attention`` node's key-padding mask (B, 1, 1, S) as lengths (``nonpad_kv_seqlen``, opset 24).

    Only for graphs whose masks are real tokens first (:attr:`Graph.prefix_masks`: the audio encoder's, from its
    lengths, and the decoder's cross-attention, from ``memory_mask``): the lengths are the mask's sum.
    onnxruntime runs Attention with a mask on a path that is 1.8× slower than its kernel without one (one layer of
    whisper-tiny's encoder, 8 × 1,500 tokens, 2 threads: 280 vs 157 ms); with the lengths, 183 ms and equal outputs.
    Masks of any other shape (causal, windows, relative-position biases) are left as they are."""
    import numpy as np
    from onnxscript import ir

    lengths: dict[Any, Any] = {}  # mask value → its (B,) lengths, computed once per graph
    for node, mask in _masked_attention(model):
        shape = mask.shape
        if len(node.inputs) != 4 or mask.dtype != ir.DataType.BOOL or shape is None or len(shape) != 4:
            continue  # past key/value inputs, or a float bias
        if shape[1:3] != (1, 1):
            continue  # not a key-padding mask
        if mask not in lengths:
            cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT64})
            axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1, 2, 3], dtype=np.int64))})
            total = ir.node("ReduceSum", [cast.outputs[0], axes.outputs[0]], attributes={"keepdims": 0})  # (B,)
            model.graph.insert_before(node, [cast, axes, total])
            lengths[mask] = total.outputs[0]
        attention = ir.node("Attention", [*node.inputs[:3], None, None, None, lengths[mask]],
                            attributes=dict(node.attributes), num_outputs=len(node.outputs))  # fmt: skip
        model.graph.insert_before(node, attention)
        ir.convenience.replace_all_uses_with(node.outputs, attention.outputs, replace_graph_outputs=True)
        described = [(old.name, old.shape, old.type) for old in node.outputs]
        model.graph.remove(node, safe=True)
        for new, (name, shape, type_) in zip(attention.outputs, described):
            new.name, new.shape, new.type = name, shape, type_


def _mask_per_query(model: Any) -> None:
    """Give every ONNX ``Attention`` node's mask one row per query (an ``Expand`` to (…, T, S)).

    onnxruntime 1.32's ``Attention`` (opset 23) refuses a mask broadcast over the queries (``attention_helper.h:70``:
    "inconsistent q_sequence_length"), which the ONNX spec allows and which attention passes as a key-padding mask
    (B, 1, 1, S). The ONNX graph alone gets the expansion: in the torch graphs (PT2E, ``torch.export``) inductor would
    materialise an expanded mask as a float (B, 1, T, S) one (measured: PT2E whisper-tiny encode 1.74× → 1.40×)."""
    import numpy as np
    from onnxscript import ir  # onnx_ir, the exporter's graph API

    for node, mask in _masked_attention(model):
        ones = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1, 1], dtype=np.int64))})
        one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], dtype=np.int64))})
        queries = ir.node("Shape", [node.inputs[0]], attributes={"start": -2, "end": -1})  # T of (B, nh, T, hs)
        shape = ir.node("Concat", [ones.outputs[0], queries.outputs[0], one.outputs[0]], attributes={"axis": 0})
        expand = ir.node("Expand", [mask, shape.outputs[0]])  # (…, 1, S) → (…, T, S); a no-op where T is there
        model.graph.insert_before(node, [ones, one, queries, shape, expand])
        node.replace_input_with(3, expand.outputs[0])


@contextlib.contextmanager
def _torchlib_registry_built_once() -> Iterator[None]:
    """While inside, ``torch.onnx.export`` builds its table of ONNX translations (torchlib's) once per opset.

    ``torch.onnx.export(dynamo=True)`` (torch 2.14) builds ``ONNXRegistry.from_torchlib`` at every call, reading and
    parsing the source of ~500 onnxscript functions again (``inspect.getsource``, ``ast``): 0.5–0.75 s of CPU a call
    on the shared 2-core EPYC, a sixth of a graph of the tests' tiny model. Its five graphs spent 2.6 s of CPU in it,
    0.5 s with this (the export 17.9 → 15.6 s of CPU; text and decoder, three graphs: 11.1 → 9.5 s; medians of four,
    the same ONNX files). The table is a function of the opset alone, so the first call inside builds it and every
    call (the first included) gets its own copy, the table's lists copied: a call's ``custom_translation_table`` stays
    in that call's copy. Nothing outlives the block (one :func:`export`): the original classmethod is back afterwards,
    and a torch without it (or with another registry layout) builds its table at every call as before. A block
    entered while another is open (a nested export, or one on another thread) leaves the builder to that one, so
    the last to leave never puts back the other's replacement instead of torch's."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    registry_class = getattr(_registration, "ONNXRegistry", None)
    original = vars(registry_class).get("from_torchlib") if isinstance(registry_class, type) else None
    if not isinstance(original, classmethod) or getattr(original.__func__, "builds_once", False):
        yield
        return
    built: dict[tuple, Any] = {}  # (class, arguments) → the registry built for them

    def from_torchlib(cls: type, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = original.__func__(cls, *args, **kwargs)
        table = getattr(built[key], "functions", None)
        if not isinstance(table, dict):  # a layout this copy does not know: build as torch does
            return original.__func__(cls, *args, **kwargs)
        registry = copy.copy(built[key])
        registry.functions = {target: list(translations) for target, translations in table.items()}
        return registry

    from_torchlib.builds_once = True  # marks the replacement (see above)
    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = original


def _write_onnx(graph: Graph, path: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
        program = torch.onnx.export(
            graph.module,
            tuple(graph.inputs.values()),
            input_names=list(graph.inputs),
            output_names=graph.outputs,
            dynamic_shapes=graph.dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        if opset >= 24 and graph.prefix_masks:
            _lengths_for_masks(program.model)
        if opset >= 23:
            _mask_per_query(program.model)
        program.save(str(path))


def _write_program(graph: Graph, path: Path, opset: int) -> None:
    del opset
    with torch.no_grad():
        program = torch.export.export(graph.module, tuple(graph.inputs.values()), dynamic_shapes=graph.dynamic_shapes())
    torch.export.save(program, str(path))


def _save_mel_filters(model: MultimodalTransformer, path: Path) -> None:
    import numpy as np

    bank = model.audio_embed.features.filters(torch.device("cpu"))  # (n_fft/2 + 1, M)
    np.save(path, bank.numpy().astype(np.float32), allow_pickle=False)


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """A ``.pt2`` program written by :func:`export` (``torch.export.load``), once :func:`check_program_payloads` has
    found nothing in it that loading would unpickle unsafely.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.pt2`` archive, or one with a payload that only an unsafe unpickler reads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no .pt2 program at {path}")
    check_program_payloads(path)
    return torch.export.load(str(path))


def check_program_payloads(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading would run a pickle: ``torch.export.load`` reads weights and constants
    that the archive marks as pickled with torch's full (unsafe) unpickler, custom and opaque objects with
    ``pickle``, and falls back to the full unpickler where a pickled artifact (the sample inputs, a legacy constants
    file) fails the safe one — any of which runs code a crafted file holds. The programs
    :func:`export` writes hold raw tensors only (weights, tensor constants, sample inputs the safe unpickler
    reads)."""
    import io
    import zipfile

    from torch.export.pt2_archive import constants as pt2

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"path: {path} is not a .pt2 archive ({e})") from None
    with archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[-1]  # below the archive's top folder
            if not inner.startswith(("data/", pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)):
                continue
            if inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith("_config.json"):
                entries = json.loads(archive.read(name)).get("config", {})
                for fqn, meta in entries.items():
                    raw = not meta.get("use_pickle") and (
                        inner.startswith(pt2.WEIGHTS_DIR)
                        or str(meta.get("path_name", "")).startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
                    )
                    if not raw:
                        raise ValueError(f"path: {path} holds {fqn!r} as a pickled object ({inner}), which loading "
                                         "would unpickle unsafely; refused (export the model again with mmformer "
                                         "export)")  # fmt: skip
            elif inner.endswith(".pt"):  # a pickled artifact: the sample inputs, or a legacy constants file
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:  # whatever the safe unpickler refuses, torch would retry unsafely
                    raise ValueError(f"path: {path}: {inner} is not readable by the safe unpickler "
                                     f"({type(e).__name__}); refused") from None  # fmt: skip
