"""Transcription results in openai-whisper's shape (``text``, ``segments``, ``language``) and their renderings as
OpenAI's ``response_format`` values (json, text, srt, vtt, verbose_json).

:func:`transcribe_clips` is the one place the server turns waveforms into results: the long-form path
(:func:`mmformer.longform.transcribe_files`), so a clip longer than the model's window is cut at its speech and its
segments carry their times; subtitles are :mod:`mmformer.longform.writers`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmformer.generation.options import DecodingOptions
from mmformer.longform import transcribe_files
from mmformer.longform.whisper_decode import compression_ratio
from mmformer.longform.writers import to_srt, to_vtt
from mmformer.serve.batching import Abandoned

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")


def transcribe_clips(
    model: Any,
    waveforms: Sequence[torch.Tensor],
    options: DecodingOptions,
    on_segment: Callable[[int, dict[str, Any]], None] | None = None,
    bf16_encoder: bool = False,
    stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """One result per 1-D waveform (at the model's sample rate), all decoded together: ``{"text", "segments",
    "language", "duration"}``; a waveform that cannot be transcribed raises (the batcher then retries the others
    alone). ``on_segment(index, segment)`` gets each waveform's segments in order as they are decoded;
    ``bf16_encoder``: :func:`mmformer.longform.transcribe_files`'. ``stop()`` is asked after each decoded window (or
    batch of windows): True raises :class:`~mmformer.serve.batching.Abandoned` there (every client went away)."""

    def check(seconds: float, total: float) -> None:  # transcribe_files reports progress between windows
        if stop():
            raise Abandoned("transcription: every request of this call went away")

    results = transcribe_files(model, list(waveforms), options, batch_size=max(1, len(waveforms)),
                               on_segment=on_segment, bf16_encoder=bf16_encoder,
                               progress=None if stop is None else check)  # fmt: skip
    rate = model.config.audio.sample_rate
    for result, wave in zip(results, waveforms):
        if "error" in result:
            raise ValueError(f"file: {result['error']}")
        result["duration"] = wave.shape[-1] / rate
    return results


def openai_segment(segment: dict[str, Any]) -> dict[str, Any]:
    """A segment with every field of OpenAI's verbose_json. A Whisper checkpoint's decoding gives them all; a model
    trained here decodes each window with ``generate``, which returns token ids and no log-probs, and has no
    no-speech token: its ``avg_logprob`` and ``no_speech_prob`` are null, and its ``compression_ratio`` is
    openai-whisper's zlib ratio of the segment's text (one segment per window: the text openai-whisper measures)."""
    ratio = segment.get("compression_ratio")
    return {"avg_logprob": None, "no_speech_prob": None, **segment,
            "compression_ratio": compression_ratio(segment["text"]) if ratio is None else ratio}  # fmt: skip


def verbose_json(result: dict[str, Any], granularities: Sequence[str]) -> dict[str, Any]:
    """OpenAI's verbose transcription: task, language, duration, text, segments (and words when asked)."""
    body: dict[str, Any] = {"task": "transcribe", "language": result.get("language"),
                            "duration": round(result["duration"], 3), "text": result["text"]}  # fmt: skip
    if "segment" in granularities or not granularities:
        body["segments"] = [openai_segment(s) for s in result["segments"]]
    if "word" in granularities:
        body["words"] = [w for s in result["segments"] for w in s.get("words", [])]
    return body


def render(result: dict[str, Any], response_format: str, granularities: Sequence[str] = ()) -> tuple[Any, str]:
    """(body, media type) of a result in one of :data:`FORMATS`; a dict body is sent as JSON."""
    if response_format == "json":
        return {"text": result["text"]}, "application/json"
    if response_format == "verbose_json":
        return verbose_json(result, granularities), "application/json"
    if response_format == "text":
        return result["text"] + "\n", "text/plain; charset=utf-8"
    if response_format == "srt":
        return to_srt(result), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return to_vtt(result), "text/vtt; charset=utf-8"
    raise ValueError(f"response_format: expected one of {list(FORMATS)}, got {response_format!r}")
