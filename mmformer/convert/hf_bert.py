"""Hugging Face BERT (``BertModel``, e.g. sentence-transformers' all-MiniLM-L6-v2) and RoBERTa / XLM-RoBERTa
(``RobertaModel``, ``XLMRobertaModel``) → a text-only :class:`~mmformer.MultimodalTransformer`.

RoBERTa is BERT with positions counted from ``pad_token_id + 1`` (row ``padding_idx`` of its table is never used by
a real token of right-padded text): the table is loaded without its first ``pad_token_id + 1`` rows, so real token
i reads row i as in BERT — exact for right-padded text, mmformer's layout.

BERT maps onto one post-norm stack (``routes = {"text": "text"}``): word, learned position and segment (token
type) embeddings followed by the embedding LayerNorm (``TextConfig(embed_norm=True, n_segments=type_vocab_size)``);
per layer ``attention.self.{query,key,value}`` → fused ``qkv``, ``attention.output.dense`` → ``proj``,
``attention.output.LayerNorm`` → ``attn.norm`` (applied after the residual add), ``intermediate.dense`` /
``output.dense`` → ``mlp.fn.fc1`` / ``fc2``, ``output.LayerNorm`` → ``mlp.norm``; no final norm. The pooler is not
converted: sentence embeddings pool the last hidden states as a sentence-transformers folder's Pooling module says
(mean over real tokens or the first token, ``text.pool``; see :mod:`mmformer.convert.sentence_pipeline`, which refuses
the modules and modes it cannot reproduce), L2-normalised by ``encode_text(normalize=True)`` (its Normalize module).

``BertForMaskedLM`` / ``BertForPreTraining`` (and ``RobertaForMaskedLM``) also bring their masked-LM head:
``cls.predictions.transform`` (dense, activation, LayerNorm; RoBERTa's ``lm_head.dense`` / ``layer_norm``) →
``mlm_head.dense`` / ``mlm_head.norm``, ``cls.predictions.bias`` → ``mlm_head.bias``, the decoder tied to the word
embeddings (``ModelConfig.mlm_head``; ``model.mlm_logits``). The tokenizer's ``[MASK]`` (``<mask>``) becomes
``TextConfig.mask_id``.
"""

from __future__ import annotations

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
)
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.convert.sentence_pipeline import hf_max_length, read_pooling
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["BERT_FAMILY", "bert_configs", "from_hf_bert", "map_bert_encoder"]

# Source keys with no counterpart: the pooler (unused by mean/cls pooling) and index buffers; the MLM decoder's
# weight and bias are tied copies of the word embeddings and of cls.predictions.bias (checked before ignoring them).
_IGNORED = ["pooler.*", "embeddings.position_ids", "embeddings.token_type_ids"]
BERT_FAMILY = ("bert", "roberta", "xlm-roberta")  # model_type values with BERT's layout
_TASK_PREFIXES = ("bert.", "roberta.")  # BertForMaskedLM, RobertaForMaskedLM, ...: the encoder's keys
# masked-LM heads: prefix → (dense, norm) module names under it (BERT's cls.predictions, RoBERTa's lm_head)
_MLM_HEADS = {"cls.predictions": ("transform.dense", "transform.LayerNorm"), "lm_head": ("dense", "layer_norm")}
MASK_TOKENS = ("[MASK]", "<mask>")


def position_offset(cfg: dict[str, Any]) -> int:
    """Rows of the position table before the first real token's: ``pad_token_id + 1`` for RoBERTa, else 0."""
    return (cfg.get("pad_token_id") or 0) + 1 if cfg.get("model_type") in ("roberta", "xlm-roberta") else 0


