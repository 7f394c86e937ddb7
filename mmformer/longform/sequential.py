"""Sequential long-form transcription, openai-whisper's ``transcribe()`` for one waveform: 30-s windows moved by the
timestamps the model predicts (to the last complete segment's end, or a whole window when the text ends on a single
timestamp), temperature fallback, the no-speech skip, the previous text as a prompt, clips, word timestamps and the
hallucination-silence skip. Results are plain dicts with openai-whisper's keys.

Shape legend: S samples, M mel bins, F = 3000 frames per window, Nf frames of the whole file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmformer.convert.whisper_vocab import WhisperTokens
from mmformer.io.weights import model_device
from mmformer.longform.options import TranscribeOptions
from mmformer.longform.timing import add_word_timestamps
from mmformer.longform.whisper_decode import decode_with_fallback, encode_windows, time_precision, whisper_tokens

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"  # words made only of these are not scored as hallucinations


def log_mel(model: MultimodalTransformer, audio: torch.Tensor) -> torch.Tensor:
    """(S,) waveform → (M, Nf + F) log-mel of the whole file with a window of silence appended, one peak over all
    of it (openai-whisper's ``log_mel_spectrogram(audio, padding=N_SAMPLES)``), so windows are slices of it."""
    features = model.audio_embed.features
    audio = F.pad(audio.float(), (0, features.cfg.window_samples))
    mel = features.power_mel(audio[None])[0, :, :-1].clamp(min=1e-10).log10()  # the frame past the end is dropped
    return (torch.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0


def _check_audio(model: MultimodalTransformer, audio: Any) -> torch.Tensor:
    if model.config.audio is None or model.config.audio.pad_to_seconds is None or model.lm_head is None:
        raise ValueError("model: sequential long-form transcription needs a Whisper checkpoint (a fixed 30-s audio "
                         "window and a decoder)")  # fmt: skip
    audio = torch.as_tensor(audio)
    if audio.ndim != 1 or not audio.is_floating_point():
        raise ValueError(f"audio: expected a 1-D float waveform at {model.config.audio.sample_rate} Hz, got "
                         f"{tuple(audio.shape)} {audio.dtype}")  # fmt: skip
    return audio


def _word_anomaly(word: dict) -> float:
    probability, duration = word.get("probability", 0.0), word["end"] - word["start"]
    score = 1.0 if probability < 0.15 else 0.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def _is_anomaly(segment: dict | None) -> bool:
    """Whether a segment's first words look hallucinated (improbable, very short or very long)."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(_word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _next_words_segment(segments: list[dict]) -> dict | None:
    return next((s for s in segments if s["words"]), None)


def _last_word_end(segments: list[dict]) -> float | None:
    return next((w["end"] for s in reversed(segments) for w in reversed(s["words"])), None)


def split_segments(
    whisper: WhisperTokens, tokens: list[int], result: dict, seek: int, time_offset: float, precision: float,
    segment_duration: float,
) -> tuple[list[dict], bool, int | None]:  # fmt: skip
    """A window's tokens → its segments (between consecutive timestamps), whether the text ended on a single
    timestamp, and the frame offset (in audio tokens) of the last complete segment's end, or None to take the
    whole window."""
    ts = whisper.timestamp_begin
    is_stamp = [t >= ts for t in tokens]
    single_ending = is_stamp[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]

    def segment(start: float, end: float, ids: list[int]) -> dict:
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": whisper.decode([t for t in ids if t < whisper.eot]),
            "tokens": ids,
            "temperature": result["temperature"],
            "avg_logprob": result["avg_logprob"],
            "compression_ratio": result["compression_ratio"],
            "no_speech_prob": result["no_speech_prob"],
        }

    if consecutive:
        slices = consecutive + ([len(tokens)] if single_ending else [])
        segments, last = [], 0
        for current in slices:
            ids = tokens[last:current]
            start, end = ids[0] - ts, ids[-1] - ts
            segments.append(segment(time_offset + start * precision, time_offset + end * precision, ids))
            last = current
        return segments, single_ending, None if single_ending else tokens[last - 1] - ts
    duration = segment_duration
    stamps = [t for t in tokens if t >= ts]
    if stamps and stamps[-1] != ts:  # no consecutive timestamps, but a last one: the text ends there
        duration = (stamps[-1] - ts) * precision
    return [segment(time_offset, time_offset + duration, tokens)], single_ending, None


def transcribe_sequential(
    model: MultimodalTransformer,
    audio: Any,
    options: TranscribeOptions | None = None,
    *,
    tokenizer: Any = None,
    progress: Callable[[float, float], None] | None = None,
    generator: torch.Generator | None = None,
    on_segment: Callable[[dict[str, Any]], None] | None = None,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cross_dtype: torch.dtype | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Transcribe one waveform as openai-whisper's ``transcribe(model, audio, **options)``.

    Args:
        audio: 1-D float waveform at the model's rate (16 kHz).
        options: :class:`TranscribeOptions` (``changes`` override fields).
        tokenizer: Whisper's tokenizer (default ``model.processor.tokenizer``).
        progress: called after each window with (seconds done, seconds in total).
        generator: random generator for the sampled fallback temperatures.
        on_segment: called with each numbered segment as soon as its window is decoded (streaming).
        encoder: another encoder of the windows (see :func:`~mmformer.longform.whisper_decode.encode_windows`);
            the language detection, once per input, runs the model's own.
        cross_dtype: the decoder's cross-attention keys/values' dtype
            (:func:`~mmformer.longform.whisper_decode.decode_windows`).

    Returns:
        ``{"text", "segments": [{id, seek, start, end, text, tokens, temperature, avg_logprob, compression_ratio,
        no_speech_prob, "words"?: [{word, start, end, probability}]}], "language"}``.
    """
    options = TranscribeOptions.build(options, **changes)
    audio = _check_audio(model, audio)
    whisper = whisper_tokens(model, tokenizer)
    device = model_device(model)
    cfg = model.config.audio
    n_frames = cfg.window_samples // cfg.hop_length  # 3000 mel frames per window
    clock = _Clock(cfg.hop_length, cfg.sample_rate)
    input_stride = n_frames // cfg.max_tokens  # mel frames per audio token: 2
    precision = time_precision(model)  # 0.02 s

    mel = log_mel(model, audio.to(device))
    content_frames = mel.shape[-1] - n_frames
    content_duration = clock.seconds(content_frames)
    language = options.language
    if language is None:  # detected once, from the first 30 s; an English-only model's is English (openai-whisper)
        language = _detect(model, whisper, mel[:, :n_frames]) if whisper.language_ids else "en"
    options = TranscribeOptions.build(options, language=language)

    seek_points = [clock.frames(ts) for ts in options.clip_seconds()] or [0]
    if len(seek_points) % 2 == 1:
        seek_points.append(content_frames)
    # clips end at the file's end: openai-whisper decodes the padding past it (an empty window, where a random or
    # hallucinating model invents words), and a clip starting there made a window longer than 30 s here
    clips = [(start, min(end, content_frames)) for start, end in zip(seek_points[::2], seek_points[1::2])]

    all_tokens: list[int] = []
    all_segments: list[dict] = []
    prompt_reset_since = 0
    has_prompt = options.initial_prompt is not None
    initial_prompt = whisper.encode(" " + options.initial_prompt.strip()) if has_prompt else []
    all_tokens.extend(initial_prompt)
    remaining_prompt_length = model.config.text.max_length // 2 - 1 - len(initial_prompt)
    sot_sequence = whisper.sot_sequence(language, options.task)
    last_speech_timestamp = 0.0
    threshold = options.hallucination_silence_threshold
    clip_index, seek = 0, clips[0][0]
    while clip_index < len(clips):
        clip_start, clip_end = clips[clip_index]
        seek = max(seek, clip_start)
        if seek >= clip_end:
            clip_index += 1
            if clip_index < len(clips):
                seek = clips[clip_index][0]
            continue
        time_offset = clock.seconds(seek)
        window_end_time = clock.seconds(seek + n_frames)
        segment_size = min(n_frames, content_frames - seek, clip_end - seek)
        segment_duration = clock.seconds(segment_size)
        mel_segment = F.pad(mel[:, seek : seek + segment_size], (0, n_frames - segment_size))  # (M, F)

        features = encode_windows(model, mel_segment, encoder)  # (1, S, D): read by every temperature and the words
        if options.carry_initial_prompt:  # openai's slicing, [-0:] (the whole list) included
            kept = all_tokens[max(len(initial_prompt), prompt_reset_since) :][-remaining_prompt_length:]
            prompt = initial_prompt + kept
        else:
            prompt = all_tokens[prompt_reset_since:]
        result = decode_with_fallback(
            model, mel_segment, options, [prompt], tokenizer=whisper.tokenizer,
            generator=generator, audio_features=features, cross_dtype=cross_dtype,
        )[0]  # fmt: skip
        tokens = result["tokens"]
        previous_seek = seek
        if options.no_speech_threshold is not None:  # no voice activity: skip the window
            skip = result["no_speech_prob"] is not None and result["no_speech_prob"] > options.no_speech_threshold
            if options.logprob_threshold is not None and result["avg_logprob"] > options.logprob_threshold:
                skip = False  # probable text despite the no-speech probability
            if skip:
                seek += segment_size
                _report(progress, seek, content_frames, clock)
                continue

        current, single_ending, last_stamp = split_segments(
            whisper, tokens, result, seek, time_offset, precision, segment_duration
        )
        seek += segment_size if last_stamp is None else last_stamp * input_stride

        if options.word_timestamps:
            add_word_timestamps(
                segments=current, model=model, whisper=whisper, sot_sequence=sot_sequence, mel=mel_segment,
                num_frames=segment_size, language=language, prepend_punctuations=options.prepend_punctuations,
                append_punctuations=options.append_punctuations, last_speech_timestamp=last_speech_timestamp,
                time_offset=time_offset, audio_features=features,
            )  # fmt: skip
            if not single_ending:
                last_word_end = _last_word_end(current)
                if last_word_end is not None and last_word_end > time_offset:
                    seek = clock.frames(last_word_end)
            if threshold is not None:
                skip_to = _skip_hallucination(
                    current, single_ending, threshold, time_offset, window_end_time, segment_duration,
                    previous_seek, segment_size, last_speech_timestamp, content_duration, content_frames, clock,
                    seek,
                )  # fmt: skip
                if skip_to is not None and skip_to[1]:  # the window's first segment is dropped: decode again
                    seek = skip_to[0]
                    continue
                if skip_to is not None:
                    seek = skip_to[0]
            last_word_end = _last_word_end(current)
            if last_word_end is not None:
                last_speech_timestamp = last_word_end

        for segment in current:  # an instantaneous or empty segment keeps its place but no text
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"], segment["tokens"], segment["words"] = "", [], []
        for segment in ({"id": i, **s} for i, s in enumerate(current, start=len(all_segments))):
            all_segments.append(segment)
            if on_segment is not None:
                on_segment(segment)
        all_tokens.extend(t for s in current for t in s["tokens"])
        if not options.condition_on_previous_text or result["temperature"] > 0.5:
            prompt_reset_since = len(all_tokens)  # no prompt after a high temperature
        _report(progress, seek, content_frames, clock)

    return {"text": whisper.decode(all_tokens[len(initial_prompt) :]), "segments": all_segments, "language": language}


class _Clock:
    """Mel frames ↔ seconds with openai-whisper's arithmetic (``frames * HOP_LENGTH / SAMPLE_RATE`` and
    ``round(seconds * FRAMES_PER_SECOND)``), so that every boundary rounds as it does there."""

    def __init__(self, hop_length: int, sample_rate: int):
        self.hop_length, self.sample_rate = hop_length, sample_rate
        self.frames_per_second = sample_rate // hop_length

    def seconds(self, frames: int) -> float:
        return float(frames * self.hop_length / self.sample_rate)

    def frames(self, seconds: float) -> int:
        return round(seconds * self.frames_per_second)


def _report(progress: Callable | None, seek: int, total: int, clock: _Clock) -> None:
    if progress is not None:
        progress(clock.seconds(min(total, seek)), clock.seconds(total))


def _detect(model: MultimodalTransformer, whisper: WhisperTokens, mel: torch.Tensor) -> str:
    """The most likely language of a (M, ≤F) log-mel, padded to the window (openai-whisper's ``detect_language``)."""
    from mmformer.generation.decoding_rules import detect_language

    window = model.config.audio.window_samples // model.config.audio.hop_length
    mel = F.pad(mel, (0, window - mel.shape[-1]))[None]
    memory, mask = model.encode_audio_tokens(audio_features=mel)
    token = int(detect_language(model, memory, mask)[0])
    return next(code for code, i in whisper.language_ids.items() if i == token)


def _skip_hallucination(
    current: list[dict], single_ending: bool, threshold: float, time_offset: float, window_end_time: float,
    segment_duration: float, previous_seek: int, segment_size: int, last_speech: float, content_duration: float,
    content_frames: int, clock: _Clock, seek: int,
) -> tuple[int, bool] | None:  # fmt: skip
    """openai-whisper's ``hallucination_silence_threshold``: where to seek next, and whether to decode the window
    again from there (its first segment was a likely hallucination after a long silence); drops hallucinated
    segments surrounded by silence from ``current`` (in place). None: keep ``seek``."""
    frames = clock.frames
    if not single_ending:
        last_word_end = _last_word_end(current)
        if last_word_end is not None and last_word_end > time_offset:
            remaining = window_end_time - last_word_end
            seek = frames(last_word_end) if remaining > threshold else previous_seek + segment_size
    first = _next_words_segment(current)
    if first is not None and _is_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            return previous_seek + frames(gap), True
    hal_last_end = last_speech
    for si, segment in enumerate(current):
        if not segment["words"]:
            continue
        if _is_anomaly(segment):
            following = _next_words_segment(current[si + 1 :])
            hal_next_start = following["words"][0]["start"] if following is not None else time_offset + segment_duration
            silence_before = (
                segment["start"] - hal_last_end > threshold
                or segment["start"] < threshold
                or segment["start"] - time_offset < 2.0
            )
            silence_after = (
                hal_next_start - segment["end"] > threshold
                or _is_anomaly(following)
                or window_end_time - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                seek = frames(max(time_offset + 1, segment["start"]))
                if content_duration - segment["end"] < threshold:
                    seek = content_frames
                current[si:] = []
                break
        hal_last_end = segment["end"]
    return seek, False
