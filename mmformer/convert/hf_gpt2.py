"""Hugging Face GPT-2 (``GPT2LMHeadModel``) → a decoder-only :class:`~mmformer.MultimodalTransformer`.

GPT-2 maps onto one pre-norm stack on the decoder route (``routes = {"decoder": "decoder"}``, no cross-attention):
``wte`` / ``wpe`` → ``text_embed.tokens`` / learned ``text_embed.positions``; per layer ``ln_1`` → ``attn.norm``,
``attn.c_attn`` (a ``Conv1D``: weights stored (in, out), transposed here; already fused q|k|v) → ``qkv``,
``attn.c_proj`` → ``proj``, ``ln_2`` → ``mlp.norm``, ``mlp.c_fc`` / ``mlp.c_proj`` → ``mlp.fn.fc1`` / ``fc2``
(tanh GELU, ``gelu_new``); ``ln_f`` → the stack's final norm; the LM head is tied to ``wte`` (untied when the
checkpoint stores a different ``lm_head.weight``). ``<|endoftext|>`` is bos, eos and (without a ``pad_token_id``)
the padding id, as in Hugging Face's ``generate``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    build_processor,
    extra_eos_ids,
    lm_head_tied,
    read_hf_checkpoint,
)
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_gpt2"]

# index buffers of older checkpoints (the causal mask), not weights
_IGNORED = ["h.*.attn.bias", "h.*.attn.masked_bias"]
END_OF_TEXT = "<|endoftext|>"


def _model_config(cfg: dict[str, Any], tied: bool, directory: Any = None) -> ModelConfig:
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if cfg.get(key, supported) != supported:
            raise UnsupportedModelError(f"hf_gpt2: {key}={cfg[key]!r} (only {supported})")
    if cfg.get("add_cross_attention", False):
        raise UnsupportedModelError("hf_gpt2: add_cross_attention=True (a GPT-2 decoder reading an encoder)")
    width = cfg["n_embd"]
    stack = StackConfig(
        width=width,
        depth=cfg["n_layer"],
        n_heads=cfg["n_head"],
        mlp=activation_kind(cfg.get("activation_function", "gelu_new"), what="hf_gpt2 activation_function"),
        mlp_hidden=cfg.get("n_inner") or 4 * width,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
    )
    eos = cfg.get("eos_token_id", 50256)
    pad = cfg.get("pad_token_id")
    text = TextConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg["n_positions"],
        position="learned",
        pad_id=pad if pad is not None else eos,
        bos_id=cfg.get("bos_token_id", eos),
        eos_id=eos,
        extra_eos_ids=extra_eos_ids(cfg, directory, eos),
    )
    return ModelConfig(
        stacks={"decoder": stack},
        routes={"decoder": "decoder"},
        image=None,
        audio=None,
        text=text,
        embed_dim=None,
        tie_lm_head=tied,
    )


def _tokenizer(directory, max_length: int):
    """The folder's tokenizer.json with ``<|endoftext|>`` as end-of-text and padding (GPT-2's own tokenizer.json
    names no special tokens in its post-processor); like Hugging Face's GPT-2 tokenizer it adds no token to a text
    (``append_eos=False``): the end-of-text token ends generation and decoding only."""
    tokenizer = read_hf_tokenizer(directory)
    if tokenizer is None or END_OF_TEXT not in tokenizer.backend.get_vocab(with_added_tokens=True):
        return tokenizer
    return tokenizer.replace(
        max_length=max_length, pad_token=END_OF_TEXT, bos_token=None, eos_token=END_OF_TEXT, append_eos=False
    )


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()  # Conv1D stores (in, out); nn.Linear (out, in)


def from_hf_gpt2(path_or_model: Any) -> MultimodalTransformer:
    """Convert a Hugging Face GPT-2 exactly (no download).

    Args:
        path_or_model: a ``transformers.GPT2LMHeadModel`` (or ``GPT2Model``) instance, or a local directory with its
            ``config.json`` and weights (``model.safetensors`` or a safe ``.bin``), plus optionally its
            tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``: :mod:`mmformer.convert.hf_tokenizer`).

    Returns:
        A decoder-only model in eval mode (``model.decode``, ``model.generate(prompt_ids=...)``,
        ``model.complete(texts)``); ``model.processor`` holds the folder's tokenizer (None without one).
    """
    cfg, state, directory = read_hf_checkpoint(
        path_or_model, model_type="gpt2", name="GPT-2", model_class="GPT2LMHeadModel (or GPT2Model)"
    )
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    tied = lm_head_tied(state, "lm_head.weight", "wte.weight", cfg)
    model = build_on_meta(MultimodalTransformer, _model_config(cfg, tied, directory))

    wm = WeightMap(state, name="hf_gpt2", ignore=_IGNORED + (["lm_head.weight"] if tied else []))
    wm.copy("text_embed.tokens.weight", "wte.weight")
    wm.copy("text_embed.positions.weight", "wpe.weight")
    for i in range(cfg["n_layer"]):
        dst, src = f"stacks.decoder.blocks.{i}", f"h.{i}"
        wm.copy_module(f"{dst}.attn.norm", f"{src}.ln_1")
        wm.copy_module(f"{dst}.mlp.norm", f"{src}.ln_2")
        for target, source in (("attn.fn.qkv", "attn.c_attn"), ("attn.fn.proj", "attn.c_proj"),
                               ("mlp.fn.fc1", "mlp.c_fc"), ("mlp.fn.fc2", "mlp.c_proj")):  # fmt: skip
            wm.copy(f"{dst}.{target}.weight", f"{src}.{source}.weight", _transposed)
            wm.copy(f"{dst}.{target}.bias", f"{src}.{source}.bias")
    wm.copy_module("stacks.decoder.norm", "ln_f")
    if not tied:
        wm.copy("lm_head.weight", "lm_head.weight")
    wm.initialise("logit_scale")  # mmformer-only, unused by a language model
    wm.load_into(model)
    model.processor = build_processor(_tokenizer(directory, cfg["n_positions"]))
    return model.eval()
