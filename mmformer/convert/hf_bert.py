"""Hugging Face BERT (``BertModel``, e.g. sentence-transformers' all-MiniLM-L6-v2) → a text-only
:class:`~mmformer.MultimodalTransformer`.

BERT maps onto one post-norm stack (``routes = {"text": "text"}``): word, learned position and segment (token
type) embeddings followed by the embedding LayerNorm (``TextConfig(embed_norm=True, n_segments=type_vocab_size)``);
per layer ``attention.self.{query,key,value}`` → fused ``qkv``, ``attention.output.dense`` → ``proj``,
``attention.output.LayerNorm`` → ``attn.norm`` (applied after the residual add), ``intermediate.dense`` /
``output.dense`` → ``mlp.fn.fc1`` / ``fc2``, ``output.LayerNorm`` → ``mlp.norm``; no final norm. The pooler is not
converted: sentence embeddings are the mean of the last hidden states over real tokens (``text.pool="mean"``, as
sentence-transformers' Pooling module), L2-normalised by ``encode_text(normalize=True)`` (its Normalize module).

``BertForMaskedLM`` (and ``BertForPreTraining``) also bring their masked-LM head: ``cls.predictions.transform``
(dense, activation, LayerNorm) → ``mlm_head.dense`` / ``mlm_head.norm``, ``cls.predictions.bias`` →
``mlm_head.bias``, the decoder tied to the word embeddings (``ModelConfig.mlm_head``; ``model.mlm_logits``). The
tokenizer's ``[MASK]`` becomes ``TextConfig.mask_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    build_processor,
    fuse_qkv,
    read_hf_checkpoint,
    read_hf_tokenizer,
)
from mmformer.model import MultimodalTransformer
from mmformer.weights import build_on_meta

__all__ = ["from_hf_bert"]

# Source keys with no counterpart: the pooler (unused by mean/cls pooling) and index buffers; the MLM decoder's
# weight and bias are tied copies of the word embeddings and of cls.predictions.bias (checked before ignoring them).
_IGNORED = ["pooler.*", "embeddings.position_ids", "embeddings.token_type_ids"]
_MLM = "cls.predictions"
_MLM_TIED = {f"{_MLM}.decoder.weight": "embeddings.word_embeddings.weight", f"{_MLM}.decoder.bias": f"{_MLM}.bias"}
MASK_TOKEN = "[MASK]"


def _read_source(path_or_model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path | None]:
    """(config dict, encoder state dict without a ``bert.`` prefix, directory or None) of a model or a folder."""
    config, state, directory = read_hf_checkpoint(
        path_or_model,
        model_type="bert",
        name="BERT",
        model_class="BertModel",
        folder="save_pretrained output, or a sentence-transformers folder",
    )
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UnsupportedModelError(f"hf_bert: position_embedding_type={position_type!r} (only 'absolute')")
    if any(k.startswith("bert.") for k in state):  # a task model (BertForMaskedLM, ...): the encoder and MLM head
        state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith(("bert.", f"{_MLM}."))}
    for copy, original in _MLM_TIED.items():
        if copy in state and original in state and not torch.equal(state[copy], state[original]):
            raise UnsupportedModelError(f"hf_bert: {copy} differs from {original} (an untied masked-LM decoder)")
    return config, state, directory


def _tokenizer(directory: Path | None, max_positions: int):
    """The directory's tokenizer.json (WordPiece), truncating to sentence-transformers' ``max_seq_length`` when the
    folder is a sentence-transformers model, so long texts are cut where its pipeline cuts them."""
    tokenizer = read_hf_tokenizer(directory)
    if tokenizer is None:
        return None
    st_config = directory / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    max_length = min(max_length or tokenizer.max_length, max_positions)
    if max_length != tokenizer.max_length:
        from mmformer.tokenizer import Tokenizer

        tokenizer = Tokenizer(
            tokenizer.backend,
            max_length=max_length,
            pad_token=tokenizer.pad_token,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
        )
    return tokenizer


def _mask_id(tokenizer: Any) -> int | None:
    return None if tokenizer is None else tokenizer.backend.get_vocab(with_added_tokens=True).get(MASK_TOKEN)


def _model_config(cfg: dict[str, Any], pooling: str, tokenizer: Any, mlm: bool) -> ModelConfig:
    eps = cfg.get("layer_norm_eps", 1e-12)
    stack = StackConfig(
        width=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        mlp=activation_kind(cfg.get("hidden_act", "gelu"), what="hf_bert hidden_act"),
        mlp_hidden=cfg["intermediate_size"],
        norm_eps=eps,
        norm_placement="post",
        final_norm=False,
    )
    text = TextConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg["max_position_embeddings"],
        position="learned",
        pad_id=cfg.get("pad_token_id") or 0,
        bos_id=tokenizer.bos_id if tokenizer is not None else None,  # [CLS]
        eos_id=tokenizer.eos_id if tokenizer is not None else None,  # [SEP]
        mask_id=_mask_id(tokenizer),
        n_segments=cfg.get("type_vocab_size", 2),
        embed_norm=True,
        embed_norm_eps=eps,
        causal=False,
        pool=pooling,
    )
    return ModelConfig(
        stacks={"text": stack},
        routes={"text": "text"},
        image=None,
        audio=None,
        text=text,
        embed_dim=None,
        mlm_head=mlm,
    )


def _map_layers(wm: WeightMap, depth: int) -> None:
    for i in range(depth):
        dst, src = f"stacks.text.blocks.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            qkv = [f"{src}.attention.self.{n}.{kind}" for n in ("query", "key", "value")]
            wm.set(f"{dst}.attn.fn.qkv.{kind}", fuse_qkv(*(wm.get(k) for k in qkv)))
            wm.copy(f"{dst}.attn.fn.proj.{kind}", f"{src}.attention.output.dense.{kind}")
            wm.copy(f"{dst}.attn.norm.{kind}", f"{src}.attention.output.LayerNorm.{kind}")
            wm.copy(f"{dst}.mlp.fn.fc1.{kind}", f"{src}.intermediate.dense.{kind}")
            wm.copy(f"{dst}.mlp.fn.fc2.{kind}", f"{src}.output.dense.{kind}")
            wm.copy(f"{dst}.mlp.norm.{kind}", f"{src}.output.LayerNorm.{kind}")


def from_hf_bert(path_or_model: Any, *, pooling: str = "mean") -> MultimodalTransformer:
    """Convert a Hugging Face BERT encoder exactly (no download).

    Args:
        path_or_model: a ``transformers.BertModel`` instance (a ``BertFor*`` task model contributes its encoder, and
            ``BertForMaskedLM`` / ``BertForPreTraining`` their masked-LM head), or
            a local directory with ``config.json`` and ``model.safetensors`` (or a safe ``.bin``), plus optionally
            ``tokenizer.json`` — a sentence-transformers folder such as all-MiniLM-L6-v2 works as is.
        pooling: sentence embedding from the last hidden states: ``"mean"`` over real tokens (sentence-transformers)
            or ``"cls"`` (the first token, without BERT's pooler layer).

    Returns:
        A text-only model in eval mode: ``encode_text(input_ids, attention_mask)`` gives the pooled embedding
        (L2-normalised unless ``normalize=False``), ``encode_text_tokens`` the last hidden states. ``model.processor``
        holds the directory's tokenizer (None without a ``tokenizer.json``).
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
    cfg, state, directory = _read_source(path_or_model)
    tokenizer = _tokenizer(directory, cfg["max_position_embeddings"])
    mlm = any(k.startswith(f"{_MLM}.") for k in state)
    model = build_on_meta(MultimodalTransformer, _model_config(cfg, pooling, tokenizer, mlm))

    wm = WeightMap(state, name="hf_bert", ignore=_IGNORED + list(_MLM_TIED))
    emb = "embeddings"
    wm.copy("text_embed.tokens.weight", f"{emb}.word_embeddings.weight")
    wm.copy("text_embed.positions.weight", f"{emb}.position_embeddings.weight")
    wm.copy("text_embed.segments.weight", f"{emb}.token_type_embeddings.weight")
    wm.copy("text_embed.norm.weight", f"{emb}.LayerNorm.weight")
    wm.copy("text_embed.norm.bias", f"{emb}.LayerNorm.bias")
    _map_layers(wm, cfg["num_hidden_layers"])
    if mlm:
        wm.copy_module("mlm_head.dense", f"{_MLM}.transform.dense")
        wm.copy_module("mlm_head.norm", f"{_MLM}.transform.LayerNorm")
        wm.copy("mlm_head.bias", f"{_MLM}.bias")
    wm.initialise("logit_scale")  # mmformer-only, unused by a text tower
    wm.load_into(model)
    model.processor = build_processor(tokenizer)
    return model.eval()
