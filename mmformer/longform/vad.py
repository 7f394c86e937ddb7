"""Voice activity: Silero VAD (the ``silero-vad`` package ships its ONNX model; nothing is downloaded) finds speech,
and whisperX's cut & merge turns the speech regions into windows no longer than the model's input.

Positions are sample indices at the model's rate; a region is ``(start, end)`` with ``end`` exclusive.

Shape legend: S samples, F energy frames.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmformer.values import is_int, is_number, option

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

VAD_RATE = 16000  # Silero runs at 16 kHz (or 8 kHz); other rates are resampled for it
VAD_FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
VAD_CONTEXT = 64  # samples of the previous frame Silero reads before each frame


@dataclass(frozen=True)
class VadOptions:
    """How speech is found and cut into windows: the one place these options, their defaults and their help live
    (the CLI derives its ``--vad-*`` flags from it). The defaults were measured on the shipped digits model (see
    tests/test_longform_vad.py and the report of issue #25); faster-whisper's own defaults (min_silence_ms=2000,
    speech_pad_ms=400) suit Whisper, which tolerates silence around speech."""

    threshold: float = option(0.5, "speech probability above which a 32-ms Silero frame is speech")
    neg_threshold: float | None = option(None, "probability below which speech ends (default: threshold - 0.15)")
    min_speech_ms: int = option(100, "speech regions shorter than this are dropped")
    min_silence_ms: int = option(250, "silence shorter than this does not end a speech region (the pause inside "
                                       "a spoken number reaches 200 ms)")  # fmt: skip
    speech_pad_ms: int = option(0, "silence kept before and after each speech region (faster-whisper's "
                                     "speech_pad_ms)")  # fmt: skip
    trim_db: float | None = option(40.0, "place each region's edges at its first and last sample within this many "
                                          "dB of its peak and above the noise between regions (then pad by "
                                          "speech_pad_ms); none: Silero's 32-ms edges")  # fmt: skip
    max_window_s: float | None = option(None, "longest window decoded at once (default: the model's input: "
                                               "Whisper's 30 s, else AudioConfig.max_frames)")  # fmt: skip
    merge: bool | None = option(None, "merge neighbouring regions into windows up to max_window_s (whisperX); "
                                       "default: only for a fixed-window model (Whisper)")  # fmt: skip

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
        if self.trim_db is not None and (not is_number(self.trim_db) or self.trim_db <= 0):
            raise ValueError(f"trim_db: expected None or a number > 0 (decibels), got {self.trim_db!r}")
        if self.max_window_s is not None and (not is_number(self.max_window_s) or self.max_window_s <= 0):
            raise ValueError(f"max_window_s: expected None or a number of seconds > 0, got {self.max_window_s!r}")
        if self.merge not in (None, True, False):
            raise ValueError(f"merge: expected None, True or False, got {self.merge!r}")


@dataclass(frozen=True)
class Window:
    """A stretch of one file decoded as one input: ``file`` indexes the inputs, ``start``/``end`` are samples, and
    ``regions`` the speech regions it holds (absolute samples)."""

    file: int
    start: int
    end: int
    regions: tuple[tuple[int, int], ...]

    @property
    def samples(self) -> int:
        return self.end - self.start


@functools.lru_cache(maxsize=1)
def silero_model() -> Any:
    """Silero VAD's ONNX model from the ``silero-vad`` wheel (loaded once per process)."""
    try:
        from silero_vad import load_silero_vad
    except ImportError as e:
        raise ImportError("VAD needs the silero-vad package (pip install silero-vad); or pass vad=False") from e
    return load_silero_vad(onnx=True)


def fixed_window(model: MultimodalTransformer) -> bool:
    """Whether the model reads a fixed window (Whisper's 30 s): every input costs the whole window."""
    return model.config.audio is not None and model.config.audio.pad_to_seconds is not None


def model_window_samples(model: MultimodalTransformer) -> int:
    """The longest waveform the model reads at once: Whisper's window, else what its position table covers."""
    audio = model.config.audio
    if audio is None:
        raise ValueError(f"transcription needs an audio model; this one has routes {sorted(model.config.routes)}")
    if audio.window_samples:
        return audio.window_samples
    return (audio.max_frames - 1) * audio.hop_length  # frames = samples // hop + 1 (centred STFT)


def window_samples(model: MultimodalTransformer, options: VadOptions, sample_rate: int) -> int:
    limit = model_window_samples(model)
    if options.max_window_s is not None:
        limit = min(limit, round(options.max_window_s * sample_rate))
    return limit


def noise_floor(wave: torch.Tensor, stamps: list[tuple[int, int]], sigmas: float = 5.0) -> float:
    """The level (absolute sample value) background noise stays under: ``sigmas`` standard deviations of the
    samples outside the speech ``stamps``, estimated robustly (median absolute value / 0.6745, so the speech
    onsets that Silero's frames miss barely move it). 0.0 when there is no such sample."""
    outside = torch.ones(wave.shape[0], dtype=torch.bool)
    for start, end in stamps:
        outside[start:end] = False
    x = wave[outside]
    if x.numel() == 0:
        return 0.0
    return sigmas * float(x.abs().median()) / 0.6745


def _trim(wave: torch.Tensor, start: int, end: int, trim_db: float, floor: float) -> tuple[int, int] | None:
    """The first and last sample of ``wave[start:end]`` within ``trim_db`` of its peak (absolute value) and above
    the noise ``floor``; None when no sample is."""
    x = wave[start:end].abs()  # (S,)
    peak = float(x.max()) if x.numel() else 0.0
    loud = (x > max(peak * 10 ** (-trim_db / 20), floor)).nonzero().flatten()
    if loud.numel() == 0:
        return None
    return start + int(loud[0]), start + int(loud[-1]) + 1


