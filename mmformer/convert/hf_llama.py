"""Hugging Face Llama (``LlamaForCausalLM``; also Qwen2, ``Qwen2ForCausalLM``) → a decoder-only
:class:`~mmformer.MultimodalTransformer`.

Llama maps onto one pre-norm stack on the decoder route: RMSNorm (``input_layernorm`` → ``attn.norm``,
``post_attention_layernorm`` → ``mlp.norm``, ``norm`` → the final norm), rotate-half RoPE with ``rope_theta`` and
the ``linear`` or ``llama3`` ``rope_scaling`` (``StackConfig.rope_scaling`` takes Hugging Face's dict),
grouped-query attention (``num_key_value_heads`` → ``n_kv_heads``; ``q/k/v_proj`` fused into ``qkv``, ``o_proj`` →
``proj``), SwiGLU (``gate_proj`` and ``up_proj`` stacked into ``mlp.fn.fc1``, gate rows first; ``down_proj`` →
``fc2``), no biases (Qwen2: biases on q/k/v only, ``StackConfig.qkv_bias``), and an untied ``lm_head`` unless
``tie_word_embeddings``. Text positions come from RoPE alone (``TextConfig.position="none"``); ``max_length`` is
``max_position_embeddings``, the context a prompt must fit.

Not converted (refused by name): sliding-window attention, partial rotary factors, RoPE kinds other than default,
linear and llama3, activations other than SiLU, and bias layouts other than none, all, or q/k/v only (Qwen2).
Llama 3 lists several eos ids (config.json, generation_config.json): the first is ``TextConfig.eos_id``, the others
``TextConfig.extra_eos_ids``; generation stops at any of them.
"""

from __future__ import annotations

from typing import Any

from mmformer.config import ROPE_SCALING_KEYS, ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    build_processor,
    extra_eos_ids,
    first_id,
    lm_head_tied,
    read_hf_checkpoint,
)
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_llama"]

MODEL_TYPES = ("llama", "qwen2")
_IGNORED = ["layers.*.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq"]  # buffers of older checkpoints


def _rope(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from a v5 ``rope_parameters`` or a v4 ``rope_theta`` +
    ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        params = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"hf_llama: partial_rotary_factor={params['partial_rotary_factor']} (only 1.0)")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise UnsupportedModelError(
            f"hf_llama: rope_type={kind!r}; supported: 'default' and {sorted(ROPE_SCALING_KEYS)} rope scaling"
        )
    return theta, {"rope_type": kind, **{k: params[k] for k in ROPE_SCALING_KEYS[kind]}}


def _biases(cfg: dict[str, Any], model_type: str) -> tuple[bool, bool]:
    """(bias of every linear layer, bias of the q/k/v projections)."""
    if model_type == "qwen2":
        return False, True
    attention, mlp = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    if attention != mlp:
        raise UnsupportedModelError(
            f"hf_llama: attention_bias={attention} with mlp_bias={mlp} (mmformer has one bias knob for attention "
            "output and MLP; supported: both False, both True)"
        )
    return attention, attention


def _model_config(cfg: dict[str, Any], model_type: str, tied: bool, directory: Any = None) -> ModelConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hf_llama: hidden_act={cfg['hidden_act']!r} (only 'silu', i.e. SwiGLU)")
    if cfg.get("use_sliding_window", False) or (model_type == "llama" and cfg.get("sliding_window")):
        raise UnsupportedModelError("hf_llama: sliding-window attention")
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or width // heads
    theta, scaling = _rope(cfg)
    bias, qkv_bias = _biases(cfg, model_type)
    stack = StackConfig(
        width=width,
        depth=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_size=None if head_dim * heads == width else head_dim,
        mlp="swiglu",
        mlp_hidden=cfg["intermediate_size"],
        norm="rmsnorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        bias=bias,
        qkv_bias=qkv_bias if qkv_bias != bias else None,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
    )
    eos = first_id(cfg.get("eos_token_id"))
    bos = first_id(cfg.get("bos_token_id"))
    pad = cfg.get("pad_token_id")
    text = TextConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg.get("max_position_embeddings", 2048),
        position="none",
        pad_id=pad if pad is not None else (eos if eos is not None else 0),
        bos_id=bos if bos is not None else eos,
        eos_id=eos if eos is not None else bos,
        extra_eos_ids=extra_eos_ids(cfg, directory, eos if eos is not None else bos),
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


def from_hf_llama(path_or_model: Any) -> MultimodalTransformer:
    """Convert a Hugging Face Llama (or Qwen2) exactly (no download).

    Args:
        path_or_model: a ``transformers.LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (or the bare ``*Model``) instance,
            or a local directory with its ``config.json`` and weights (single or sharded safetensors, or a safe
            ``.bin``), plus optionally ``tokenizer.json``.

    Returns:
        A decoder-only model in eval mode; ``model.processor`` holds the folder's tokenizer (None without one).
    """
    cfg, state, directory = read_hf_checkpoint(
        path_or_model, model_type=MODEL_TYPES, name="Llama", model_class="LlamaForCausalLM or Qwen2ForCausalLM"
    )
    model_type = cfg.get("model_type", "llama")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    tied = lm_head_tied(state, "lm_head.weight", "embed_tokens.weight", cfg)
    config = _model_config(cfg, model_type, tied, directory)
    model = build_on_meta(MultimodalTransformer, config)

    wm = WeightMap(state, name=f"hf_{model_type}", ignore=_IGNORED + (["lm_head.weight"] if tied else []))
    wm.copy("text_embed.tokens.weight", "embed_tokens.weight")
    stack = config.stacks["decoder"]
    qkv_bias = stack.attention_bias[0]
    linear = ("weight", "bias") if stack.bias else ("weight",)  # parameters of the output projections
    for i in range(stack.depth):
        dst, src = f"stacks.decoder.blocks.{i}", f"layers.{i}"
        wm.copy(f"{dst}.attn.norm.weight", f"{src}.input_layernorm.weight")
        wm.fuse(f"{dst}.attn.fn.qkv.weight", [f"{src}.self_attn.{n}_proj.weight" for n in "qkv"])
        if qkv_bias:
            wm.fuse(f"{dst}.attn.fn.qkv.bias", [f"{src}.self_attn.{n}_proj.bias" for n in "qkv"])
        wm.copy_module(f"{dst}.attn.fn.proj", f"{src}.self_attn.o_proj", names=linear)
        wm.copy(f"{dst}.mlp.norm.weight", f"{src}.post_attention_layernorm.weight")
        wm.fuse(f"{dst}.mlp.fn.fc1.weight", [f"{src}.mlp.{n}_proj.weight" for n in ("gate", "up")])
        wm.copy_module(f"{dst}.mlp.fn.fc2", f"{src}.mlp.down_proj", names=linear)
        if stack.bias:
            wm.fuse(f"{dst}.mlp.fn.fc1.bias", [f"{src}.mlp.{n}_proj.bias" for n in ("gate", "up")])
    wm.copy("stacks.decoder.norm.weight", "norm.weight")
    if not tied:
        wm.copy("lm_head.weight", "lm_head.weight")
    wm.initialise("logit_scale")  # mmformer-only, unused by a language model
    wm.load_into(model)
    tokenizer = read_hf_tokenizer(directory)
    model.processor = build_processor(tokenizer)
    return model.eval()
