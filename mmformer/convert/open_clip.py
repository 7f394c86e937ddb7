"""OpenAI CLIP / open_clip → :class:`~mmformer.MultimodalTransformer` with separate vision and text stacks.

Accepts an ``open_clip.CLIP`` module (its settings are read from the modules) or a state dict in the OpenAI-CLIP
layout (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``,
``ln_final``, ``text_projection``, ``logit_scale``, ...), given as a dict or a file, whose dimensions are inferred
from the tensor shapes as open_clip's ``build_model_from_openai_state_dict`` does, and what shapes cannot tell (head
width, activation, pooling) from open_clip's config: named (``model_name="ViT-H-14"``), given, or beside the file;
without one, OpenAI's defaults, with a warning.

Supported: standard ViT CLIP towers (class-token pooling after ``ln_post``, with or without ``ln_pre``, QuickGELU /
GELU, causal or bidirectional text, text pooling argmax / eos / first / last, learned or fixed sin-cos positions,
a logit bias); as modules only (:mod:`mmformer.convert.open_clip_custom`): ``CustomTextCLIP`` with open_clip's own
text transformer or a Hugging Face BERT / RoBERTa / XLM-RoBERTa text tower, and CoCa (its attentional pooler,
appended text class token and multimodal text decoder). Refused with
:class:`~mmformer.convert.common.UnsupportedModelError` naming the feature: ResNet and timm image towers, other
Hugging Face text towers, parallel/cascade attentional pooling, average or no image pooling, layer scale, custom
attention blocks (qk-norm, scaled cosine attention, head scaling, ...), a text projection with bias or none at all.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    STATE_DICT_NAMES,
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    build_processor,
    common_eps,
    is_path,
    load_state_dict,
    map_cross_attention,
)
from mmformer.convert.open_clip_config import (
    CLIP_VOCAB_SIZE,
    config_from_state_dict,
    folder_config,
    model_config,
    named_config,
    text_config,
    warn_of_openai_defaults,
)
from mmformer.io.hub import OPEN_CLIP_CONFIG, WEIGHT_FILES
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["clip_processor", "from_open_clip"]

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # not weights
# A folder's weights: open_clip's files first, as open_clip's own loader, since a LAION repository holds a Hugging Face
# CLIP's model.safetensors beside them.
FOLDER_WEIGHTS = tuple(dict.fromkeys([*WEIGHT_FILES["open_clip"][0], *WEIGHT_FILES["open_clip"][1], *STATE_DICT_NAMES]))


def from_open_clip(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    model_cfg: dict | None = None,
    model_name: str | None = None,
    quick_gelu: bool | None = None,
) -> MultimodalTransformer:
    """Convert an open_clip ``CLIP`` model or an OpenAI-CLIP-layout state dict (dict, file or directory).

    Args:
        model_or_state_dict: an ``open_clip.CLIP`` module, a state dict, or a path to one (safetensors or a
            ``torch.save`` file; read with ``weights_only=True``), or a folder in open_clip's layout
            (``open_clip_model.safetensors``, read before a Hugging Face ``model.safetensors`` beside it as in
            LAION's repositories, and ``open_clip_config.json``, whose ``model_cfg`` and ``preprocess_cfg`` are used).
        model_cfg: for a state dict only: the open_clip model config (as in open_clip's ``model_configs/*.json``:
            ``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``); it supplies what shapes cannot tell
            (head counts, activation, pooling, causal mask, norm epsilon); what it gives of the shapes (widths,
            layers, patch and image size, vocabulary, context, embed_dim) must fit the weights. Default: the config
            of ``model_name``, else a folder's ``open_clip_config.json``; without any, the OpenAI defaults hold, with
            a warning: 64-wide heads, QuickGELU, argmax text pooling, causal text, LayerNorm epsilon 1e-5.
        model_name: for a state dict only, instead of ``model_cfg``: the open_clip architecture of the weights, as
            ``open_clip.create_model(model_name, pretrained=FILE)`` takes it (``"ViT-H-14"``; a ``-quickgelu`` name
            such as ``"ViT-B-32-quickgelu"`` for OpenAI's and other QuickGELU weights); its config is
            ``open_clip.get_model_config(model_name)`` (open_clip's bundled configs and any added with
            ``open_clip.add_model_config``; nothing is downloaded).
        quick_gelu: force QuickGELU (True) or GELU (False); None keeps the module's own activation, or for a state
            dict ``model_cfg["quick_gelu"]`` (open_clip's default False) when a config is given and True (OpenAI's
            weights) when not.

    Returns:
        The converted model in eval mode, with ``model.processor`` set (CLIP's tokenizer when the vocabulary is
        CLIP's, and the image pipeline of the module's or the folder's ``preprocess_cfg``, by default a
        shortest-edge resize + center crop, bicubic, OpenAI mean/std).
    """
    preprocess = None
    if isinstance(model_or_state_dict, nn.Module):
        for name, value in (("model_cfg", model_cfg), ("model_name", model_name)):
            if value is not None:
                raise ValueError(f"{name}: only used with a state dict; an open_clip module carries its own settings")
        state = model_or_state_dict.state_dict()
        preprocess = getattr(getattr(model_or_state_dict, "visual", None), "preprocess_cfg", None)
        if hasattr(model_or_state_dict, "text"):  # CustomTextCLIP, CoCa: the text tower is model.text
            from mmformer.convert.open_clip_custom import custom_text_model

            config, wm = custom_text_model(model_or_state_dict, quick_gelu)
        else:
            config = _config_from_module(model_or_state_dict, quick_gelu)
            wm = _weight_map(state, config)
    elif isinstance(model_or_state_dict, Mapping) or is_path(model_or_state_dict):
        path = is_path(model_or_state_dict)
        state = load_state_dict(model_or_state_dict, FOLDER_WEIGHTS) if path else dict(model_or_state_dict)
        saved = folder_config(Path(model_or_state_dict)) if path else {}
        if model_cfg is not None and not isinstance(model_cfg, Mapping):
            raise TypeError(f"model_cfg: expected a dict (open_clip model config), got {type(model_cfg).__name__}")
        if model_name is not None:
            if model_cfg is not None:
                raise ValueError(f"model_name / model_cfg: give one, not both; got model_name={model_name!r} too")
            model_cfg, given = named_config(model_name), f"model_name: open_clip's {model_name!r} config"
        elif model_cfg is None and saved.get("model_cfg") is not None:  # the folder's open_clip_config.json
            model_cfg, given = saved["model_cfg"], f"{Path(model_or_state_dict) / OPEN_CLIP_CONFIG}: its model_cfg"
        else:
            given = "model_cfg: the config"
        preprocess = saved.get("preprocess_cfg")
        if not model_cfg:
            warn_of_openai_defaults(quick_gelu)
        config = config_from_state_dict(state, dict(model_cfg or {}), quick_gelu, given)
        wm = _weight_map(state, config)
    else:
        raise TypeError(
            "model_or_state_dict: expected an open_clip CLIP module, a state dict or a path, "
            f"got {type(model_or_state_dict).__name__}"
        )
    model = build_on_meta(MultimodalTransformer, config)
    wm.load_into(model)
    model.eval()
    model.processor = _processor(config, preprocess)
    return model


# ---------------------------------------------------------------------------------------------------- from a module
def _config_from_module(model: nn.Module, quick_gelu: bool | None) -> ModelConfig:
    for attr in ("visual", "transformer", "token_embedding", "positional_embedding", "ln_final", "logit_scale"):
        if not hasattr(model, attr):
            raise TypeError(f"model_or_state_dict: expected an open_clip CLIP module with `{attr}`, got {model!r}")
    vision, image = vision_from_module(model.visual, quick_gelu)
    text, text_cfg, embed_dim = text_from_module(model, quick_gelu)
    return model_config(vision, text, image, text_cfg, embed_dim, *logit_scale_bias(model))


def logit_scale_bias(model: nn.Module) -> tuple[float, float | None]:
    """The module's logit scale and logit bias (None without one), as plain numbers for the config."""
    bias = getattr(model, "logit_bias", None)
    scale = float(model.logit_scale.detach().reshape(-1)[0])
    return scale, None if bias is None else float(bias.detach().reshape(-1)[0])


def vision_from_module(v: nn.Module, quick_gelu: bool | None) -> tuple[StackConfig, ImageConfig]:
    """The vision stack and image config of an open_clip ``VisionTransformer`` (CoCa's attentional pooler becomes the
    image resampler, followed by ``ln_post``)."""
    kind = type(v).__name__
    if kind != "VisionTransformer":
        feature = {"ModifiedResNet": "ResNet image towers", "TimmModel": "timm image towers (timm_model_name)"}
        raise UnsupportedModelError(f"open_clip: {feature.get(kind, f'image tower {kind}')} are not supported")
    if v.attn_pool is not None and (getattr(v, "attn_pool_contrastive", None) is not None or v.attn_pool_type):
        raise UnsupportedModelError(
            f"open_clip: attentional pooling {v.attn_pool_type!r} (vision_cfg.attentional_pool='parallel' or "
            "'cascade') is not supported; CoCa's (attentional_pool=True) is"
        )
    if v.pool_type != "tok":
        raise UnsupportedModelError(
            f"open_clip: image pooling vision_cfg.pool_type={v.pool_type!r} is not supported (only 'tok')"
        )
    if v.proj is None:
        raise UnsupportedModelError("open_clip: an image tower without a projection (visual.proj=None)")
    if tuple(v.patch_size)[0] != tuple(v.patch_size)[1]:
        raise UnsupportedModelError(f"open_clip: non-square patches {tuple(v.patch_size)} are not supported")
    pre_norm = not isinstance(v.ln_pre, nn.Identity)
    pool = v.attn_pool
    norms = [v.ln_post] + ([v.ln_pre] if pre_norm else []) + ([] if pool is None else [pool.ln_q, pool.ln_k])
    # final_ln_after_pool with class-token pooling is the same: a LayerNorm acts on each token alone.
    vision = stack_from_module(v.transformer, norms, "visual", quick_gelu)
    if pool is not None:  # CoCa: ln_post follows the attentional pooler, so the stack has no final norm
        vision = dataclasses.replace(vision, final_norm=False)
    image = ImageConfig(
        image_size=list(v.image_size),
        patch_size=int(tuple(v.patch_size)[0]),
        channels=v.conv1.in_channels,
        patch_bias=v.conv1.bias is not None,
        pre_norm=pre_norm,
        resampler_queries=0 if pool is None else pool.query.shape[0],
        resampler_width=None if pool is None else pool.query.shape[1],
        resampler_heads=None if pool is None else pool.attn.num_heads,
    )
    return vision, image


def text_from_module(owner: nn.Module, quick_gelu: bool | None) -> tuple[StackConfig, TextConfig, int]:
    """(text stack, text config, embedding size) of open_clip's text transformer: the CLIP model itself, or a
    ``TextTransformer`` (``model.text`` of CustomTextCLIP / CoCa, whose appended class token is ``cls_emb``)."""
    text = stack_from_module(owner.transformer, [owner.ln_final], "text", quick_gelu)
    proj = owner.text_projection
    if proj is None:
        raise UnsupportedModelError("open_clip: a text tower without a projection (text_cfg.proj_type='none')")
    if isinstance(proj, nn.Linear):
        if proj.bias is not None:
            raise UnsupportedModelError("open_clip: a text projection with bias (text_cfg.proj_bias=True)")
        embed_dim = proj.out_features
    else:
        embed_dim = proj.shape[1]
    if getattr(owner, "use_pad_mask", False):
        raise UnsupportedModelError("open_clip: a bidirectional text tower with a padding mask (use_pad_mask=True)")
    cls = getattr(owner, "cls_emb", None) is not None
    text_cfg = text_config(
        vocab_size=owner.token_embedding.num_embeddings,
        context=owner.positional_embedding.shape[0],
        causal=getattr(owner, "attn_mask", None) is not None,
        pool_type="cls_emb" if cls else getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax")),
        eos_id=getattr(owner, "text_eos_id", getattr(owner, "eos_id", None)),
        pad_id=getattr(owner, "pad_id", 0),
        legacy_cls_mask=cls and not getattr(owner, "correct_cls_mask", False),
    )
    return text, text_cfg, embed_dim


def stack_from_module(transformer: nn.Module, norms: list[nn.Module], what: str, quick_gelu: bool | None):
    blocks = list(transformer.resblocks)
    if not blocks:
        raise UnsupportedModelError(f"open_clip: the {what} tower has no blocks")
    for b in blocks:
        if type(b).__name__ != "ResidualAttentionBlock":
            raise UnsupportedModelError(
                f"open_clip: custom attention blocks in the {what} tower ({type(b).__name__}: block_type='custom', "
                "qk_norm, scaled_cosine_attn, scale_heads, scale_attn(_inner), scale_fc) are not supported"
            )
        if not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity):
            raise UnsupportedModelError(f"open_clip: layer scale (ls_init_value) in the {what} tower is not supported")
        if b.attn.in_proj_bias is None or b.attn.out_proj.bias is None or not b.attn._qkv_same_embed_dim:
            raise UnsupportedModelError(f"open_clip: attention without biases in the {what} tower is not supported")
    acts = {activation_kind(b.mlp.gelu, what=f"open_clip {what} tower") for b in blocks}
    if len(acts) != 1:
        raise UnsupportedModelError(f"open_clip: mixed activations {sorted(acts)} in the {what} tower")
    act = acts.pop()
    eps = common_eps([n for b in blocks for n in (b.ln_1, b.ln_2)] + norms, what=f"open_clip {what} tower")
    return StackConfig(
        width=blocks[0].attn.embed_dim,
        depth=len(blocks),
        n_heads=blocks[0].attn.num_heads,
        mlp=_activation(act, quick_gelu),
        mlp_hidden=blocks[0].mlp.c_fc.out_features,
        norm_eps=eps,
    )


def _activation(act: str, quick_gelu: bool | None) -> str:
    if quick_gelu is None:
        return act
    return "quickgelu" if quick_gelu else ("gelu" if act == "quickgelu" else act)


def _weight_map(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> WeightMap:
    wm = WeightMap(sd, name="open_clip", ignore=_OPENAI_EXTRA_KEYS)
    map_vision(wm, config)
    map_text(wm, config, "")
    map_logits(wm)
    return wm


def map_vision(wm: WeightMap, config: ModelConfig) -> None:
    """open_clip's ``visual.*`` (with CoCa's ``visual.attn_pool``) → the image embedder, vision stack and heads."""
    wm.copy("image_embed.patch.weight", "visual.conv1.weight")
    if config.image.patch_bias:
        wm.copy("image_embed.patch.bias", "visual.conv1.bias")
    wm.copy("image_embed.cls_token", "visual.class_embedding")
    wm.copy("image_embed.positions", "visual.positional_embedding")
    if config.image.pre_norm:
        wm.copy_module("image_embed.norm", "visual.ln_pre")
    map_blocks(wm, "stacks.vision", "visual.transformer", config.stacks["vision"].depth)
    if config.image.resampler_queries:  # CoCa: attn_pool, then ln_post on its outputs
        wm.copy("image_resampler.queries", "visual.attn_pool.query")
        map_cross_attention(wm, "image_resampler", "visual.attn_pool.attn")
        wm.copy_module("image_resampler.query_norm", "visual.attn_pool.ln_q")
        wm.copy_module("image_resampler.input_norm", "visual.attn_pool.ln_k")
        wm.copy_module("image_resampler.out_norm", "visual.ln_post")
    else:
        wm.copy_module("stacks.vision.norm", "visual.ln_post")
    wm.copy("image_proj.weight", "visual.proj", torch.t)  # (D, E) → (E, D)


def map_text(wm: WeightMap, config: ModelConfig, prefix: str) -> None:
    """open_clip's text transformer (keys under ``prefix``: "" for CLIP, "text." for CustomTextCLIP / CoCa) → the
    text embedder, text stack and projection."""
    wm.copy("text_embed.tokens.weight", f"{prefix}token_embedding.weight")
    wm.copy("text_embed.positions.weight", f"{prefix}positional_embedding")
    if config.text.pool == "append_cls":
        wm.copy("text_embed.cls_token", f"{prefix}cls_emb")
    map_blocks(wm, "stacks.text", f"{prefix}transformer", config.stacks["text"].depth)
    wm.copy_module("stacks.text.norm", f"{prefix}ln_final")
    if f"{prefix}text_projection" in wm:
        wm.copy("text_proj.weight", f"{prefix}text_projection", torch.t)  # (D, E) → (E, D)
    else:
        wm.copy("text_proj.weight", f"{prefix}text_projection.weight")


def map_logits(wm: WeightMap) -> None:
    wm.copy("logit_scale", "logit_scale", lambda t: t.reshape(()))
    if "logit_bias" in wm:
        wm.copy("logit_bias", "logit_bias", lambda t: t.reshape(()))


def map_blocks(wm: WeightMap, target: str, source: str, depth: int) -> None:
    """open_clip ``ResidualAttentionBlock`` s (``{source}.resblocks.N``) → the blocks of mmformer stack ``target``."""
    for i in range(depth):
        t, s = f"{target}.blocks.{i}", f"{source}.resblocks.{i}"
        wm.copy_module(f"{t}.attn.norm", f"{s}.ln_1")
        wm.copy(f"{t}.attn.fn.qkv.weight", f"{s}.attn.in_proj_weight")  # rows q | k | v, as ours
        wm.copy(f"{t}.attn.fn.qkv.bias", f"{s}.attn.in_proj_bias")
        wm.copy_module(f"{t}.attn.fn.proj", f"{s}.attn.out_proj")
        wm.copy_module(f"{t}.mlp.norm", f"{s}.ln_2")
        wm.copy_module(f"{t}.mlp.fn.fc1", f"{s}.mlp.c_fc")
        wm.copy_module(f"{t}.mlp.fn.fc2", f"{s}.mlp.c_proj")


def _processor(config: ModelConfig, preprocess: dict[str, Any] | None):
    image: dict[str, Any] = {}
    if preprocess:  # open_clip's PreprocessCfg attached to model.visual by create_model
        image = {k: tuple(preprocess[k]) for k in ("mean", "std") if k in preprocess}
        if preprocess.get("interpolation") in ("bicubic", "bilinear", "nearest"):
            image["interpolation"] = preprocess["interpolation"]
        mode = preprocess.get("resize_mode", "shortest")
        if mode == "squash":
            image["resize"] = "exact"
        elif mode != "shortest":
            warnings.warn(
                f"open_clip resize_mode={mode!r} has no mmformer equivalent; the processor resizes the shortest "
                "edge and center-crops instead",
                stacklevel=3,
            )
    return clip_processor(config, **image)


def clip_processor(config: ModelConfig, tokenizer: Any = None, **image: Any):
    """CLIP's :class:`~mmformer.Processor` for a converted config: ``tokenizer``, else CLIP's (when the vocabulary is
    CLIP's), and a shortest-edge resize + center crop at the model's image size, bicubic, OpenAI mean/std;
    ``image`` overrides any ``ImageProcessorConfig`` field."""
    from mmformer.preprocess.processor import CLIP_MEAN, CLIP_STD

    settings: dict[str, Any] = dict(
        image_size=tuple(config.image.image_size),
        mean=CLIP_MEAN,
        std=CLIP_STD,
        interpolation="bicubic",
        resize="shortest",
        channels=config.image.channels,
    )
    settings.update(image)
    if tokenizer is None and config.text.vocab_size == CLIP_VOCAB_SIZE:
        from mmformer.preprocess.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.clip(context_length=config.text.max_tokens)
        except (FileNotFoundError, ImportError) as e:
            warnings.warn(f"no CLIP tokenizer attached to the converted model: {e}", stacklevel=3)
    return build_processor(tokenizer, image=settings)
