"""The options of long-form transcription, written once: openai-whisper's ``transcribe()`` keywords (and the
``DecodingOptions`` it forwards: language, task, beam size, best-of, patience, timestamps) in
:class:`TranscribeOptions`, and how speech is found and cut (:class:`VadOptions`), with their defaults and a help
string per field, so that the CLI generates its flags from these dataclasses as it does from
:class:`mmformer.generation.options.DecodingOptions`. Torch-free, so that ``mmformer transcribe --help`` does not
import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmformer.values import build_options, is_int, is_number, option

PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # openai-whisper's defaults: merged with the next word
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # merged with the previous word
TASKS = ("transcribe", "translate")


def _optional_number(name: str, value: Any, *, positive: bool = False) -> None:
    if value is not None and (not is_number(value) or (positive and value <= 0)):
        expected = "a number > 0" if positive else "a finite number"
        raise ValueError(f"{name}: expected None or {expected}, got {value!r}")


def _optional_count(name: str, value: Any) -> None:
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")


@dataclass(frozen=True)
class TranscribeOptions:
    """How to transcribe long audio as openai-whisper's ``transcribe()`` does: the one place these options, their
    defaults and their help live. Validated on construction; ``TranscribeOptions.build(options, **changes)`` (or
    ``dataclasses.replace``) validates again."""

    temperature: tuple[float, ...] = option(
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        "temperatures tried in turn while a window fails the compression-ratio or log-prob check; "
        "a single value means no fallback",
    )
    compression_ratio_threshold: float | None = option(
        2.4, "a window whose text's gzip compression ratio exceeds this is decoded again (too repetitive)"
    )
    logprob_threshold: float | None = option(
        -1.0, "a window whose average token log-probability is below this is decoded again"
    )
    no_speech_threshold: float | None = option(
        0.6,
        "a window is silence (skipped) when its no-speech probability exceeds this and its average "
        "log-probability is below logprob_threshold",
    )
    condition_on_previous_text: bool = option(
        True, "feed the previous window's text as a <|startofprev|> prompt (dropped after a temperature above 0.5)"
    )
    initial_prompt: str | None = option(None, "text given as the prompt of the first window (vocabulary, style)")
    carry_initial_prompt: bool = option(
        False, "put initial_prompt before the previous text in every window's prompt, not only the first"
    )
    word_timestamps: bool = option(
        False, "word start/end times from the alignment heads' cross-attention and dynamic time warping"
    )
    prepend_punctuations: str = option(
        PREPEND_PUNCTUATIONS, "with word_timestamps: these punctuation marks join the next word"
    )
    append_punctuations: str = option(
        APPEND_PUNCTUATIONS, "with word_timestamps: these punctuation marks join the previous word"
    )
    clip_timestamps: str | tuple[float, ...] = option(
        "0", "start,end,start,end,... seconds of the clips to transcribe (the last end defaults to the end)"
    )
    hallucination_silence_threshold: float | None = option(
        None, "with word_timestamps: skip silences longer than this (seconds) around a likely hallucination"
    )
    language: str | None = option(None, "the audio's language code, e.g. en (default: detected from the first 30 s)")
    task: str = option("transcribe", "transcribe, or translate into English")
    beam_size: int | None = option(None, "beam width at temperature 0 (default: greedy)")
    best_of: int | None = option(None, "samples drawn at a temperature above 0, the most likely kept")
    patience: float | None = option(None, "beam search patience (openai-whisper's; default 1.0)")
    without_timestamps: bool = option(False, "decode without timestamp tokens (segments then span whole windows)")

    def __post_init__(self) -> None:
        temps = self.temperature
        if is_number(temps):
            temps = (float(temps),)
        if isinstance(temps, list):
            temps = tuple(temps)
        if not isinstance(temps, tuple) or not temps or not all(is_number(t) and t >= 0 for t in temps):
            raise ValueError(
                f"temperature: expected a number >= 0 or a non-empty tuple of them, got {self.temperature!r}"
            )
        object.__setattr__(self, "temperature", tuple(float(t) for t in temps))
        for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
            _optional_number(name, getattr(self, name))
        _optional_number("hallucination_silence_threshold", self.hallucination_silence_threshold, positive=True)
        _optional_number("patience", self.patience, positive=True)
        for name in ("condition_on_previous_text", "carry_initial_prompt", "word_timestamps", "without_timestamps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("initial_prompt", "language"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected None or a string, got {getattr(self, name)!r}")
        for name in ("prepend_punctuations", "append_punctuations"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        _optional_count("beam_size", self.beam_size)
        _optional_count("best_of", self.best_of)
        object.__setattr__(self, "clip_timestamps", self._clips(self.clip_timestamps))
        if self.word_timestamps and self.without_timestamps:
            raise ValueError("word_timestamps=True needs timestamp tokens; got without_timestamps=True")

    @staticmethod
    def _clips(value: Any) -> str | tuple[float, ...]:
        """``clip_timestamps`` as given ("0", "10,20.5") or a tuple of seconds, checked to be numbers >= 0."""
        items = value.split(",") if isinstance(value, str) else value
        try:
            seconds = [float(x) for x in items if not isinstance(x, str) or x.strip()]
        except (TypeError, ValueError):
            seconds = None
        if seconds is None or not all(math.isfinite(s) and s >= 0 for s in seconds):
            raise ValueError(f"clip_timestamps: expected 'start,end,...' seconds >= 0 (a string or numbers), "
                             f"got {value!r}")  # fmt: skip
        return value if isinstance(value, str) else tuple(seconds)

    def clip_seconds(self) -> list[float]:
        """``clip_timestamps`` as a list of seconds, as openai-whisper parses the string."""
        value = self.clip_timestamps
        if isinstance(value, str):
            return [float(ts) for ts in (value.split(",") if value else [])]
        return list(value)

    @classmethod
    def build(cls, options: TranscribeOptions | None = None, **changes: Any) -> TranscribeOptions:
        """``options`` (default: the defaults) with ``changes`` applied; an unknown name is a TypeError listing the
        valid ones."""
        return build_options(cls, options, changes, "transcribe")


@dataclass(frozen=True)
class VadOptions:
    """How speech is found and cut into windows: the one place these options, their defaults and their help live
    (the CLI derives its ``--vad-*`` flags from it). The defaults were measured on the shipped digits model (see
    tests/test_longform_vad.py and the report of issue #25): on its 100-utterance recording, speech_pad_ms 0 / 50 /
    100 / 200 gave WER 0.034 / 0.025 / 0.015 / 0.020 against 0.010 one by one, edges within 0.08 s of the truth up
    to 100 ms; faster-whisper's own defaults (min_silence_ms=2000, speech_pad_ms=400) suit Whisper, which tolerates
    more silence around speech. ``pack_gap_ms`` keeps half of
    faster-whisper's pause between regions (its 400-ms pads keep up to 800 ms): on the 10-min benchmark recording
    windows of 30 s number 20 as spans, 8 / 10 / 12 / 15 packed with gaps of 0 / 200 / 400 / 800 ms."""

    threshold: float = option(0.5, "speech probability above which a 32-ms Silero frame is speech")
    neg_threshold: float | None = option(None, "probability below which speech ends (default: threshold - 0.15)")
    min_speech_ms: int = option(100, "speech regions shorter than this are dropped")
    min_silence_ms: int = option(250, "silence shorter than this does not end a speech region (the pause inside "
                                       "a spoken number reaches 200 ms)")  # fmt: skip
    speech_pad_ms: int = option(100, "silence kept before and after each speech region (faster-whisper's "
                                       "speech_pad_ms)")  # fmt: skip
    trim_db: float | None = option(40.0, "place each region's edges at its first and last sample within this many "
                                          "dB of its peak and above the noise between regions (then pad by "
                                          "speech_pad_ms); none: Silero's 32-ms edges")  # fmt: skip
    max_window_s: float | None = option(None, "longest window decoded at once (default: the model's input: "
                                               "Whisper's 30 s, else AudioConfig.max_frames and no longer than "
                                               "its processor's max_seconds)")  # fmt: skip
    merge: bool | None = option(None, "merge neighbouring regions into windows up to max_window_s (whisperX); "
                                       "default: only for a fixed-window model (Whisper)")  # fmt: skip
    pack_gap_ms: int | None = option(400, "merged windows join their regions' audio with each pause between two "
                                          "regions cut to at most this (faster-whisper's collect_chunks); none: a "
                                          "window is a span of the file, its pauses kept (whisperX)")  # fmt: skip

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: expected a number in (0, 1), got {self.threshold!r}")
        if self.neg_threshold is not None and (
            not is_number(self.neg_threshold) or not 0.0 < self.neg_threshold <= self.threshold
        ):
            raise ValueError(f"neg_threshold: expected None or a number in (0, threshold={self.threshold}], "
                             f"got {self.neg_threshold!r}")  # fmt: skip
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0 (milliseconds), got {value!r}")
        if self.pack_gap_ms is not None and (not is_int(self.pack_gap_ms) or self.pack_gap_ms < 0):
            raise ValueError(f"pack_gap_ms: expected None or an int >= 0 (milliseconds), got {self.pack_gap_ms!r}")
        if self.trim_db is not None and (not is_number(self.trim_db) or self.trim_db <= 0):
            raise ValueError(f"trim_db: expected None or a number > 0 (decibels), got {self.trim_db!r}")
        if self.max_window_s is not None and (not is_number(self.max_window_s) or self.max_window_s <= 0):
            raise ValueError(f"max_window_s: expected None or a number of seconds > 0, got {self.max_window_s!r}")
        if self.merge not in (None, True, False):
            raise ValueError(f"merge: expected None, True or False, got {self.merge!r}")

    def pack_gap(self, sample_rate: int) -> int | None:
        """``pack_gap_ms`` in samples at ``sample_rate`` (None: windows are spans of the file)."""
        return None if self.pack_gap_ms is None else round(self.pack_gap_ms * sample_rate / 1000)
