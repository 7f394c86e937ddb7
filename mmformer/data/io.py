"""Decoding one image or one audio file, with a single error type for anything unreadable.

Both readers accept a path or the raw bytes of a file (as found inside a WebDataset shard); ``name`` is what
error messages call the sample. Anything that cannot be decoded raises :class:`SampleError`, which the datasets
catch to skip the sample (see :mod:`mmformer.data.skipping`); the :class:`~mmformer.Processor` lets it propagate.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
from PIL import Image

Source = str | os.PathLike | bytes  # a path, or a file's bytes (from a tar shard)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus")


class SampleError(Exception):
    """A sample that cannot be used: missing or corrupt file, empty text, ...

    Attributes:
        path: the file (or sample name) at fault.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _describe(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _open(source: Source, name: str) -> io.BufferedIOBase | str:
    """A file object for bytes, the path otherwise; a missing path becomes a SampleError."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes for {name}; got {type(source).__name__}")
    if not Path(source).is_file():
        raise SampleError(name, "file not found")
    return os.fspath(source)


def read_image(source: Source, mode: str = "RGB", *, name: str | None = None) -> Image.Image:
    """Decode an image fully (so truncation is detected here, not later) and convert it to ``mode``.

    Args:
        source: path or encoded bytes.
        mode: PIL mode to convert to, ``"RGB"`` or ``"L"`` (grayscale).
        name: how messages name the sample; defaults to the path.
    """
    name = _describe(source, name)
    fp = _open(source, name)
    try:
        with Image.open(fp) as img:
            img.load()
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise SampleError(name, f"cannot decode image ({type(e).__name__}: {e})") from e


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last dimension (torchaudio's sinc interpolation)."""
    if orig_rate == new_rate:
        return wave
    return AF.resample(wave, int(orig_rate), int(new_rate))


def read_audio(source: Source, sample_rate: int | None = None, *, mono: bool = True, name: str | None = None):
    """Decode an audio file with soundfile to float32 in [-1, 1].

    Args:
        source: path or encoded bytes (FLAC, WAV, OGG, ... whatever libsndfile reads).
        sample_rate: resample to this rate; ``None`` keeps the file's rate.
        mono: average the channels into one waveform ``(S,)``; otherwise return ``(C, S)``.
        name: how messages name the sample; defaults to the path.

    Returns:
        ``(waveform, rate)`` where ``rate`` is the rate of the returned waveform.
    """
    name = _describe(source, name)
    fp = _open(source, name)
    try:
        with soundfile.SoundFile(fp) as f:
            expected = f.frames
            rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # (S, C)
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError, EOFError) as e:
        raise SampleError(name, f"cannot decode audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise SampleError(name, "audio has no samples")
    if expected > 0 and data.shape[0] < expected:
        raise SampleError(name, f"truncated audio: header says {expected} frames, read {data.shape[0]}")
    if not np.isfinite(data).all():
        raise SampleError(name, "audio contains NaN or infinite values")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, S)
    if mono:
        wave = wave.mean(dim=0)  # (S,)
    if sample_rate is not None:
        wave = resample(wave, rate, sample_rate)
        rate = sample_rate
    return wave, rate


def read_text(source: Source, *, name: str | None = None) -> str:
    """UTF-8 text, stripped; empty text is a SampleError (a caption or transcript is required)."""
    name = _describe(source, name)
    fp = _open(source, name)
    try:
        raw = source if isinstance(source, bytes) else Path(fp).read_bytes()
        text = raw.decode("utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        raise SampleError(name, f"cannot read text ({type(e).__name__}: {e})") from e
    if not text:
        raise SampleError(name, "empty text")
    return text


def clean_text(value: object, name: str) -> str:
    """A caption/transcript field from a manifest: must be a non-empty string."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise SampleError(name, "missing text")
    if not isinstance(value, str):
        raise SampleError(name, f"text must be a string; got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise SampleError(name, "empty text")
    return text


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON to a temporary file beside ``path`` and move it into place: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