def _read_source(path_or_model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path | None]:
    """(config dict, encoder state dict without a ``bert.`` prefix, directory or None) of a model or a folder."""
    config, state, directory = read_hf_checkpoint(
        path_or_model,
        model_type=BERT_FAMILY,
        name="BERT",
        model_class="BertModel / RobertaModel",
        folder="save_pretrained output, or a sentence-transformers folder",
    )
    check_bert_config(config)
    heads = tuple(f"{head}." for head in _MLM_HEADS)
    for prefix in _TASK_PREFIXES:
        if any(k.startswith(prefix) for k in state):  # a task model (BertForMaskedLM, ...): the encoder, MLM head
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith((prefix, *heads))}
    for copy, original in _mlm_tied(_mlm_head(state)).items():
        if copy in state and original in state and not torch.equal(state[copy], state[original]):
            raise UnsupportedModelError(f"hf_bert: {copy} differs from {original} (an untied masked-LM decoder)")
    return config, state, directory


def _mlm_head(state: dict[str, torch.Tensor]) -> str | None:
    """The prefix of the state's masked-LM head (``cls.predictions`` or ``lm_head``), or None."""
    return next((head for head in _MLM_HEADS if f"{head}.bias" in state), None)


def _mlm_tied(head: str | None) -> dict[str, str]:
    """The masked-LM decoder's keys → the keys they are tied copies of (checked, then ignored)."""
    if head is None:
        return {}
    return {f"{head}.decoder.weight": "embeddings.word_embeddings.weight", f"{head}.decoder.bias": f"{head}.bias"}


def check_bert_config(config: dict[str, Any]) -> None:
    """Refuse what a BERT-style encoder config may hold that mmformer does not reproduce."""
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UnsupportedModelError(f"hf_bert: position_embedding_type={position_type!r} (only 'absolute')")


def _tokenizer(directory: Path | None, max_positions: int):
    """The directory's tokenizer.json (WordPiece), truncating where sentence-transformers or the tokenizer config
    cut texts (:func:`~mmformer.convert.sentence_pipeline.hf_max_length`), else at the position table."""
    tokenizer = read_hf_tokenizer(directory)
    if tokenizer is None:
        return None
    max_length = hf_max_length(directory, max_positions) or min(tokenizer.max_length, max_positions)
    return tokenizer.replace(max_length=max_length)


def _mask_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's mask token ([MASK] / <mask>), None without one."""
    vocab = {} if tokenizer is None else tokenizer.backend.get_vocab(with_added_tokens=True)
    return next((vocab[t] for t in MASK_TOKENS if t in vocab), None)


def _model_config(cfg: dict[str, Any], pooling: str, tokenizer: Any, mlm: bool) -> ModelConfig:
    stack, text = bert_configs(
        cfg,
        pooling,
        bos_id=tokenizer.bos_id if tokenizer is not None else None,  # [CLS] / <s>
        eos_id=tokenizer.eos_id if tokenizer is not None else None,  # [SEP] / </s>
    )
    text.mask_id = _mask_id(tokenizer)
    return ModelConfig(
        stacks={"text": stack},
        routes={"text": "text"},
        image=None,
        audio=None,
        text=text,
        embed_dim=None,
        mlm_head=mlm,
    )


def bert_configs(
    cfg: dict[str, Any], pooling: str, *, bos_id: int | None = None, eos_id: int | None = None
) -> tuple[StackConfig, TextConfig]:
    """The post-norm text stack and the text config (segments, embedding norm) of a BERT-style config dict."""
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
        max_length=cfg["max_position_embeddings"] - position_offset(cfg),
        position="learned",
        pad_id=cfg.get("pad_token_id") or 0,
        bos_id=bos_id,
        eos_id=eos_id,
        n_segments=cfg.get("type_vocab_size", 2),
        embed_norm=True,
        embed_norm_eps=eps,
        causal=False,
        pool=pooling,
    )
    return stack, text


