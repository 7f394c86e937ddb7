"""Decoding 30-second windows of log-mel as openai-whisper's ``DecodingTask`` does, a batch of windows at once, and
its temperature fallback (``transcribe.decode_with_fallback``), batched over the windows that still need it.

Per window: the prompt is ``[<|startofprev|>, previous text...] + [sot, language, task]`` (plus ``<|notimestamps|>``
without timestamps); prompts of different lengths are left-padded, which leaves the sot sequence in the same
columns for every row. The decoder steps through one KV cache (:class:`mmformer.generation.search.DecoderRunner`); the
no-speech probability is read from the logits at ``sot`` on the first call. The rules of :mod:`whisper_rules` adjust
the logits, then a token is picked (greedy at temperature 0, sampled above it, ``best_of`` samples ranked by
log-probability / length), or openai-whisper's beam search (``beam_size``, ``patience``) runs.

Shape legend: B windows, G rows per window (beams or samples), N = B*G decoded rows, M mel bins, F = 3000 frames,
P prompt tokens, L tokens so far, V vocabulary.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmformer.convert.whisper_vocab import WhisperTokens
from mmformer.generation.decoding import left_pad
from mmformer.generation.decoding_rules import detect_language
from mmformer.generation.score_processing import SuppressTokens
from mmformer.generation.search import DecoderRunner
from mmformer.generation.token_choice import most_likely
from mmformer.io.weights import model_device
from mmformer.longform.options import TranscribeOptions
from mmformer.longform.whisper_rules import TimestampRules

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

CHUNK_SECONDS = 30  # Whisper's window
MAX_INITIAL_TIMESTAMP = 1.0  # seconds: the first timestamp of a window is at most this (openai's default)


def compression_ratio(text: str) -> float:
    """gzip's compression ratio of the text's UTF-8 bytes (openai-whisper's repetition check)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def whisper_tokens(model: MultimodalTransformer, tokenizer: Any = None) -> WhisperTokens:
    """The special tokens of ``tokenizer`` (default: the model's processor's), with the model's languages: an
    English-only checkpoint's vocabulary holds the language tokens too, but its decoder never reads one (openai-whisper:
    ``is_multilingual`` False, the prompt ``[sot]``, no language detection)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(getattr(model, "processor", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer: long-form Whisper decoding needs the model's tokenizer; pass tokenizer= or load "
                         "the model with one (model.processor)")  # fmt: skip
    tokens = WhisperTokens.from_tokenizer(tokenizer)
    gen = model.config.generation
    return tokens if gen is not None and gen.language_ids else replace(tokens, language_ids={})


def time_precision(model: MultimodalTransformer) -> float:
    """Seconds per timestamp quantum (and per audio token): 30 s / n_audio_ctx = 0.02 s for Whisper."""
    return CHUNK_SECONDS / model.config.audio.max_tokens


def score_processors(
    model: MultimodalTransformer, whisper: WhisperTokens, without_timestamps: bool
) -> list[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]]:
    """openai-whisper's logit filters with its default options: suppress a blank first token, the non-speech and
    special tokens, and (with timestamps) the timestamp rules. Each is a score processor,
    ``(scores (N, V), tokens (N, L), step) -> scores``."""
    processors = [
        SuppressTokens([*whisper.encode(" "), whisper.eot], first_only=True),  # openai's SuppressBlank
        SuppressTokens(whisper.suppress_tokens()),
    ]
    if not without_timestamps:
        processors.append(TimestampRules(whisper, round(MAX_INITIAL_TIMESTAMP / time_precision(model))))
    return processors


def _language_codes(
    model: MultimodalTransformer, whisper: WhisperTokens, language: str | None, memory: torch.Tensor
) -> list[str | None]:
    """The language of each window: the given one, else detected per window ("en" for English-only models, as
    openai-whisper's ``transcribe`` says)."""
    if not whisper.language_ids:
        return [language or "en"] * memory.shape[0]
    if language is not None:
        return [language] * memory.shape[0]
    code = {i: c for c, i in whisper.language_ids.items()}
    return [code[int(t)] for t in detect_language(model, memory, None)]


class _Sampler:
    """openai-whisper's ``GreedyDecoder``: argmax at temperature 0, else a sample of softmax(logits / t)."""

    def __init__(self, temperature: float, eot: int, generator: torch.Generator | None):
        self.temperature, self.eot, self.generator = temperature, eot, generator

    def update(self, runner: DecoderRunner, tokens: torch.Tensor, logits: torch.Tensor, sums: torch.Tensor):
        if self.temperature == 0:
            next_tokens = most_likely(logits)
        else:
            probs = F.softmax(logits.float() / self.temperature, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        ended = tokens[:, -1] == self.eot
        sums += logprobs[torch.arange(logprobs.shape[0]), next_tokens] * ~ended
        next_tokens[ended] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finalize(self, tokens: torch.Tensor, sums: torch.Tensor, group: int) -> tuple[list, list]:
        """Per window, its G candidate rows (each ended by eot) and their log-probabilities."""
        tokens = F.pad(tokens, (0, 1), value=self.eot)
        rows, scores = tokens.tolist(), sums.tolist()
        return (
            [rows[i : i + group] for i in range(0, len(rows), group)],
            [scores[i : i + group] for i in range(0, len(scores), group)],
        )


class _BeamSearch:
    """openai-whisper's ``BeamSearchDecoder``: per window, the ``beam_size`` best unfinished continuations of the
    beams' top ``beam_size + 1`` tokens run on; finished ones are collected until ``round(beam_size * patience)``."""

    def __init__(self, beam_size: int, eot: int, patience: float | None):
        self.beam_size, self.eot = beam_size, eot
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.finished: list[dict[tuple, float]] | None = None

    def update(self, runner: DecoderRunner, tokens: torch.Tensor, logits: torch.Tensor, sums: torch.Tensor):
        K = self.beam_size
        n_audio = tokens.shape[0] // K
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        top_logprobs, top_tokens = logprobs.topk(K + 1, dim=-1)  # (N, K + 1)
        rows, top_logprobs, top_tokens = tokens.tolist(), top_logprobs.tolist(), top_tokens.tolist()
        next_rows, sources, new_finished = [], [], []
        for i in range(n_audio):
            scores, source, finished = {}, {}, {}
            for j in range(K):
                idx = i * K + j
                for logprob, token in zip(top_logprobs[idx], top_tokens[idx]):
                    sequence = tuple(rows[idx] + [token])
                    scores[sequence] = float(sums[idx] + logprob)
                    source[sequence] = idx
            saved = 0
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == self.eot:
                    finished[sequence] = scores[sequence]
                else:
                    sums[len(next_rows)] = scores[sequence]
                    next_rows.append(sequence)
                    sources.append(source[sequence])
                    saved += 1
                    if saved == K:
                        break
            new_finished.append(finished)
        tokens = torch.tensor(next_rows, device=tokens.device)
        runner.reorder(torch.tensor(sources, device=tokens.device))
        for previous, newly in zip(self.finished, new_finished):
            for sequence in sorted(newly, key=newly.get, reverse=True):
                if len(previous) >= self.max_candidates:
                    break
                previous[sequence] = newly[sequence]
        return tokens, all(len(s) >= self.max_candidates for s in self.finished)

    def finalize(self, tokens: torch.Tensor, sums: torch.Tensor, group: int) -> tuple[list, list]:
        sums_by_window = sums.view(-1, group)
        for i, sequences in enumerate(self.finished):
            if len(sequences) < self.beam_size:  # too few finished: add the best unfinished ones
                for j in sums_by_window[i].argsort(descending=True, stable=True).tolist():
                    sequences[tuple(tokens[i * group + j].tolist() + [self.eot])] = float(sums_by_window[i, j])
                    if len(sequences) >= self.beam_size:
                        break
        return [[list(s) for s in seqs] for seqs in self.finished], [list(seqs.values()) for seqs in self.finished]


@torch.inference_mode()
def decode_windows(
    model: MultimodalTransformer,
    mel: torch.Tensor,
    options: TranscribeOptions,
    temperature: float,
    prompts: Sequence[Sequence[int]] | None = None,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    sample_len: int | None = None,
    audio_features: torch.Tensor | None = None,
    cross_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Decode a batch of 30-s windows together, as openai-whisper's ``decode(model, mel, DecodingOptions(...))``.

    Args:
        mel: log-mel windows (B, M, F) (or one (M, F)), each padded to the encoder's window.
        options: ``language`` (None: detected per window), ``task``, ``without_timestamps``, ``beam_size`` /
            ``patience`` (used at temperature 0) and ``best_of`` (used above it).
        temperature: 0 for greedy (or beam) decoding, else the sampling temperature.
        prompts: per window, the previous text's ids (given after ``<|startofprev|>``, at most n_text_ctx // 2 - 1
            of the last ones), or None / empty for none.
        tokenizer: Whisper's tokenizer (default ``model.processor.tokenizer``).
        generator: random generator for sampling.
        sample_len: most tokens generated per window (default n_text_ctx // 2, openai's).
        audio_features: the windows' encoder states (B, S, D) when already computed (:func:`encode_windows`); the
            encoder then does not run again.
        cross_dtype: the dtype the decoder's cross-attention keys/values are kept in (bf16 under the bf16 compute
            type: half the bytes each step reads); None: float32.

    Returns:
        One dict per window: ``tokens`` (the generated ids without the final end-of-text), ``text``, ``language``,
        ``avg_logprob``, ``sum_logprob``, ``no_speech_prob``, ``compression_ratio``, ``temperature``.
    """
    whisper = whisper_tokens(model, tokenizer)
    if mel.ndim == 2:
        mel = mel[None]
    B, n_ctx = mel.shape[0], model.config.text.max_length
    prompts = [list(p or []) for p in prompts] if prompts is not None else [[] for _ in range(B)]
    if len(prompts) != B:
        raise ValueError(f"prompts: expected one per window ({B}), got {len(prompts)}")
    if temperature == 0 and options.best_of is not None:
        raise ValueError("best_of: only for sampling (a temperature > 0); got temperature=0")
    group = (options.beam_size if temperature == 0 else options.best_of) or 1
    sample_len = sample_len or n_ctx // 2

    memory = encode_windows(model, mel) if audio_features is None else audio_features
    memory_mask = None  # Whisper's encoder attends to the whole window
    languages = _language_codes(model, whisper, options.language, memory)
    rows = []
    for prompt, language in zip(prompts, languages):
        sot_sequence = whisper.sot_sequence(language, options.task)
        if options.without_timestamps:
            sot_sequence.append(whisper.no_timestamps)
        rows.append(([whisper.sot_prev, *prompt[-(n_ctx // 2 - 1) :]] if prompt else []) + sot_sequence)
    tokens, prompt_mask = left_pad(rows, whisper.eot, memory.device)  # (B, P): the sot sequences end every row
    n_prompt = tokens.shape[1]
    sot_index = n_prompt - len(sot_sequence)
    tokens = tokens.repeat_interleave(group, dim=0)  # (N, P)
    prompt_mask = prompt_mask.repeat_interleave(group, dim=0)

    processors = score_processors(model, whisper, options.without_timestamps)
    decoder = (
        _BeamSearch(group, whisper.eot, options.patience)
        if temperature == 0 and options.beam_size is not None
        else _Sampler(temperature, whisper.eot, generator)
    )
    # the first call feeds the prompt up to sot (its logits give the no-speech probability), the second the rest
    runner = DecoderRunner(
        model, memory, memory_mask, n_ctx, use_cache=True, prompt_mask=prompt_mask[:, : sot_index + 1],
        cross_dtype=cross_dtype,
    )  # fmt: skip
    sot_logits = runner.next_logits(tokens[:, : sot_index + 1])  # (N, V)
    no_speech = (
        sot_logits.softmax(dim=-1)[::group, whisper.no_speech].tolist() if whisper.no_speech is not None else [None] * B
    )
    sums = torch.zeros(tokens.shape[0], device=tokens.device)
    for step in range(sample_len):
        # a prompt that ends at sot (an English-only model with timestamps) has nothing left for a second call
        logits = sot_logits if step == 0 and sot_index + 1 == n_prompt else runner.next_logits(tokens)  # (N, V)
        for process in processors:
            logits = process(logits, tokens, step)
        tokens, completed = decoder.update(runner, tokens, logits, sums)
        if completed or tokens.shape[-1] > n_ctx:
            break

    candidates, scores = decoder.finalize(tokens, sums, group)
    results = []
    for b, (window, window_scores) in enumerate(zip(candidates, scores)):
        sampled = [row[n_prompt : n_prompt + row[n_prompt:].index(whisper.eot)] for row in window]
        best = max(range(len(sampled)), key=lambda i: window_scores[i] / len(sampled[i]) if sampled[i] else 0.0)
        ids, sum_logprob = sampled[best], window_scores[best]
        text = whisper.decode(ids).strip()
        results.append(
            {
                "tokens": ids,
                "text": text,
                "language": languages[b],
                "avg_logprob": sum_logprob / (len(ids) + 1),
                "sum_logprob": sum_logprob,
                "no_speech_prob": no_speech[b],
                "compression_ratio": compression_ratio(text),
                "temperature": temperature,
            }
        )
    return results


def encode_windows(
    model: MultimodalTransformer, mel: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Encoder states (B, S, D) of log-mel windows (B, M, F) (or one (M, F)), every frame attended (Whisper);
    ``encoder``: another encoder of the model's audio tower, log-mel → states (the int8 graph of
    :meth:`mmformer.compress.pt2e.PT2EModel.audio_states`)."""
    mel = mel[None] if mel.ndim == 2 else mel
    if encoder is not None:
        return encoder(mel)
    memory, _ = model.encode_audio_tokens(audio_features=mel.to(model_device(model)))
    return memory


def needs_fallback(result: dict[str, Any], options: TranscribeOptions) -> bool:
    """Whether a window's result fails openai-whisper's checks (too repetitive, or too improbable) and is not
    silence (a high no-speech probability with a low log-probability)."""
    fails = (
        options.compression_ratio_threshold is not None
        and result["compression_ratio"] > options.compression_ratio_threshold
    ) or (options.logprob_threshold is not None and result["avg_logprob"] < options.logprob_threshold)
    silent = (
        options.no_speech_threshold is not None
        and result["no_speech_prob"] is not None
        and result["no_speech_prob"] > options.no_speech_threshold
        and options.logprob_threshold is not None
        and result["avg_logprob"] < options.logprob_threshold
    )
    return fails and not silent


def decode_with_fallback(
    model: MultimodalTransformer,
    mel: torch.Tensor,
    options: TranscribeOptions,
    prompts: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """openai-whisper's ``decode_with_fallback`` for a batch of windows: each temperature of ``options.temperature``
    in turn decodes the windows whose last result :func:`needs_fallback` (all of them at the first); a window keeps
    the result of the temperature where it passed, or the last one. The encoder runs once per window (or not at
    all with ``audio_features``). ``kwargs`` go to :func:`decode_windows`."""
    if mel.ndim == 2:
        mel = mel[None]
    features = kwargs.pop("audio_features", None)
    features = encode_windows(model, mel) if features is None else features
    prompts = list(prompts) if prompts is not None else [None] * mel.shape[0]
    results: list[dict[str, Any] | None] = [None] * mel.shape[0]
    pending = list(range(mel.shape[0]))
    for t in options.temperature:
        # as openai-whisper: beam search only at temperature 0, best-of only above it
        settings = replace(options, beam_size=None, patience=None) if t > 0 else replace(options, best_of=None)
        window_prompts = [prompts[i] for i in pending]
        decoded = decode_windows(
            model, mel[pending], settings, t, window_prompts, audio_features=features[pending], **kwargs
        )
        for i, result in zip(pending, decoded):
            results[i] = result
        pending = [i for i, result in zip(pending, decoded) if needs_fallback(result, options)]
        if not pending:
            break
    return results
