"""Hugging Face Whisper (``WhisperForConditionalGeneration``) → :class:`~mmformer.MultimodalTransformer`.

Whisper maps onto two stacks: the audio encoder (``routes["audio"] = "encoder"``) and the text decoder with
cross-attention (``routes["decoder"] = "decoder"``); there is no text encoder route. The conversion is exact:

- encoder ``conv1``/``conv2`` + GELU → ``audio_embed.conv1``/``conv2``; ``embed_positions`` (a sinusoidal table
  stored as weights) → ``AudioConfig(position="learned")`` loaded with those values (``"sinusoidal"`` when they
  equal mmformer's own table);
- pre-LN layers: ``self_attn_layer_norm`` → ``attn.norm``; ``self_attn.{q,k,v}_proj`` → fused ``qkv`` (the key
  projection has no bias: its rows of the fused bias are zeros, which cannot change a softmax over keys);
  ``out_proj`` → ``proj``; decoder ``encoder_attn*`` → ``cross_attn`` (``q``, fused ``kv``); ``final_layer_norm``,
  ``fc1``, ``fc2`` → ``mlp``; the final ``layer_norm`` of each side → the stack's final norm;
- decoder ``embed_tokens`` and learned ``embed_positions`` → ``text_embed``; ``proj_out`` → ``lm_head`` (tied to
  the token embedding unless the checkpoint unties it).

Whisper as Whisper runs: waveforms are zero-padded or cut to the encoder's window (``2 * max_source_positions``
mel frames: 30 s) before the log-mel, exactly as ``WhisperFeatureExtractor`` does (``AudioConfig.pad_to_seconds``);
the checkpoint's generation config (``generation_config.json``, or the instance's ``generation_config``) becomes
``ModelConfig.generation``: the decoder prompt ``<|startoftranscript|> <|lang|> <|task|> <|notimestamps|>`` (the
language detected from the audio unless chosen, as Hugging Face does), ``suppress_tokens`` and
``begin_suppress_tokens``; timestamps are not produced. ``model.transcribe`` decodes audio longer than the window
window by window (:func:`mmformer.generation.decoding.transcribe`).

Precomputed features (``audio_features=``) of any number of frames up to the window are accepted, where Hugging
Face's encoder takes exactly ``2 * max_source_positions``. Nothing is downloaded: pass a model instance or a local
directory (:func:`mmformer.from_pretrained` resolves Hub ids).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from mmformer.config import AudioConfig, GenerationConfig, ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    build_processor,
    first_id,
    fuse_qkv,
    lm_head_tied,
    read_hf_checkpoint,
)
from mmformer.convert.hf_tokenizer import read_hf_tokenizer
from mmformer.io.hub import read_json
from mmformer.io.weights import build_on_meta
from mmformer.layers.positions import sinusoids
from mmformer.model import MultimodalTransformer

__all__ = ["from_hf_whisper"]

SAMPLE_RATE = 16000  # Whisper's feature extractor: 16 kHz, 25 ms windows (n_fft 400), 10 ms hops (160)
HOP_LENGTH = 160
_SINUSOID_TOLERANCE = 1e-6  # a stored table this close to mmformer's sinusoids is loaded as "sinusoidal"


def _generation_config(gen: dict[str, Any], vocab_size: int) -> GenerationConfig | None:
    """``ModelConfig.generation`` from a Hugging Face Whisper generation config (None without one)."""
    if not gen:
        return None
    code = lambda token: str(token).strip().lower().removeprefix("<|").removesuffix("|>")  # noqa: E731
    languages = {code(token): int(i) for token, i in (gen.get("lang_to_id") or {}).items()}
    tasks = {str(task): int(i) for task, i in (gen.get("task_to_id") or {}).items()}
    # the deprecated forced_decoder_ids [[1, lang or None], [2, task]] name the checkpoint's defaults
    forced = dict((int(pos), tok) for pos, tok in (gen.get("forced_decoder_ids") or []))
    language = next((c for c, i in languages.items() if i == forced.get(1)), None)
    task = next((t for t, i in tasks.items() if i == forced.get(2)), None)
    if gen.get("language") is not None:
        language = _language_code(gen["language"], languages)
    if gen.get("task") is not None and gen["task"] in tasks:
        task = gen["task"]
    if gen.get("return_timestamps"):
        warnings.warn("hf_whisper: the generation config asks for timestamps; mmformer decodes without", stacklevel=3)
    return GenerationConfig(
        suppress_tokens=_in_vocabulary(gen, "suppress_tokens", vocab_size),
        begin_suppress_tokens=_in_vocabulary(gen, "begin_suppress_tokens", vocab_size),
        language_ids=languages,
        task_ids=tasks,
        language=language,
        task=task,
        no_timestamps_id=gen.get("no_timestamps_token_id"),
        alignment_heads=[[int(layer), int(head)] for layer, head in gen.get("alignment_heads") or []],
    )


def _in_vocabulary(gen: dict[str, Any], key: str, vocab_size: int) -> list[int]:
    """The ids of a suppress list that are tokens of this model. Ids beyond the vocabulary (Hugging Face's default
    ``begin_suppress_tokens`` ``[220, 50256]`` on a test-sized model) could never be generated; Hugging Face's logit
    processors ignore them, and they are dropped here with a warning naming them."""
    ids = [int(i) for i in gen.get(key) or []]
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        warnings.warn(
            f"hf_whisper: the generation config's {key} holds ids outside the vocabulary of {vocab_size} tokens: "
            f"{outside}; dropped (they can never be generated; Hugging Face ignores them too)",
            stacklevel=4,
        )
    return [i for i in ids if 0 <= i < vocab_size]


def _language_code(language: str, languages: dict[str, int]) -> str | None:
    """A language as the generation config names it ("<|en|>", "en" or "english") → its code, if the model has it."""
    name = str(language).strip().lower().removeprefix("<|").removesuffix("|>")
    if name in languages:
        return name
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    return TO_LANGUAGE_CODE.get(name) if TO_LANGUAGE_CODE.get(name) in languages else None


def _read_generation_config(path_or_model: Any, directory: Path | None) -> dict[str, Any]:
    """The generation config of a model instance (``generation_config``) or of a directory's generation_config.json."""
    if directory is not None:
        return read_json(directory / "generation_config.json") or {}
    gen = getattr(path_or_model, "generation_config", None)
    return gen.to_dict() if gen is not None and hasattr(gen, "to_dict") else {}


