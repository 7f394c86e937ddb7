"""Hugging Face ``transformers.SiglipModel`` → :class:`~mmformer.MultimodalTransformer` (separate vision and text
stacks, as :mod:`mmformer.convert.hf_clip`).

SigLIP differs from CLIP in four places, each a config knob here rather than a new class:

- the image tower has no class token and pools with an attention-pooling head (``vision_model.head``: a learned
  probe reads the tokens through ``nn.MultiheadAttention``, then ``x + mlp(layernorm(x))``) →
  ``ImageConfig(class_token=False, pool="map")``; its output is the image embedding (``projections["image"] =
  "none"``);
- the text tower is bidirectional, trained on text padded to its full length (64) without a mask, and pools the
  last position (padding) through ``text_model.head`` (a linear layer with bias) →
  ``TextConfig(fixed_length=True, attend_padding=True, pool="last")``; the model pads ids itself, so ids padded to
  the longest text (and their mask) give SigLIP's embeddings exactly;
- the scores are ``logit_scale.exp() * cos + logit_bias`` read through a sigmoid: zero-shot probabilities are
  independent per class (:class:`~mmformer.ZeroShotClassifier` uses the sigmoid when the model has a logit bias);
- images are resized to the model's size without a crop, normalised with mean = std = 0.5.

Accepts a ``SiglipModel`` instance or a local ``save_pretrained`` directory; nothing is downloaded
(:func:`mmformer.from_pretrained` resolves Hub ids such as ``google/siglip-base-patch16-224``). The text tokenizer is
the directory's ``tokenizer.json`` when it has one (SigLIP's sentencepiece tokenizer is otherwise not attached).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mmformer.config import ImageConfig, ModelConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    build_processor,
    id_in_vocab,
    map_cross_attention,
    read_hf_checkpoint,
)
from mmformer.convert.hf_clip import image_settings, map_layers, read_image_processor, stack_config
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.convert.sentence_pipeline import hf_max_length
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_siglip"]

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def from_hf_siglip(path_or_model: str | os.PathLike | nn.Module) -> MultimodalTransformer:
    """Convert a Hugging Face ``SiglipModel`` (an instance, or a local ``save_pretrained`` directory) exactly.

    Returns:
        The converted model in eval mode, with ``model.processor`` set: the directory's image pipeline
        (:func:`~mmformer.convert.hf_clip.read_image_processor`; default: SigLIP's exact resize, bicubic,
        mean = std = 0.5) and its ``tokenizer.json`` if any.
    """
    cfg, state, directory = read_hf_checkpoint(
        path_or_model, model_type="siglip", name="SigLIP", model_class="SiglipModel"
    )
    from transformers import SiglipConfig

    hf_config = SiglipConfig(**cfg)  # fills what save_pretrained leaves out
    if not getattr(hf_config.vision_config, "vision_use_head", True):
        raise UnsupportedModelError("hf_siglip: vision_use_head=False (no attention-pooling head, no image embedding)")
    config = _model_config(hf_config, state)
    model = build_on_meta(MultimodalTransformer, config)
    _weight_map(state, config).load_into(model)
    model.eval()
    pre = read_image_processor(directory, default="SigLIP's image pipeline")
    image: dict[str, Any] = dict(
        image_size=tuple(config.image.image_size), mean=SIGLIP_MEAN, std=SIGLIP_STD, interpolation="bicubic"
    )
    image.update(resize="exact", channels=config.image.channels)
    image.update(image_settings(pre) if pre else {})
    model.processor = build_processor(_tokenizer(directory, config.text.max_length), image=image)
    return model


def _tokenizer(directory: Any, max_positions: int) -> Any:
    """The folder's tokenizer (padding with the token its tokenizer_config.json names: SigLIP attends to padding),
    cutting texts where its config says, and at the latest where the position table ends."""
    tokenizer = read_hf_tokenizer(directory)
    if tokenizer is None:
        return None
    return tokenizer.replace(max_length=hf_max_length(directory, max_positions) or max_positions)


def _model_config(hf_config: Any, state: dict[str, torch.Tensor]) -> ModelConfig:
    tcfg, vcfg = hf_config.text_config, hf_config.vision_config
    size, patch = vcfg.image_size, vcfg.patch_size
    if not isinstance(patch, int):
        raise UnsupportedModelError(f"hf_siglip: non-square patches {patch} are not supported")
    vocab = tcfg.vocab_size
    text = TextConfig(
        vocab_size=vocab,
        max_length=tcfg.max_position_embeddings,
        position="learned",
        pad_id=id_in_vocab(tcfg.pad_token_id, vocab) or 0,
        bos_id=id_in_vocab(tcfg.bos_token_id, vocab),
        eos_id=id_in_vocab(tcfg.eos_token_id, vocab),
        causal=False,
        pool="last",
        fixed_length=True,
        attend_padding=True,
    )
    embed_dim = getattr(tcfg, "projection_size", None) or tcfg.hidden_size
    scale, bias = state.get("logit_scale"), state.get("logit_bias")
    return ModelConfig(
        stacks={"vision": stack_config(vcfg, "vision_config"), "text": stack_config(tcfg, "text_config")},
        routes={"image": "vision", "text": "text"},
        image=ImageConfig(
            image_size=[size, size] if isinstance(size, int) else list(size),
            patch_size=patch,
            channels=vcfg.num_channels,
            class_token=False,
            patch_bias=True,
            pool="map",
        ),
        audio=None,
        text=text,
        embed_dim=embed_dim,
        projection_bias=True,  # the text head; the image tower has no projection
        projections={"image": "none"},
        logit_scale_init=float(scale.reshape(-1)[0]) if scale is not None else 0.0,
        logit_bias_init=float(bias.reshape(-1)[0]) if bias is not None else 0.0,
    )


def _weight_map(state: dict[str, torch.Tensor], config: ModelConfig) -> WeightMap:
    wm = WeightMap(state, name="hf_siglip", ignore=["*.position_ids"])
    v, t = "vision_model", "text_model"
    wm.copy_module("image_embed.patch", f"{v}.embeddings.patch_embedding")
    wm.copy("image_embed.positions", f"{v}.embeddings.position_embedding.weight")
    map_layers(wm, "stacks.vision", f"{v}.encoder", config.stacks["vision"].depth)
    wm.copy_module("stacks.vision.norm", f"{v}.post_layernorm")
    wm.copy("image_pool.queries", f"{v}.head.probe", lambda p: p.reshape(-1, p.shape[-1]))  # (1, 1, D) → (1, D)
    map_cross_attention(wm, "image_pool", f"{v}.head.attention")
    wm.copy_module("image_pool.mlp_norm", f"{v}.head.layernorm")
    wm.copy_module("image_pool.mlp.fc1", f"{v}.head.mlp.fc1")
    wm.copy_module("image_pool.mlp.fc2", f"{v}.head.mlp.fc2")
    wm.copy("text_embed.tokens.weight", f"{t}.embeddings.token_embedding.weight")
    wm.copy("text_embed.positions.weight", f"{t}.embeddings.position_embedding.weight")
    map_layers(wm, "stacks.text", f"{t}.encoder", config.stacks["text"].depth)
    wm.copy_module("stacks.text.norm", f"{t}.final_layer_norm")
    wm.copy_module("text_proj", f"{t}.head")
    wm.copy("logit_scale", "logit_scale", lambda x: x.reshape(()))
    wm.copy("logit_bias", "logit_bias", lambda x: x.reshape(()))
    return wm
