"""open_clip models whose text tower lives in ``model.text``: ``CustomTextCLIP`` (open_clip's own text transformer, or a
Hugging Face text encoder) and CoCa → :class:`~mmformer.MultimodalTransformer`. Called by
:func:`mmformer.convert.from_open_clip` for such modules.

**Hugging Face text towers** (``text_cfg.hf_model_name``, e.g. ``roberta-ViT-B-32``, ``xlm-roberta-base-ViT-B-32``):
the BERT / RoBERTa / XLM-RoBERTa encoder maps as :mod:`mmformer.convert.hf_bert` does (a post-norm ``text`` stack);
open_clip's ``mean_pooler`` → ``TextConfig(pool="mean")``, ``cls_last_hidden_state_pooler`` → ``pool="cls"``; its
projection ``proj_type`` ``linear`` / ``mlp`` (linear → GELU → linear, no biases) / none →
``ModelConfig.projections["text"]``. open_clip masks the ids equal to ``pad_token_id``; mmformer uses the
tokenizer's attention mask, the same for right-padded text.

**CoCa** (``coca_ViT-B-32``, ...): three parts, each a config knob rather than a class:

- image: the ViT, then the attentional pooler (``visual.attn_pool``: 256 learned queries of the embedding width read
  the normed patch tokens) and ``ln_post`` → ``ImageConfig(resampler_queries=256, ...)``; the first query is the
  pooled embedding (then ``visual.proj``), the other 255 are what the decoder reads (the first is masked out of
  the decoder's memory);
- text: the causal text transformer with a class token appended after the text padded to its full length
  (``cls_emb``), pooled after ``ln_final`` → ``TextConfig(pool="append_cls", fixed_length=True)``; the published
  checkpoints' shifted key mask (``correct_cls_mask=False``) → ``legacy_cls_mask=True``;
- caption decoder: open_clip's ``MultimodalTransformer`` reads the text tower's token states (before
  ``ln_final``) → ``ModelConfig(decoder_input="text")``; its layers are self-attention + MLP, then cross-attention
  with a norm on the image tokens (``ln_1_kv``) + MLP → ``StackConfig(cross_mlp=True, cross_memory_norm=True)``;
  ``ln_final`` and ``text_projection`` (the LM head, untied).

Greedy captions equal open_clip's ``model.generate(image, generation_type="top_k", top_k=1, seq_len=L,
min_seq_len=M)`` with ``generate(max_new_tokens=L - 1, min_new_tokens=M - 1, forced_eos=True)``, except that
open_clip also ends a caption at a generated id 0 (its pad id, CLIP's "!" token), which mmformer does not.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from torch import nn

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import UnsupportedModelError, WeightMap, map_cross_attention
from mmformer.convert.hf_bert import BERT_FAMILY, bert_configs, check_bert_config, map_bert_encoder
from mmformer.convert.open_clip import (
    _OPENAI_EXTRA_KEYS,
    logit_scale_bias,
    map_blocks,
    map_logits,
    map_text,
    map_vision,
    stack_from_module,
    text_from_module,
    vision_from_module,
)

__all__ = ["custom_text_model"]

_HF_POOLERS = {"MeanPooler": "mean", "ClsLastHiddenStatePooler": "cls"}


def custom_text_model(model: nn.Module, quick_gelu: bool | None) -> tuple[ModelConfig, WeightMap]:
    """(config, weight map) of an open_clip ``CustomTextCLIP`` or ``CoCa`` module."""
    vision, image = vision_from_module(model.visual, quick_gelu)
    text_module = model.text
    kind = type(text_module).__name__
    if kind == "HFTextEncoder":
        text, text_cfg, embed_dim, projection = _hf_text(text_module)
    elif kind == "TextTransformer":
        text, text_cfg, embed_dim = text_from_module(text_module, quick_gelu)
        projection = "linear"
    else:
        raise UnsupportedModelError(f"open_clip: text tower {kind} is not supported")
    stacks = {"vision": vision, "text": text}
    routes = {"image": "vision", "text": "text"}
    extra: dict[str, Any] = {}
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:  # CoCa
        stacks["decoder"] = _decoder_stack(decoder, quick_gelu)
        routes["decoder"] = "decoder"
        extra = dict(decoder_input="text", tie_lm_head=False)
        if decoder.text_projection.shape[1] != text_cfg.vocab_size:
            raise UnsupportedModelError(
                f"open_clip: a CoCa decoder vocabulary ({decoder.text_projection.shape[1]}) other than the text "
                f"tower's ({text_cfg.vocab_size})"
            )
    scale, bias = logit_scale_bias(model)
    config = ModelConfig(
        stacks=stacks,
        routes=routes,
        image=image,
        audio=None,
        text=text_cfg,
        embed_dim=embed_dim,
        projection_bias=False,
        projections={} if projection == "linear" else {"text": projection},
        logit_scale_init=scale,
        logit_bias_init=bias,
        **extra,
    )
    return config, _weight_map(model, config, kind)


def _hf_text(text: nn.Module) -> tuple[StackConfig, TextConfig, int, str]:
    """(stack, text config, embedding size, projection kind) of open_clip's ``HFTextEncoder``."""
    cfg = text.transformer.config.to_dict()
    if cfg.get("model_type") not in BERT_FAMILY:
        raise UnsupportedModelError(
            f"open_clip: Hugging Face text tower model_type={cfg.get('model_type')!r}; supported: {list(BERT_FAMILY)}"
        )
    check_bert_config(cfg)
    pooler = type(text.pooler).__name__
    pooling = _HF_POOLERS.get(pooler)
    if pooler == "ClsPooler" and getattr(text.transformer, "pooler", None) is None:
        pooling = "cls"  # without the transformer's pooler layer ClsPooler reads the first token
    if pooling is None:
        raise UnsupportedModelError(
            f"open_clip: text pooler {pooler} (with BERT's pooler layer, or max pooling) is not supported; "
            "mean_pooler and cls_last_hidden_state_pooler are"
        )
    stack, text_cfg = bert_configs(cfg, pooling)
    proj = text.proj
    if isinstance(proj, nn.Identity):
        return stack, text_cfg, stack.width, "none"
    if isinstance(proj, nn.Linear) and proj.bias is None:
        return stack, text_cfg, proj.out_features, "linear"
    layers = list(proj) if isinstance(proj, nn.Sequential) else []
    if (
        len(layers) == 3
        and all(isinstance(m, nn.Linear) and m.bias is None for m in (layers[0], layers[2]))
        and isinstance(layers[1], nn.GELU)
        and layers[1].approximate == "none"
    ):
        return stack, text_cfg, layers[2].out_features, "mlp"
    raise UnsupportedModelError(f"open_clip: text projection {proj} (linear, mlp without biases, or none)")