def _model_config(
    cfg: dict[str, Any], audio_position: str, tied: bool, generation: GenerationConfig | None = None
) -> ModelConfig:
    if cfg.get("scale_embedding", False):
        raise UnsupportedModelError("hf_whisper: scale_embedding=True (embeddings scaled by sqrt(d_model))")
    if cfg["d_model"] % 2:
        raise UnsupportedModelError(f"hf_whisper: d_model must be even, got {cfg['d_model']}")
    mlp = activation_kind(cfg.get("activation_function", "gelu"), what="hf_whisper activation_function")

    def stack(side: str, cross: bool) -> StackConfig:
        return StackConfig(
            width=cfg["d_model"],
            depth=cfg[f"{side}_layers"],
            n_heads=cfg[f"{side}_attention_heads"],
            mlp=mlp,
            mlp_hidden=cfg[f"{side}_ffn_dim"],
            norm_eps=1e-5,  # nn.LayerNorm's default, which every Whisper norm uses
            cross_attention=cross,
        )

    eos = first_id(cfg.get("eos_token_id"))
    pad = cfg.get("pad_token_id")
    frames = 2 * cfg["max_source_positions"]
    return ModelConfig(
        stacks={"encoder": stack("encoder", False), "decoder": stack("decoder", True)},
        routes={"audio": "encoder", "decoder": "decoder"},
        image=None,
        audio=AudioConfig(
            sample_rate=SAMPLE_RATE,
            n_mels=cfg["num_mel_bins"],
            n_fft=400,
            hop_length=HOP_LENGTH,
            max_frames=frames,
            conv_stride=2,
            position=audio_position,
            pad_to_seconds=frames * HOP_LENGTH / SAMPLE_RATE,  # the encoder's whole window, as Whisper pads to
        ),
        text=TextConfig(
            vocab_size=cfg["vocab_size"],
            max_length=cfg["max_target_positions"],
            position="learned",
            pad_id=pad if pad is not None else eos,
            bos_id=cfg["decoder_start_token_id"],
            eos_id=eos,
        ),
        embed_dim=None,
        tie_lm_head=tied,
        generation=generation,
    )


def _map_attention(wm: WeightMap, dst: str, src: str, cross: bool) -> None:
    """Whisper attention ``src`` (q/k/v/out_proj; k without bias) → mmformer attention ``dst``."""
    q, k, v = (wm.get(f"{src}.{n}_proj.weight") for n in "qkv")
    qb, vb = wm.get(f"{src}.q_proj.bias"), wm.get(f"{src}.v_proj.bias")
    if cross:
        wm.copy(f"{dst}.q.weight", f"{src}.q_proj.weight")
        wm.copy(f"{dst}.q.bias", f"{src}.q_proj.bias")
        wm.set(f"{dst}.kv.weight", torch.cat([k, v]), [f"{src}.k_proj.weight", f"{src}.v_proj.weight"])
        wm.set(f"{dst}.kv.bias", torch.cat([torch.zeros_like(vb), vb]), f"{src}.v_proj.bias")
    else:
        wm.set(f"{dst}.qkv.weight", fuse_qkv(q, k, v), [f"{src}.{n}_proj.weight" for n in "qkv"])
        wm.set(f"{dst}.qkv.bias", fuse_qkv(qb, None, vb), [f"{src}.q_proj.bias", f"{src}.v_proj.bias"])
    wm.copy(f"{dst}.proj.weight", f"{src}.out_proj.weight")
    wm.copy(f"{dst}.proj.bias", f"{src}.out_proj.bias")


