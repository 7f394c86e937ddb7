"""Transcription results in openai-whisper's shape (``text``, ``segments``, ``language``) and their renderings as
OpenAI's ``response_format`` values (json, text, srt, vtt, verbose_json).

:func:`transcribe_clips` is the one place the server turns waveforms into results. Until the long-form path
(``mmformer.longform.transcribe_files``) exists it makes one segment per clip (start 0, end = its duration) from
``model.transcribe``; switching to the long-form path changes this function only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from mmformer.generation import DecodingOptions

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")


def compression_ratio(text: str) -> float:
    """openai-whisper's repetition measure: UTF-8 bytes over zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def transcribe_clips(
    model: Any, waveforms: Sequence[torch.Tensor], options: DecodingOptions, language: str | None = None
) -> list[dict[str, Any]]:
    """One result per 1-D waveform (at the model's sample rate): ``{"text", "segments", "language", "duration"}``
    with one segment per clip (id, seek, start, end, text, temperature, compression_ratio)."""
    rate = model.config.audio.sample_rate
    texts = model.transcribe(list(waveforms), sample_rate=rate, options=options)
    temperature = options.temperature if options.sample else 0.0
    results = []
    for wave, text in zip(waveforms, texts):
        duration = wave.shape[-1] / rate
        text = text.strip()
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(duration, 3), "text": text,
                   "temperature": temperature, "compression_ratio": compression_ratio(text)}  # fmt: skip
        results.append({"text": text, "segments": [segment] if text else [], "language": language,
                        "duration": duration})  # fmt: skip
    return results


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(result: dict[str, Any]) -> str:
    cues = [f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n"
            for i, s in enumerate(result["segments"], start=1)]  # fmt: skip
    return "\n".join(cues)


def to_vtt(result: dict[str, Any]) -> str:
    cues = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n" for s in result["segments"]]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_json(result: dict[str, Any], granularities: Sequence[str]) -> dict[str, Any]:
    """OpenAI's verbose transcription: task, language, duration, text, segments (and words when asked)."""
    body: dict[str, Any] = {"task": "transcribe", "language": result.get("language"),
                            "duration": round(result["duration"], 3), "text": result["text"]}  # fmt: skip
    if "segment" in granularities or not granularities:
        body["segments"] = result["segments"]
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
