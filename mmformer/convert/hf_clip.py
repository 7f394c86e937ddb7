"""Hugging Face ``transformers.CLIPModel`` → :class:`~mmformer.MultimodalTransformer` (separate vision and text
stacks, as :mod:`mmformer.convert.open_clip`).

Accepts a ``CLIPModel`` instance or a local directory saved by ``save_pretrained`` (``config.json`` plus
``model.safetensors`` or ``pytorch_model.bin``, read safely; nothing is downloaded). Every standard CLIP checkpoint
maps exactly: pre-norm blocks with separate q/k/v projections (fused here), ``pre_layrnorm``, class-token pooling
after ``post_layernorm``, a causal text tower pooled at the end-of-text token, bias-free projections.

Text pooling follows ``CLIPTextTransformer.forward``: a config with ``eos_token_id == 2`` (checkpoints older than
transformers PR #24773) pools at the argmax of the ids, i.e. CLIP's end-of-text token, the vocabulary's last id;
any other ``eos_token_id`` pools at its first occurrence. mmformer pools at the first ``text.eos_id``, so the first
case becomes ``eos_id = vocab_size - 1``; both agree whenever a row holds its end-of-text token.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    id_in_vocab,
    read_hf_checkpoint,
)
from mmformer.convert.open_clip import clip_processor
from mmformer.convert.open_clip_config import CLIP_VOCAB_SIZE
from mmformer.io.hub import read_json
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_clip"]

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def from_hf_clip(path_or_model: str | os.PathLike | nn.Module) -> MultimodalTransformer:
    """Convert a Hugging Face ``CLIPModel`` (an instance, or a local ``save_pretrained`` directory).

    Returns:
        The converted model in eval mode with ``model.processor`` set: CLIP's tokenizer when the vocabulary is
        CLIP's, and the directory's image pipeline (:func:`read_image_processor`; without one, or for an instance:
        OpenAI's mean/std, bicubic shortest-edge resize + center crop at the vision config's image size).
    """
    if isinstance(path_or_model, nn.Module):
        for attr in ("vision_model", "text_model", "visual_projection", "text_projection", "config"):
            if not hasattr(path_or_model, attr):
                raise TypeError(
                    f"path_or_model: expected a transformers CLIPModel (with `{attr}`), got "
                    f"{type(path_or_model).__name__}"
                )
    cfg, state, directory = read_hf_checkpoint(path_or_model, model_type="clip", name="CLIP", model_class="CLIPModel")
    from transformers import CLIPConfig

    hf_config = CLIPConfig(**cfg)  # fills what save_pretrained leaves out (values equal to the defaults)
    preprocessor = read_image_processor(directory, default="OpenAI CLIP's image pipeline")
    config = _model_config(hf_config, state)
    model = build_on_meta(MultimodalTransformer, config)
    _weight_map(state, config).load_into(model)
    model.eval()
    model.processor = _processor(config, preprocessor)
    return model


def stack_config(cfg: Any, what: str) -> StackConfig:
    """The StackConfig of a CLIP-style (also SigLIP) vision or text config."""
    return StackConfig(
        width=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        mlp=activation_kind(cfg.hidden_act, what=f"hf_clip {what}.hidden_act"),
        mlp_hidden=cfg.intermediate_size,
        norm_eps=float(cfg.layer_norm_eps),
    )


def _model_config(hf_config: Any, state: dict[str, torch.Tensor]) -> ModelConfig:
    tcfg, vcfg = hf_config.text_config, hf_config.vision_config
    size = vcfg.image_size
    image_size = [size, size] if isinstance(size, int) else list(size)
    patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else tuple(vcfg.patch_size)
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise UnsupportedModelError(f"hf_clip: non-square patches {patch} are not supported")
        patch = patch[0]
    vocab = tcfg.vocab_size
    eos = tcfg.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise UnsupportedModelError(f"hf_clip: several eos_token_id values {list(eos)} are not supported")
        eos = eos[0]
    if eos == 2:
        eos = vocab - 1  # legacy configs: argmax of the ids = CLIP's end-of-text token, the last id
    if eos is None or not 0 <= eos < vocab:
        raise ValueError(
            f"path_or_model: text_config.eos_token_id must be a token id in [0, {vocab}) to pool the text, got {eos}"
        )
    text = TextConfig(
        vocab_size=vocab,
        max_length=tcfg.max_position_embeddings,
        position="learned",
        pad_id=id_in_vocab(tcfg.pad_token_id, vocab) or 0,
        bos_id=id_in_vocab(tcfg.bos_token_id, vocab),
        eos_id=eos,
        causal=True,
        pool="eot",
    )
    scale = state.get("logit_scale")
    return ModelConfig(
        stacks={"vision": stack_config(vcfg, "vision_config"), "text": stack_config(tcfg, "text_config")},
        routes={"image": "vision", "text": "text"},
        image=ImageConfig(
            image_size=image_size, patch_size=patch, channels=vcfg.num_channels, patch_bias=False, pre_norm=True
        ),
        audio=None,
        text=text,
        embed_dim=hf_config.projection_dim,
        projection_bias=False,
        logit_scale_init=float(scale) if scale is not None else float(hf_config.logit_scale_init_value),
    )


def _weight_map(state: dict[str, torch.Tensor], config: ModelConfig) -> WeightMap:
    wm = WeightMap(state, name="hf_clip", ignore=["*.position_ids"])
    v, t = "vision_model", "text_model"
    wm.copy("image_embed.patch.weight", f"{v}.embeddings.patch_embedding.weight")
    wm.copy("image_embed.cls_token", f"{v}.embeddings.class_embedding")
    wm.copy("image_embed.positions", f"{v}.embeddings.position_embedding.weight")
    wm.copy_module("image_embed.norm", f"{v}.pre_layrnorm")
    map_layers(wm, "stacks.vision", f"{v}.encoder", config.stacks["vision"].depth)
    wm.copy_module("stacks.vision.norm", f"{v}.post_layernorm")
    wm.copy("image_proj.weight", "visual_projection.weight")
    wm.copy("text_embed.tokens.weight", f"{t}.embeddings.token_embedding.weight")
    wm.copy("text_embed.positions.weight", f"{t}.embeddings.position_embedding.weight")
    map_layers(wm, "stacks.text", f"{t}.encoder", config.stacks["text"].depth)
    wm.copy_module("stacks.text.norm", f"{t}.final_layer_norm")
    wm.copy("text_proj.weight", "text_projection.weight")
    wm.copy("logit_scale", "logit_scale", lambda x: x.reshape(()))
    return wm


def map_layers(wm: WeightMap, target: str, source: str, depth: int) -> None:
    """CLIP-style encoder layers ``{source}.layers.N`` (also SigLIP's) → the blocks of mmformer stack ``target``."""
    for i in range(depth):
        t, s = f"{target}.blocks.{i}", f"{source}.layers.{i}"
        wm.copy_module(f"{t}.attn.norm", f"{s}.layer_norm1")
        for kind in ("weight", "bias"):
            wm.fuse(f"{t}.attn.fn.qkv.{kind}", [f"{s}.self_attn.{n}_proj.{kind}" for n in "qkv"])
        wm.copy_module(f"{t}.attn.fn.proj", f"{s}.self_attn.out_proj")
        wm.copy_module(f"{t}.mlp.norm", f"{s}.layer_norm2")
        wm.copy_module(f"{t}.mlp.fn.fc1", f"{s}.mlp.fc1")
        wm.copy_module(f"{t}.mlp.fn.fc2", f"{s}.mlp.fc2")


def read_image_processor(directory: Path | None, *, default: str) -> dict[str, Any]:
    """The image processor settings saved in a Hugging Face folder (CLIP's, SigLIP's): ``preprocessor_config.json``,
    or where it is absent ``processor_config.json``'s ``image_processor`` (transformers 5 saves a processor's parts
    there, in one file). {} for a model instance; a folder with neither warns, naming it, that the processor
    falls back to ``default``."""
    if directory is None:
        return {}
    settings = read_json(directory / "preprocessor_config.json")
    if settings is None:
        processor = read_json(directory / "processor_config.json")
        settings = processor.get("image_processor") if isinstance(processor, dict) else None
    if settings is None:
        warnings.warn(
            f"{directory}: no image processor settings (preprocessor_config.json, or processor_config.json with an "
            f"'image_processor'); the processor falls back to {default}",
            stacklevel=3,
        )
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{directory}: expected the image processor settings as a JSON object, got {settings!r}")
    return settings


def image_settings(pre: dict[str, Any]) -> dict[str, Any]:
    """``ImageProcessorConfig`` fields from a Hugging Face image processor's preprocessor_config.json (CLIP's and
    SigLIP's): mean/std, resampling, and a shortest-edge resize then a center crop (offset rounded down, as theirs),
    or an exact resize."""
    names = {"mean": "image_mean", "std": "image_std"}
    image: dict[str, Any] = {ours: tuple(pre[theirs]) for ours, theirs in names.items() if theirs in pre}
    image["interpolation"] = _PIL_RESAMPLE.get(pre.get("resample", 3), "bicubic")
    crop, size = pre.get("crop_size"), pre.get("size")
    if pre.get("do_center_crop", True) and crop is not None:
        image["image_size"] = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        image["crop_offset"] = "floor"
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size if isinstance(size, int) else None
        if pre.get("do_resize", True) and shortest is not None:
            image["resize_size"] = shortest
    elif isinstance(size, dict) and {"height", "width"} <= set(size):
        image["image_size"], image["resize"] = (size["height"], size["width"]), "exact"
    return image


def _processor(config: ModelConfig, pre: dict[str, Any]):
    """CLIP's processor with Hugging Face's text cleaning (its CLIPTokenizer does not unescape HTML as open_clip
    does) and the image pipeline of ``pre``, a CLIPImageProcessor's settings."""
    tokenizer = None
    if config.text.vocab_size == CLIP_VOCAB_SIZE:
        from mmformer.preprocess.tokenizer import Tokenizer

        with contextlib.suppress(FileNotFoundError, ImportError):  # clip_processor warns that none is attached
            tokenizer = Tokenizer.clip(context_length=config.text.max_tokens, cleaning="hf")
    return clip_processor(config, tokenizer, **(image_settings(pre) if pre else {}))
