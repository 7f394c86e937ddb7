"""openai-whisper's own checkpoints (``whisper.load_model``'s ``.pt`` files) → :class:`~mmformer.MultimodalTransformer`.

A checkpoint is ``{"dims": ModelDimensions as a dict, "model_state_dict": ...}``, read here with
``torch.load(weights_only=True)``. Its tensors are renamed to Hugging Face's Whisper names (as transformers'
``convert_openai_to_hf.py`` renames them) and built by :func:`mmformer.convert.hf_whisper.whisper_model`, so both
sources give the same model. The tokenizer is the tiktoken vocabulary that the ``openai-whisper`` package ships
(``whisper/assets/multilingual.tiktoken`` or ``gpt2.tiktoken``), converted to a ``tokenizers`` byte-level BPE by
transformers' ``TikTokenConverter``, with Whisper's special and timestamp tokens at their ids.

Names: ``from_openai_whisper("tiny")`` reads openai-whisper's download cache, ``$XDG_CACHE_HOME/whisper/tiny.pt``
(``~/.cache/whisper`` without it), as ``whisper.load_model`` does; nothing is downloaded. The alignment heads of a
named model come from openai-whisper's table (``whisper._ALIGNMENT_HEADS``); other checkpoints get openai's
default, every head of the decoder's second half.
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
import torch

from mmformer.config import GenerationConfig
from mmformer.convert.common import UnsupportedModelError
from mmformer.convert.hf_whisper import whisper_model
from mmformer.convert.whisper_vocab import WhisperTokens
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.tokenizer import Tokenizer

__all__ = ["checkpoint_path", "from_openai_whisper", "openai_tokenizer"]

PREFIX = "whisper:"
_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_vocab", "n_text_ctx",
         "n_text_state", "n_text_head", "n_text_layer")  # fmt: skip
# openai-whisper's pre-tokenizer pattern (whisper/tokenizer.py, get_encoding)
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
# openai names → Hugging Face names, applied in order to each key (transformers' convert_openai_to_hf.py)
_RENAMES = (
    (r"\.blocks\.", ".layers."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
    (r"\.mlp\.0\.", ".fc1."),
    (r"\.mlp\.2\.", ".fc2."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.attn\.", ".self_attn."),
    (r"\.query\.", ".q_proj."),
    (r"\.key\.", ".k_proj."),
    (r"\.value\.", ".v_proj."),
    (r"\.out\.", ".out_proj."),
    (r"^encoder\.ln_post\.", "encoder.layer_norm."),
    (r"^decoder\.ln\.", "decoder.layer_norm."),
    (r"^encoder\.positional_embedding$", "encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", "decoder.embed_positions.weight"),
    (r"^decoder\.token_embedding\.", "decoder.embed_tokens."),
)


def _whisper_package() -> Path:
    """The installed ``openai-whisper`` package's folder (its assets), without importing it."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "openai-whisper checkpoints need the openai-whisper package for its tokenizer vocabulary: "
            "pip install openai-whisper"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_name(text: str) -> str | None:
    """The model name in ``whisper:NAME`` or a bare ``NAME``; None for a path."""
    if text.startswith(PREFIX):
        return text.removeprefix(PREFIX)
    return None if os.sep in text or text.endswith(".pt") or os.path.exists(text) else text


def checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    """A ``.pt`` path as given, or ``NAME`` / ``whisper:NAME`` → openai-whisper's download cache
    ``$XDG_CACHE_HOME/whisper/NAME.pt`` (default ``~/.cache/whisper``), read when called."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"path_or_name: expected a .pt path or a model name, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    name = _cache_name(text)
    if name is None:
        path = Path(text).expanduser()
    else:
        root = Path(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))) / "whisper"
        path = root / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"path_or_name: no openai-whisper checkpoint at {os.fspath(path)!r} (from {text!r}); nothing is "
            "downloaded here — whisper.load_model(NAME) fills that cache"
        )
    return path


def _read(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(dims, state dict) of a ``.pt`` checkpoint, read safely."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"path_or_name: {os.fspath(path)!r} is not an openai-whisper checkpoint (expected the keys 'dims' and "
            f"'model_state_dict'), got {keys}"
        )
    dims = dict(checkpoint["dims"])
    missing = [k for k in _DIMS if k not in dims]
    if missing:
        raise ValueError(f"path_or_name: {os.fspath(path)!r} has dims without {missing}")
    return dims, checkpoint["model_state_dict"]


def _hf_name(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _hf_config(dims: dict[str, int], tokenizer: Tokenizer) -> dict[str, Any]:
    """The Hugging Face ``config.json`` fields :func:`whisper_model` reads, from openai's ``ModelDimensions``."""
    if dims["n_audio_state"] != dims["n_text_state"]:
        raise UnsupportedModelError(
            f"openai_whisper: n_audio_state ({dims['n_audio_state']}) != n_text_state ({dims['n_text_state']})"
        )
    eot = tokenizer.backend.token_to_id("<|endoftext|>")
    return {
        "d_model": dims["n_audio_state"],
        "encoder_layers": dims["n_audio_layer"],
        "encoder_attention_heads": dims["n_audio_head"],
        "encoder_ffn_dim": 4 * dims["n_audio_state"],
        "decoder_layers": dims["n_text_layer"],
        "decoder_attention_heads": dims["n_text_head"],
        "decoder_ffn_dim": 4 * dims["n_text_state"],
        "num_mel_bins": dims["n_mels"],
        "max_source_positions": dims["n_audio_ctx"],
        "max_target_positions": dims["n_text_ctx"],
        "vocab_size": dims["n_vocab"],
        "activation_function": "gelu",
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": tokenizer.backend.token_to_id("<|startoftranscript|>"),
    }