def _map_stack(wm: WeightMap, side: str, depth: int) -> None:
    for i in range(depth):
        dst, src = f"stacks.{side}.blocks.{i}", f"{side}.layers.{i}"
        wm.copy_module(f"{dst}.attn.norm", f"{src}.self_attn_layer_norm")
        _map_attention(wm, f"{dst}.attn.fn", f"{src}.self_attn", cross=False)
        if side == "decoder":
            wm.copy_module(f"{dst}.cross_attn.norm", f"{src}.encoder_attn_layer_norm")
            _map_attention(wm, f"{dst}.cross_attn.fn", f"{src}.encoder_attn", cross=True)
        wm.copy_module(f"{dst}.mlp.norm", f"{src}.final_layer_norm")
        for fc in ("fc1", "fc2"):
            wm.copy_module(f"{dst}.mlp.fn.{fc}", f"{src}.{fc}")
    wm.copy_module(f"stacks.{side}.norm", f"{side}.layer_norm")


def from_hf_whisper(path_or_model: Any) -> MultimodalTransformer:
    """Convert a Hugging Face Whisper checkpoint exactly (no download).

    Args:
        path_or_model: a ``transformers.WhisperForConditionalGeneration`` (or ``WhisperModel``) instance, or a local
            directory holding its ``config.json`` and weights (``model.safetensors`` or a safe ``.bin``), plus
            optionally ``tokenizer.json``.

    Returns:
        The model in eval mode, with ``model.processor`` set: 16 kHz audio of any length (``transcribe`` windows it)
        and the directory's tokenizer (None without a ``tokenizer.json``;
        :meth:`~mmformer.MultimodalTransformer.generate` works on ids without it).
    """
    cfg, state, directory = read_hf_checkpoint(
        path_or_model,
        model_type="whisper",
        name="Whisper",
        model_class="WhisperForConditionalGeneration (or WhisperModel)",
    )
    state = {k.removeprefix("model."): v for k, v in state.items()}
    generation = _generation_config(_read_generation_config(path_or_model, directory), cfg["vocab_size"])
    return whisper_model(cfg, state, generation, read_hf_tokenizer(directory))


def whisper_model(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], generation: GenerationConfig | None, tokenizer: Any
) -> MultimodalTransformer:
    """The model of a Whisper checkpoint in Hugging Face's names: its config dict, state dict (without the
    ``model.`` prefix), generation config and tokenizer (or None). openai-whisper's ``.pt`` files come here too,
    renamed (:mod:`mmformer.convert.openai_whisper`)."""
    positions = state["encoder.embed_positions.weight"]
    table = sinusoids(*positions.shape)
    audio_position = "sinusoidal" if (positions.float() - table).abs().max() <= _SINUSOID_TOLERANCE else "learned"
    tied = lm_head_tied(state, "proj_out.weight", "decoder.embed_tokens.weight")
    model = build_on_meta(MultimodalTransformer, _model_config(cfg, audio_position, tied, generation))

    wm = WeightMap(state, name="hf_whisper", ignore=["proj_out.weight"] if tied else [])
    for conv in ("conv1", "conv2"):
        wm.copy_module(f"audio_embed.{conv}", f"encoder.{conv}")
    if audio_position == "learned":
        wm.copy("audio_embed.positions.weight", "encoder.embed_positions.weight")
    else:
        wm.get("encoder.embed_positions.weight")  # equal to the built-in table: used, nothing to load
    _map_stack(wm, "encoder", cfg["encoder_layers"])
    wm.copy("text_embed.tokens.weight", "decoder.embed_tokens.weight")
    wm.copy("text_embed.positions.weight", "decoder.embed_positions.weight")
    _map_stack(wm, "decoder", cfg["decoder_layers"])
    if not tied:
        wm.copy("lm_head.weight", "proj_out.weight")
    # mmformer-only state Whisper has no counterpart for: the (unused) contrastive logit scale keeps its initial value
    wm.initialise("logit_scale")
    wm.load_into(model)

    audio = {"sample_rate": SAMPLE_RATE, "max_seconds": None}  # longer audio is transcribed window by window
    model.processor = build_processor(tokenizer, audio=audio)
    return model.eval()