def speech_probabilities(waves: list[torch.Tensor]) -> list[list[float]]:
    """Silero's speech probability of each 32-ms frame of each 16-kHz waveform (S,), exactly as its
    ``get_speech_timestamps`` computes them frame after frame from a fresh state, but for all files at once and
    without the wrapper's per-frame tensor work: its ONNX session is called directly (the wrapper's own inputs:
    the frame after the previous frame's last 64 samples, the LSTM state, the rate), with a batch of one row per
    file (one state each; the shorter files padded at their end, past which nothing is read)."""
    if not waves:
        return []
    session = silero_model().session
    counts = [-(-w.shape[0] // VAD_FRAME) for w in waves]  # frames per file, the last zero-padded as Silero pads
    x = np.zeros((len(waves), VAD_CONTEXT + max(counts) * VAD_FRAME), dtype=np.float32)  # (K, 64 + frames * 512)
    for k, w in enumerate(waves):
        x[k, VAD_CONTEXT : VAD_CONTEXT + w.shape[0]] = w.float().numpy()
    state = np.zeros((2, len(waves), 128), dtype=np.float32)  # the wrapper's reset_states
    rate = np.array(VAD_RATE, dtype=np.int64)
    out = []
    for t in range(0, max(counts) * VAD_FRAME, VAD_FRAME):
        probs, state = session.run(None, {"input": x[:, t : t + VAD_CONTEXT + VAD_FRAME], "state": state, "sr": rate})
        out.append(probs)  # (K, 1)
    frames = np.concatenate(out, axis=1)  # (K, frames)
    return [frames[k, :n].tolist() for k, n in enumerate(counts)]


def speech_regions_many(
    waves: list[torch.Tensor], sample_rate: int, options: VadOptions | None = None
) -> list[list[tuple[int, int]]]:
    """:func:`speech_regions` of many waveforms, their Silero frames computed together."""
    from mmformer.data.io import resample

    for i, wave in enumerate(waves):
        if not isinstance(wave, torch.Tensor) or wave.ndim != 1 or not wave.is_floating_point():
            shape = getattr(wave, "shape", type(wave).__name__)
            raise ValueError(f"waves[{i}]: expected a 1-D float tensor (S,), got {shape}")
    vad_waves = [resample(w.float().cpu(), sample_rate, VAD_RATE) for w in waves]
    probs = speech_probabilities(vad_waves)
    return [
        _regions(w, p, v.shape[0], sample_rate, options or VadOptions()) for w, p, v in zip(waves, probs, vad_waves)
    ]


def speech_regions(wave: torch.Tensor, sample_rate: int, options: VadOptions | None = None) -> list[tuple[int, int]]:
    """Speech regions ``[(start, end), ...]`` (samples at ``sample_rate``, padded by ``speech_pad_ms``, in order and
    not overlapping) of a mono waveform (S,)."""
    return speech_regions_many([wave], sample_rate, options)[0]


def _regions(
    wave: torch.Tensor, probs: list[float], vad_samples: int, sample_rate: int, options: VadOptions
) -> list[tuple[int, int]]:
    """Silero's speech timestamps from its frame probabilities, edges placed on the signal (``trim_db``), padded."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    scale = sample_rate / VAD_RATE
    stamps = get_speech_timestamps_from_probs(
        probs,
        threshold=options.threshold,
        neg_threshold=options.neg_threshold,
        sampling_rate=VAD_RATE,
        min_speech_duration_ms=options.min_speech_ms,
        min_silence_duration_ms=options.min_silence_ms,
        speech_pad_ms=0 if options.trim_db is not None else options.speech_pad_ms,
        audio_length_samples=vad_samples,
    )
    wave = wave.float().cpu()
    spans = [(round(stamp["start"] * scale), round(stamp["end"] * scale)) for stamp in stamps]
    floor = noise_floor(wave, spans) if options.trim_db is not None else 0.0
    pad = round(options.speech_pad_ms * sample_rate / 1000)
    regions: list[tuple[int, int]] = []
    for start, end in spans:
        end = min(end, wave.shape[0])
        if options.trim_db is not None:
            # Silero's edges fall on 32-ms frames and lag the onset: search a frame either side, then place the edge
            # on the energy and pad it as speech_pad_ms says
            reach = round(0.064 * sample_rate)
            lo = max(start - reach, regions[-1][1] if regions else 0)
            trimmed = _trim(wave, lo, min(end + reach, wave.shape[0]), options.trim_db, floor)
            if trimmed is None:
                continue
            start, end = max(trimmed[0] - pad, lo), min(trimmed[1] + pad, wave.shape[0])
        if regions and start <= regions[-1][1]:  # padding made neighbours touch: one region
            regions[-1] = (regions[-1][0], max(end, regions[-1][1]))
        elif end > start:
            regions.append((start, end))
    return regions


def cut_and_merge(regions: list[tuple[int, int]], file: int, max_samples: int, merge: bool) -> list[Window]:
    """whisperX's cut & merge: a region longer than ``max_samples`` is cut into equal pieces that fit, and (with
    ``merge``) consecutive regions join one window while it spans at most ``max_samples``."""
    pieces: list[tuple[int, int]] = []
    for start, end in regions:
        n = math.ceil((end - start) / max_samples)
        bounds = [start + (end - start) * i // n for i in range(n + 1)]
        pieces += list(zip(bounds[:-1], bounds[1:]))
    windows: list[Window] = []
    for start, end in pieces:
        last = windows[-1] if windows else None
        if merge and last is not None and end - last.start <= max_samples:
            windows[-1] = Window(file, last.start, end, (*last.regions, (start, end)))
        else:
            windows.append(Window(file, start, end, ((start, end),)))
    return windows