def map_bert_encoder(wm: WeightMap, cfg: dict[str, Any], source: str = "", target: str = "stacks.text") -> None:
    """A BERT-style encoder's embeddings and layers (keys ``{source}embeddings.*``, ``{source}encoder.layer.N.*``) →
    ``text_embed`` and the mmformer stack ``target``."""
    emb = f"{source}embeddings"
    offset = position_offset(cfg)
    wm.copy("text_embed.tokens.weight", f"{emb}.word_embeddings.weight")
    wm.copy("text_embed.positions.weight", f"{emb}.position_embeddings.weight", lambda t: t[offset:])
    wm.copy("text_embed.segments.weight", f"{emb}.token_type_embeddings.weight")
    wm.copy("text_embed.norm.weight", f"{emb}.LayerNorm.weight")
    wm.copy("text_embed.norm.bias", f"{emb}.LayerNorm.bias")
    _map_layers(wm, cfg["num_hidden_layers"], f"{source}encoder.layer", target)


def _map_layers(wm: WeightMap, depth: int, source: str = "encoder.layer", target: str = "stacks.text") -> None:
    for i in range(depth):
        dst, src = f"{target}.blocks.{i}", f"{source}.{i}"
        for kind in ("weight", "bias"):
            qkv = [f"{src}.attention.self.{n}.{kind}" for n in ("query", "key", "value")]
            wm.set(f"{dst}.attn.fn.qkv.{kind}", fuse_qkv(*(wm.get(k) for k in qkv)))
            wm.copy(f"{dst}.attn.fn.proj.{kind}", f"{src}.attention.output.dense.{kind}")
            wm.copy(f"{dst}.attn.norm.{kind}", f"{src}.attention.output.LayerNorm.{kind}")
            wm.copy(f"{dst}.mlp.fn.fc1.{kind}", f"{src}.intermediate.dense.{kind}")
            wm.copy(f"{dst}.mlp.fn.fc2.{kind}", f"{src}.output.dense.{kind}")
            wm.copy(f"{dst}.mlp.norm.{kind}", f"{src}.output.LayerNorm.{kind}")


def from_hf_bert(path_or_model: Any, *, pooling: str | None = None) -> MultimodalTransformer:
    """Convert a Hugging Face BERT encoder exactly (no download).

    Args:
        path_or_model: a ``transformers.BertModel`` instance (a ``BertFor*`` task model contributes its encoder, and
            ``BertForMaskedLM`` / ``BertForPreTraining`` their masked-LM head), or
            a local directory with ``config.json`` and ``model.safetensors`` (or a safe ``.bin``), plus optionally its
            tokenizer (``tokenizer.json``, or ``vocab.txt``) — a sentence-transformers folder such as all-MiniLM-L6-v2
            works as is.
        pooling: sentence embedding from the last hidden states: ``"mean"`` over real tokens or ``"cls"`` (the
            first token, without BERT's pooler layer); default: a sentence-transformers folder's Pooling module
            (``modules.json``, ``1_Pooling/config.json``), else mean.

    Returns:
        A text-only model in eval mode: ``encode_text(input_ids, attention_mask)`` gives the pooled embedding
        (L2-normalised unless ``normalize=False``), ``encode_text_tokens`` the last hidden states. ``model.processor``
        holds the directory's tokenizer (None without tokenizer files).
    """
    if pooling not in (None, "mean", "cls"):
        raise ValueError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
    cfg, state, directory = _read_source(path_or_model)
    folder_pooling = read_pooling(directory)  # refuses a pipeline (Dense, max pooling, ...) it cannot reproduce
    pooling = pooling or folder_pooling or "mean"
    tokenizer = _tokenizer(directory, cfg["max_position_embeddings"])
    head = _mlm_head(state)
    model = build_on_meta(MultimodalTransformer, _model_config(cfg, pooling, tokenizer, head is not None))

    wm = WeightMap(state, name="hf_bert", ignore=_IGNORED + list(_mlm_tied(head)))
    map_bert_encoder(wm, cfg)
    if head is not None:
        dense, norm = _MLM_HEADS[head]
        wm.copy_module("mlm_head.dense", f"{head}.{dense}")
        wm.copy_module("mlm_head.norm", f"{head}.{norm}")
        wm.copy("mlm_head.bias", f"{head}.bias")
    wm.initialise("logit_scale")  # mmformer-only, unused by a text tower
    wm.load_into(model)
    model.processor = build_processor(tokenizer)
    return model.eval()