def _decoder_stack(decoder: nn.Module, quick_gelu: bool | None) -> StackConfig:
    """CoCa's multimodal decoder: its self-attention blocks and its cross-attention blocks must agree."""
    blocks = stack_from_module(decoder, [decoder.ln_final], "text decoder", quick_gelu)
    cross_norms = [b.ln_1_kv for b in decoder.cross_attn]
    cross = stack_from_module(types.SimpleNamespace(resblocks=decoder.cross_attn), cross_norms, "decoder", quick_gelu)
    if cross != blocks:
        raise UnsupportedModelError(
            f"open_clip: CoCa decoder cross-attention blocks ({cross}) differ from its self-attention blocks ({blocks})"
        )
    return dataclasses.replace(blocks, cross_attention=True, cross_mlp=True, cross_memory_norm=True)


def _weight_map(model: nn.Module, config: ModelConfig, kind: str) -> WeightMap:
    ignore = [
        *_OPENAI_EXTRA_KEYS,
        "text.transformer.embeddings.position_ids",
        "text.transformer.embeddings.token_type_ids",
    ]
    wm = WeightMap(model.state_dict(), name="open_clip", ignore=ignore)
    map_vision(wm, config)
    if kind == "HFTextEncoder":
        map_bert_encoder(wm, model.text.transformer.config.to_dict(), source="text.transformer.", target="stacks.text")
        proj = config.projections.get("text", "linear")
        if proj == "linear":
            wm.copy("text_proj.weight", "text.proj.weight")
        elif proj == "mlp":
            wm.copy("text_proj.0.weight", "text.proj.0.weight")
            wm.copy("text_proj.2.weight", "text.proj.2.weight")
    else:
        map_text(wm, config, "text.")
    if "decoder" in config.routes:
        _map_decoder(wm, config.stacks["decoder"].depth)
    map_logits(wm)
    return wm


def _map_decoder(wm: WeightMap, depth: int) -> None:
    """CoCa's ``text_decoder``: ``resblocks.N`` (self-attention + MLP) and ``cross_attn.N`` (cross-attention + MLP)
    → block N's ``attn``/``mlp`` and ``cross_attn``/``cross_mlp``."""
    map_blocks(wm, "stacks.decoder", "text_decoder", depth)
    for i in range(depth):
        t, s = f"stacks.decoder.blocks.{i}", f"text_decoder.cross_attn.{i}"
        wm.copy_module(f"{t}.cross_attn.norm", f"{s}.ln_1")
        wm.copy_module(f"{t}.cross_attn.fn.memory_norm", f"{s}.ln_1_kv")
        map_cross_attention(wm, f"{t}.cross_attn.fn", f"{s}.attn")
        wm.copy_module(f"{t}.cross_mlp.norm", f"{s}.ln_2")
        wm.copy_module(f"{t}.cross_mlp.fn.fc1", f"{s}.mlp.c_fc")
        wm.copy_module(f"{t}.cross_mlp.fn.fc2", f"{s}.mlp.c_proj")
    wm.copy_module("stacks.decoder.norm", "text_decoder.ln_final")
    wm.copy("lm_head.weight", "text_decoder.text_projection", lambda t: t.t())  # (D, V) → (V, D)