def _languages(n_vocab: int) -> tuple[bool, int]:
    """(multilingual, number of language tokens) of a vocabulary size, as ``whisper.model.Whisper`` decides."""
    multilingual = n_vocab >= 51865
    return multilingual, n_vocab - 51765 - int(multilingual)


def special_tokens(n_vocab: int) -> list[str]:
    """openai-whisper's special tokens in id order, after the BPE vocabulary (``whisper.tokenizer.get_encoding``)."""
    _, n_languages = _languages(n_vocab)
    codes = list(_literal("tokenizer.py", "LANGUAGES"))
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in codes[:n_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(_N_TIMESTAMPS)],
    ]


def openai_tokenizer(n_vocab: int = 51865, max_length: int = 448) -> Tokenizer:
    """openai-whisper's tokenizer for a model of ``n_vocab`` tokens as a
    :class:`~mmformer.preprocess.tokenizer.Tokenizer`: the
    same id for every text and every special token. No bos/eos are added around a text (Whisper's prompt is built
    by the decoder); ``<|endoftext|>`` pads."""
    backend = tokenizers.Tokenizer.from_str(_converted_vocabulary(n_vocab))
    return Tokenizer(backend, max_length=max_length, pad_token="<|endoftext|>", bos_token=None, eos_token=None)


@lru_cache(maxsize=2)
def _converted_vocabulary(n_vocab: int) -> str:
    """The shipped tiktoken vocabulary with Whisper's special tokens as a tokenizer.json string (converted once per
    process: it takes seconds)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    multilingual, _ = _languages(n_vocab)
    vocabulary = _whisper_package() / "assets" / ("multilingual.tiktoken" if multilingual else "gpt2.tiktoken")
    specials = special_tokens(n_vocab)
    backend = TikTokenConverter(str(vocabulary), pattern=_PATTERN, extra_special_tokens=specials).converted()
    backend.post_processor = None
    if backend.get_vocab_size(with_added_tokens=True) != n_vocab:
        raise UnsupportedModelError(
            f"openai_whisper: the model has n_vocab={n_vocab}, openai-whisper's vocabulary with its special tokens "
            f"{backend.get_vocab_size(with_added_tokens=True)}"
        )
    return backend.to_str()


def _alignment_heads(name: str, n_layers: int, n_heads: int) -> list[list[int]]:
    """[layer, head] pairs: openai-whisper's table for a model it names, else every head of the second half."""
    import base64
    import gzip

    import numpy as np

    table = _literal("__init__.py", "_ALIGNMENT_HEADS")
    if name in table:  # whisper.model.Whisper.set_alignment_heads
        mask = np.frombuffer(gzip.decompress(base64.b85decode(table[name])), dtype=bool)
        if mask.size == n_layers * n_heads:  # a file saved under a released name with other dimensions: the default
            mask = mask.reshape(n_layers, n_heads)
            return [[int(layer), int(head)] for layer, head in zip(*np.nonzero(mask))]
    return [[layer, head] for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]


def _literal(module: str, name: str) -> Any:
    """A literal assigned at the top of one of the openai-whisper package's modules (``_ALIGNMENT_HEADS``,
    ``LANGUAGES``), read from its source so that the package (torch model code, numba) is not imported."""
    import ast

    tree = ast.parse((_whisper_package() / module).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"openai_whisper: the installed openai-whisper package has no {name} in {module}")


def _generation_config(tokenizer: Tokenizer, dims: dict[str, int], name: str) -> GenerationConfig:
    """Whisper's decoding rules as Hugging Face's generation configs hold them: the language and task tokens, the
    no-timestamps token, openai's non-speech tokens suppressed, a blank or end-of-text not first; the alignment
    heads."""
    tokens = WhisperTokens.from_tokenizer(tokenizer)
    multilingual, _ = _languages(dims["n_vocab"])
    return GenerationConfig(
        suppress_tokens=list(tokens.non_speech_tokens()),
        begin_suppress_tokens=[*tokenizer.encode(" "), tokens.eot],
        language_ids=dict(tokens.language_ids) if multilingual else {},
        task_ids={"transcribe": tokens.transcribe, "translate": tokens.translate} if multilingual else {},
        no_timestamps_id=tokens.no_timestamps,
        alignment_heads=_alignment_heads(name, dims["n_text_layer"], dims["n_text_head"]),
    )


def from_openai_whisper(path_or_name: str | os.PathLike) -> MultimodalTransformer:
    """Convert an openai-whisper checkpoint exactly (no download).

    Args:
        path_or_name: a ``.pt`` file, or a model name (``"tiny"``, ``"whisper:base.en"``) in openai-whisper's
            download cache (``$XDG_CACHE_HOME/whisper``, default ``~/.cache/whisper``).

    Returns:
        The model in eval mode, with ``model.processor`` (16 kHz audio, openai-whisper's tokenizer).
    """
    path = checkpoint_path(path_or_name)
    dims, state = _read(path)
    tokenizer = openai_tokenizer(dims["n_vocab"], dims["n_text_ctx"])
    state = {_hf_name(k): v for k, v in state.items()}
    # openai-whisper's table names cached models; a checkpoint given by path gets the default heads, as load_model
    generation = _generation_config(tokenizer, dims, _cache_name(os.fspath(path_or_name)) or "")
    return whisper_model(_hf_config(dims, tokenizer), state, generation, tokenizer)
