"""Long-form transcription: hours of audio, many files at once, results with openai-whisper's keys.

``transcribe_files`` reads every input, finds speech with Silero VAD (:mod:`mmformer.longform.vad`), cuts and
merges it into windows the model can read, decodes the windows of all files from one queue in batches
(:mod:`mmformer.longform.batched`) and returns one result per input: ``{"text", "segments", "language"}``, each
segment with openai-whisper's ``id, seek, start, end, text, tokens, temperature``. :mod:`mmformer.longform.writers`
writes them as txt, json, srt, vtt or tsv. ``model.transcribe(...)`` stays the short-clip API returning strings.

Names load lazily, so that the options (:mod:`mmformer.longform.options`, which ``mmformer transcribe --help`` reads)
need no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TranscribeOptions": "mmformer.longform.options",
    "VadOptions": "mmformer.longform.options",
    "decoding_options": "mmformer.longform.pipeline",
    "has_timestamps": "mmformer.longform.pipeline",
    "read_input": "mmformer.longform.pipeline",
    "transcribe_files": "mmformer.longform.pipeline",
    "with_compute_type": "mmformer.longform.pipeline",
}

__all__ = [
    "TranscribeOptions",
    "VadOptions",
    "decoding_options",
    "has_timestamps",
    "read_input",
    "transcribe_files",
    "with_compute_type",
]

if TYPE_CHECKING:
    from mmformer.longform.options import TranscribeOptions, VadOptions
    from mmformer.longform.pipeline import (
        decoding_options,
        has_timestamps,
        read_input,
        transcribe_files,
        with_compute_type,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmformer.longform' has no attribute {name!r}")
