"""The ONNX runner's audio front end (:class:`~mmformer.ship.onnx_runner.OnnxModel`), in numpy: waveforms resampled
as ``torchaudio.functional.resample`` does (:func:`sinc_resampler`, :func:`resample`) and the log-mel features of
:class:`mmformer.embedders.audio.LogMel` computed as ``export_config.json``'s ``audio.log_mel`` block states its steps
(:data:`LOG_MEL`, :func:`log_mel_rules`, :func:`log_mel_features`; docs/export.md).

Like the runner, it imports no torch and nothing of mmformer but :mod:`mmformer.preprocess.media` (torch-free), whose
:class:`~mmformer.preprocess.media.Resampler` the resampler is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmformer.preprocess.media import Resampler, check_resample


def sinc_resampler(orig_rate: int, new_rate: int, width: int = 6, rolloff: float = 0.99) -> Resampler:
    """Band-limited sinc interpolation with a Hann window, as ``torchaudio.functional.resample`` (its defaults), as
    a :class:`~mmformer.preprocess.media.Resampler`: its kernel built once for all the blocks of a file."""
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    base = min(orig, new) * rolloff
    half = math.ceil(width * orig / base)
    t = np.arange(0, -new, -1)[:, None] / new + np.arange(-half, half + orig)[None, :] / orig  # (new, 2 half + orig)
    t = np.clip(t * base, -width, width)
    window = np.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t) * window * base / orig

    def apply(wave: np.ndarray) -> np.ndarray:  # (..., S) → (..., ceil(S new / orig))
        padded = np.pad(wave.astype(np.float64), [(0, 0)] * (wave.ndim - 1) + [(half, half + orig)])
        blocks = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1], axis=-1)[..., ::orig, :]
        out = (blocks @ kernel.T).reshape(*wave.shape[:-1], -1)  # (..., n blocks · new)
        return out[..., : math.ceil(new * wave.shape[-1] / orig)].astype(np.float32)

    return Resampler(apply, half)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """``wave`` (..., S) resampled along its last axis (:func:`sinc_resampler`).

    Raises:
        ValueError: the rates need an enormous filter (:func:`~mmformer.preprocess.media.check_resample`).
    """
    if orig_rate == new_rate:
        return wave
    check_resample(orig_rate, new_rate, what="sample_rate")
    return sinc_resampler(orig_rate, new_rate).apply(wave)


# The ``audio.log_mel`` block of export_config.json (docs/export.md): LogMel's steps from waveforms to the audio graph's
# input, beside ``audio``'s sizes and mel_filters.npy; an export written before the block was made with these values.
LOG_MEL = {"window": "hann", "periodic": True, "center": True, "pad_mode": "reflect", "power": 2.0, "floor": 1e-10,
           "log": "log10", "decades": 8.0, "offset": 4.0, "scale": 4.0, "drop_last_frame": True}  # fmt: skip
LOG_MEL_FIXED = ("window", "periodic", "center", "pad_mode", "power", "log")  # the steps log_mel takes, no others


def log_mel_rules(block: dict[str, Any] | None) -> dict[str, Any]:
    """An export's ``audio.log_mel`` block, checked (a ValueError names a key missing or unknown, a step that
    :func:`log_mel_features` does not take, or a bad number); :data:`LOG_MEL` where it has none (written before it)."""
    if block is None:
        return dict(LOG_MEL)
    if not isinstance(block, dict) or set(block) != set(LOG_MEL):
        raise ValueError(f"audio.log_mel: expected the keys {sorted(LOG_MEL)}, got {block!r}")
    for name, value in block.items():
        if name in LOG_MEL_FIXED:
            ok, expected = value == LOG_MEL[name], f"{LOG_MEL[name]!r} (the only one this runner computes)"
        elif name == "drop_last_frame":
            ok, expected = isinstance(value, bool), "true or false"
        else:  # floor, decades, scale > 0; offset any
            ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 or name == "offset")
            expected = "a finite number" if name == "offset" else "a number > 0"
        if not ok:
            raise ValueError(f"audio.log_mel.{name}: expected {expected}, got {value!r}")
    return block


def log_mel_features(
    waves: Sequence[np.ndarray],
    audio: dict[str, Any],
    mel_filters: np.ndarray,
    rules: dict[str, Any],
    window: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms → log-mel features (B, M, Nf) float32 and frame counts (B,), as the model's LogMel computes
    them from the zero-padded batch, by an export's ``audio`` block (its ``n_fft`` and ``hop_length``), its filter
    bank ``mel_filters`` (n_fft/2 + 1, M) and its rules (:func:`log_mel_rules`): each row's frames are those
    of its waveform alone. With a fixed ``window`` (samples; 0: none) every waveform is zero-padded or cut to
    it, the frame past its end is dropped and the peak spans the whole window, as ``LogMel.forward`` does
    (Whisper's feature extractor)."""
    n_fft, hop = audio["n_fft"], audio["hop_length"]
    waves = [w[:window] for w in waves] if window else waves
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    batch = np.zeros((len(waves), window or int(lengths.max())), dtype=np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    if window:  # the whole window is the waveform, zeros included: reflected at its end (centre_pad, no lengths)
        lengths = np.full_like(lengths, window)
    # centred frames, each waveform reflected at its own end (as LogMel's centre_pad), not at the batch's
    pad = n_fft // 2
    n = lengths[:, None]  # (B, 1)
    k = np.arange(-pad, batch.shape[1] + pad)[None, :]  # (1, S + 2 pad): each padded sample's source
    source = np.minimum(np.maximum(np.where(k >= n, 2 * (n - 1) - k, np.abs(k)), 0), n - 1)  # (B, S + 2 pad)
    padded = np.where(k >= n + pad, 0.0, np.take_along_axis(batch, source, axis=1)).astype(np.float32)
    frames = batch.shape[1] // hop + 1
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]  # (Nf, n_fft)
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic Hann
    spectrum = np.fft.rfft(padded[:, index] * hann, axis=-1)  # (B, Nf, n_fft/2 + 1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = np.log10(np.maximum(power @ mel_filters, rules["floor"])).transpose(0, 2, 1)  # (B, M, Nf)
    n_frames = lengths // hop + 1
    if window and rules["drop_last_frame"]:  # the frame past the window's end is dropped (30 s → 3000 frames)
        mel, frames, n_frames = mel[..., :-1], frames - 1, n_frames - 1
    real = np.arange(frames)[None, :] < n_frames[:, None]  # (B, Nf)
    peak = np.where(real[:, None, :], mel, -np.inf).max(axis=(1, 2), keepdims=True)
    features = (np.maximum(mel, peak - rules["decades"]) + rules["offset"]) / rules["scale"]
    return features.astype(np.float32), n_frames
