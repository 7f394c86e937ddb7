"""Hugging Face T5 (``T5ForConditionalGeneration``; T5 v1.0 and v1.1, mT5) → a text-to-text
:class:`~mmformer.MultimodalTransformer`.

T5 maps onto two pre-norm stacks: the text encoder (``routes["text"] = "encoder"``) and the decoder with
cross-attention (``routes["decoder"] = "decoder"``), sharing the token embedding (``shared``). Both use
``position="t5"``: the learned bucketed relative bias of each stack's first layer
(``block.0.layer.0.SelfAttention.relative_attention_bias``) → ``stacks.*.relative_bias``, shared by every layer,
bidirectional in the encoder and causal in the decoder. RMS-style T5 LayerNorm → ``norm="rmsnorm"``; no biases;
``d_kv`` → ``head_size``; T5 does not scale attention scores (``attn_scale=1.0``). Feed-forward: ``relu``
(``DenseReluDense.wi``/``wo``) or ``gated-gelu`` (T5 v1.1: ``wi_0`` the tanh-GELU gate, ``wi_1``, stacked into
``fc1`` → ``geglu_tanh``). The decoder's cross-attention ``EncDecAttention`` → ``cross_attn`` (``q``; ``k``/``v``
fused into ``kv``).

The LM head: T5 v1.0 ties it to ``shared`` and scales the decoder output by ``d_model ** -0.5`` first; that scale is
folded into the decoder's final norm gain here (the same function). v1.1 (``tie_word_embeddings: false``) has its
own ``lm_head`` and no scale. Generation starts from ``decoder_start_token_id`` (the pad id): ``TextConfig.bos_id``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    build_processor,
    lm_head_tied,
    read_hf_checkpoint,
)
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_t5"]

MODEL_TYPES = ("t5", "mt5")
_FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu_tanh", "gated-gelu_new": "geglu_tanh", "gated-silu": "swiglu"}
DEFAULT_CONTEXT = 512  # T5's relative positions have no table; the context a prompt must fit


def _scaled_output(cfg: dict[str, Any]) -> bool:
    """Whether the decoder output is scaled by d_model ** -0.5 before the LM head (T5 v1.0; not v1.1)."""
    if "scale_decoder_outputs" in cfg:  # transformers >= 5 stores the decision itself
        return bool(cfg["scale_decoder_outputs"])
    return cfg.get("tie_word_embeddings", True) is not False


def _model_config(cfg: dict[str, Any], tied: bool) -> ModelConfig:
    kind = cfg.get("feed_forward_proj", "relu")
    if kind not in _FEED_FORWARD:
        raise UnsupportedModelError(f"hf_t5: feed_forward_proj={kind!r}; supported: {sorted(_FEED_FORWARD)}")

    def stack(depth: int, cross: bool) -> StackConfig:
        return StackConfig(
            width=cfg["d_model"],
            depth=depth,
            n_heads=cfg["num_heads"],
            head_size=cfg["d_kv"],
            mlp=_FEED_FORWARD[kind],
            mlp_hidden=cfg["d_ff"],
            norm="rmsnorm",
            norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
            bias=False,
            attn_scale=1.0,
            position="t5",
            relative_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_max_distance=cfg.get("relative_attention_max_distance", 128),
            cross_attention=cross,
        )

    layers = cfg["num_layers"]
    decoder_layers = cfg.get("num_decoder_layers") or layers
    pad, eos = cfg.get("pad_token_id", 0), cfg.get("eos_token_id", 1)
    start = cfg.get("decoder_start_token_id")
    text = TextConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg.get("n_positions") or DEFAULT_CONTEXT,
        position="none",
        pad_id=pad,
        bos_id=start if start is not None else pad,
        eos_id=eos,
        pool="mean",
    )
    return ModelConfig(
        stacks={"encoder": stack(layers, False), "decoder": stack(decoder_layers, True)},
        routes={"text": "encoder", "decoder": "decoder"},
        image=None,
        audio=None,
        text=text,
        embed_dim=None,
        tie_lm_head=tied,
    )


def _map_attention(wm: WeightMap, dst: str, src: str, cross: bool) -> None:
    if cross:
        wm.copy(f"{dst}.q.weight", f"{src}.q.weight")
        wm.fuse(f"{dst}.kv.weight", [f"{src}.k.weight", f"{src}.v.weight"])
    else:
        wm.fuse(f"{dst}.qkv.weight", [f"{src}.{n}.weight" for n in "qkv"])
    wm.copy(f"{dst}.proj.weight", f"{src}.o.weight")


def _map_feed_forward(wm: WeightMap, dst: str, src: str, gated: bool) -> None:
    if gated:  # wi_0 is the activated gate, wi_1 the linear branch: mmformer's fc1 holds gate rows first
        wm.fuse(f"{dst}.fc1.weight", [f"{src}.wi_0.weight", f"{src}.wi_1.weight"])
    else:
        wm.copy(f"{dst}.fc1.weight", f"{src}.wi.weight")
    wm.copy(f"{dst}.fc2.weight", f"{src}.wo.weight")


def _map_stack(wm: WeightMap, side: str, depth: int, gated: bool, output_scale: float) -> None:
    cross = side == "decoder"
    for i in range(depth):
        dst, src = f"stacks.{side}.blocks.{i}", f"{side}.block.{i}.layer"
        wm.copy(f"{dst}.attn.norm.weight", f"{src}.0.layer_norm.weight")
        _map_attention(wm, f"{dst}.attn.fn", f"{src}.0.SelfAttention", cross=False)
        if cross:
            wm.copy(f"{dst}.cross_attn.norm.weight", f"{src}.1.layer_norm.weight")
            _map_attention(wm, f"{dst}.cross_attn.fn", f"{src}.1.EncDecAttention", cross=True)
        ff = 2 if cross else 1
        wm.copy(f"{dst}.mlp.norm.weight", f"{src}.{ff}.layer_norm.weight")
        _map_feed_forward(wm, f"{dst}.mlp.fn", f"{src}.{ff}.DenseReluDense", gated)
    wm.copy(
        f"stacks.{side}.relative_bias.weight", f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    )
    wm.copy(f"stacks.{side}.norm.weight", f"{side}.final_layer_norm.weight", lambda w: w * output_scale)


def from_hf_t5(path_or_model: Any) -> MultimodalTransformer:
    """Convert a Hugging Face T5 exactly (no download).

    Args:
        path_or_model: a ``transformers.T5ForConditionalGeneration`` (or ``MT5ForConditionalGeneration``)
            instance, or a local directory with its ``config.json`` and weights, plus optionally ``tokenizer.json``.

    Returns:
        A text-to-text model in eval mode: ``model.generate(input_ids=..., attention_mask=...)`` decodes from the
        encoded text (as Hugging Face's ``generate``); ``model.encode_text_tokens`` gives the encoder states.
    """
    cfg, state, directory = read_hf_checkpoint(
        path_or_model, model_type=MODEL_TYPES, name="T5", model_class="T5ForConditionalGeneration"
    )
    shared = state.get("shared.weight")
    tied = lm_head_tied(state, "lm_head.weight", "shared.weight", cfg)
    config = _model_config(cfg, tied)
    model = build_on_meta(MultimodalTransformer, config)
    # copies of `shared` under the embedders' names (tied in transformers), and a bias that only exists to be unused
    ignore = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    ignore += ["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    ignore += ["lm_head.weight"] if tied else []
    for name in ignore[:2]:
        if name in state and shared is not None and not torch.equal(state[name], shared):
            raise UnsupportedModelError(f"hf_t5: {name} differs from shared.weight (untied input embeddings)")

    wm = WeightMap(state, name="hf_t5", ignore=ignore)
    wm.copy("text_embed.tokens.weight", "shared.weight")
    gated = config.stacks["encoder"].mlp != "relu"
    _map_stack(wm, "encoder", config.stacks["encoder"].depth, gated, 1.0)
    scale = cfg["d_model"] ** -0.5 if _scaled_output(cfg) else 1.0
    _map_stack(wm, "decoder", config.stacks["decoder"].depth, gated, scale)
    if not tied:
        wm.copy("lm_head.weight", "lm_head.weight")
    wm.initialise("logit_scale")  # mmformer-only, unused by a text-to-text model
    wm.load_into(model)
    model.processor = build_processor(read_hf_tokenizer(directory))
    return model.eval()
