"""Word timestamps as openai-whisper's ``timing.py`` computes them: the window's text is fed to the decoder once
more (without a cache), the cross-attention scores of the checkpoint's alignment heads are collected
(:class:`~mmformer.layers.attention.CrossAttentionScores`; ``GenerationConfig.alignment_heads``, else every head of
the decoder's second half), softmaxed over the frames that hold audio, normalised per head, median-filtered, averaged,
and aligned to the audio tokens by dynamic time warping; words then get their punctuation merged and overlong
durations capped, and segments' starts and ends are reconciled with their words.

Shape legend: H alignment heads, T tokens, S audio tokens (1500 = 30 s at 20 ms), W words.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mmformer.convert.whisper_vocab import WhisperTokens
from mmformer.io.weights import model_device
from mmformer.layers.attention import CrossAttentionScores

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

MEDIAN_FILTER_WIDTH = 7
SENTENCE_END_MARKS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def alignment_heads(model: MultimodalTransformer) -> dict[int, list[int]]:
    """Decoder block → its alignment heads: the generation config's, else openai's default (the second half's)."""
    gen = model.config.generation
    pairs = gen.alignment_heads if gen is not None and gen.alignment_heads else None
    if pairs is None:
        cfg = model.config.stacks[model.config.routes["decoder"]]
        pairs = [[layer, head] for layer in range(cfg.depth // 2, cfg.depth) for head in range(cfg.n_heads)]
    heads: dict[int, list[int]] = {}
    for layer, head in pairs:
        heads.setdefault(layer, []).append(head)
    return heads


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median of ``width`` (odd) values along the last dimension, reflect-padded (openai-whisper's CPU kernel)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    squeeze = x.ndim <= 2
    if squeeze:
        x = x[None, None, :]
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    result = x.unfold(-1, width, 1).sort()[0][..., pad]
    return result[0, 0] if squeeze else result


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotonic path (text indices, time indices) of least total cost through an (N, M) cost matrix, with
    openai-whisper's float32 accumulation and tie-breaking (diagonal, then up, else left), computed one
    anti-diagonal at a time."""
    x = cost_matrix.astype(np.float64)
    N, M = x.shape
    cost = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    trace = -np.ones((N + 1, M + 1), dtype=np.int8)
    cost[0, 0] = 0
    for k in range(2, N + M + 1):  # cells (i, j) with i + j = k depend only on the two previous anti-diagonals
        i = np.arange(max(1, k - M), min(N, k - 1) + 1)
        j = k - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        c = np.where(t == 0, c0, np.where(t == 1, c1, c2))
        cost[i, j] = (x[i - 1, j - 1] + c.astype(np.float64)).astype(np.float32)
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = N, M, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    path = np.array(path)[::-1].T
    return path[0], path[1]


@torch.inference_mode()
def find_alignment(
    model: MultimodalTransformer,
    whisper: WhisperTokens,
    sot_sequence: list[int],
    text_tokens: list[int],
    mel: torch.Tensor,
    num_frames: int,
    language: str | None,
    *,
    medfilt_width: int = MEDIAN_FILTER_WIDTH,
    qk_scale: float = 1.0,
    audio_features: torch.Tensor | None = None,
) -> list[WordTiming]:
    """Words of ``text_tokens`` with their start/end (seconds from the window's start) and mean token probability.

    Args:
        sot_sequence: the window's ``[sot, language, task]``.
        mel: the window's log-mel (M, F), padded to 30 s; ``num_frames`` of them hold audio.
        audio_features: its encoder states (1, S, D) when already computed.
    """
    if not text_tokens:
        return []
    tokens = torch.tensor([[*sot_sequence, whisper.no_timestamps, *text_tokens, whisper.eot]])  # (1, T)
    device = model_device(model)
    collector = CrossAttentionScores(alignment_heads(model))
    if audio_features is None:
        audio_features, _ = model.encode_audio_tokens(audio_features=mel[None].to(device))
    logits = model.decode(tokens.to(device), audio_features, cross_scores=collector)[0]  # (T, V)
    sampled = logits[len(sot_sequence) :, : whisper.eot].float()
    token_probs = sampled.softmax(dim=-1)
    text_probs = token_probs[np.arange(len(text_tokens)), text_tokens].tolist()

    weights = torch.cat([collector.scores[layer][0] for layer in sorted(collector.scores)])  # (H, T, S)
    weights = weights[:, :, : num_frames // 2]
    weights = (weights * qk_scale).softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, medfilt_width)
    matrix = weights.mean(dim=0)[len(sot_sequence) : -1]  # (text tokens + 1, S')
    text_indices, time_indices = dtw(-matrix.double().cpu().numpy())

    words, word_tokens = whisper.split_to_word_tokens(text_tokens + [whisper.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    cfg = model.config.audio
    tokens_per_second = cfg.sample_rate // (cfg.hop_length * cfg.conv_stride)  # 50: audio tokens of 20 ms
    jump_times = time_indices[jumps] / tokens_per_second
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    probabilities = [np.mean(text_probs[i:j]) for i, j in zip(boundaries[:-1], boundaries[1:])]
    return [WordTiming(*fields) for fields in zip(words, word_tokens, starts, ends, probabilities)]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Prepended punctuation joins the next word, appended punctuation the previous one (in place)."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word, following.tokens = previous.word + following.word, previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word, previous.tokens = previous.word + following.word, previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(
    *,
    segments: list[dict[str, Any]],
    model: MultimodalTransformer,
    whisper: WhisperTokens,
    sot_sequence: list[int],
    mel: torch.Tensor,
    num_frames: int,
    language: str | None,
    prepend_punctuations: str,
    append_punctuations: str,
    last_speech_timestamp: float,
    time_offset: float,
    audio_features: torch.Tensor | None = None,
) -> None:
    """Give each of a window's segments its ``words`` ([{word, start, end, probability}], seconds in the file) and
    reconcile the segment's start and end with them, as openai-whisper's ``add_word_timestamps`` (in place);
    ``time_offset``: the window's start in seconds."""
    if not segments:
        return
    per_segment = [[t for t in segment["tokens"] if t < whisper.eot] for segment in segments]
    text_tokens = list(itertools.chain.from_iterable(per_segment))
    alignment = find_alignment(
        model, whisper, sot_sequence, text_tokens, mel, num_frames, language, audio_features=audio_features
    )
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations) if len(durations) > 0 else 0.0))
    max_duration = median_duration * 2
    if len(durations) > 0:  # a sentence-end mark that lasts too long is cut (it often swallows a pause)
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - max_duration
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    word_index = 0
    for segment, tokens in zip(segments, per_segment):
        saved_tokens, words = 0, []
        while word_index < len(alignment) and saved_tokens < len(tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(
                    {
                        "word": timing.word,
                        # Python floats (openai-whisper's are NumPy's, equal in value and in JSON)
                        "start": float(round(time_offset + timing.start, 2)),
                        "end": float(round(time_offset + timing.end, 2)),
                        "probability": float(timing.probability),
                    }
                )
            saved_tokens += len(timing.tokens)
            word_index += 1
        if words:
            _cap_first_word(words, last_speech_timestamp, median_duration, max_duration)
            if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
                words[0]["start"] = max(0, min(words[0]["end"] - median_duration, segment["start"]))
            else:
                segment["start"] = words[0]["start"]
            if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
                words[-1]["end"] = max(words[-1]["start"] + median_duration, segment["end"])
            else:
                segment["end"] = words[-1]["end"]
            last_speech_timestamp = segment["end"]
        segment["words"] = words


def _cap_first_word(words: list[dict], last_speech: float, median_duration: float, max_duration: float) -> None:
    """A segment's first word far after the last speech and too long (it absorbed a pause) is shortened."""
    first, second = words[0], words[1] if len(words) > 1 else None
    if first["end"] - last_speech > median_duration * 4 and (
        first["end"] - first["start"] > max_duration
        or (second is not None and second["end"] - first["start"] > max_duration * 2)
    ):
        if second is not None and second["end"] - second["start"] > max_duration:
            boundary = max(second["end"] / 2, second["end"] - max_duration)
            first["end"] = second["start"] = boundary
        first["start"] = max(0, first["end"] - max_duration)
