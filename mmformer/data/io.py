"""Decoding one image or one audio file, with a single error type for anything unreadable.

Both readers accept a path or the raw bytes of a file (as found inside a WebDataset shard); ``name`` is what
error messages call the sample. Anything that cannot be decoded raises :class:`SampleError`, which the datasets
catch to skip the sample (see :mod:`mmformer.data.skipping`); the :class:`~mmformer.Processor` lets it propagate.

How a file is read — decoded fully, checked, upright, 16-bit images scaled, audio decoded block by block into one
output, untrusted sizes bounded — is :mod:`mmformer.preprocess.media`'s, torch-free, so that the ONNX runner reads by
the same rules; its readers are re-exported here, and :func:`read_audio` adds torchaudio's resampler and returns
a tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
import torchaudio.transforms

from mmformer.io.atomic import write_text_atomic

# the media rules are torch-free (the ONNX runner reads by them too) and imported from here as before
from mmformer.preprocess.media import (  # noqa: F401
    MAX_RESAMPLE_PHASES,
    SIXTEEN_BIT_MODES,
    AudioTooLongError,
    MissingSampleError,
    Resampler,
    SampleError,
    Source,
    check_file,
    check_resample,
    convert_image,
    decode_audio,
    open_source,
    read_each,
    read_image,
    source_name,
    truncate_audio,
    upright,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus")


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last dimension (torchaudio's sinc interpolation).

    Raises:
        ValueError: the rates need an enormous filter (see :func:`check_resample`).
    """
    if orig_rate == new_rate:
        return wave
    check_resample(orig_rate, new_rate)
    return AF.resample(wave, int(orig_rate), int(new_rate))


def sinc_resampler(orig_rate: int, new_rate: int) -> Resampler:
    """torchaudio's resampling (:func:`resample`'s) as a :class:`~mmformer.preprocess.media.Resampler` of numpy
    arrays, its kernel built once for all the blocks of a file."""
    transform = torchaudio.transforms.Resample(int(orig_rate), int(new_rate), dtype=torch.float32)
    return Resampler(lambda x: transform(torch.from_numpy(x)).numpy(), transform.width)


def read_audio(
    source: Source,
    sample_rate: int | None = None,
    *,
    mono: bool = True,
    name: str | None = None,
    max_seconds: float | None = None,
    refuse_longer_than: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Decode an audio file to float32 in [-1, 1], resampled with torchaudio: the rules, arguments and errors of
    :func:`~mmformer.preprocess.media.decode_audio` (decoded block by block, each block mixed to mono and resampled
    as it arrives: memory is the result's size).

    Args:
        source: path or encoded bytes (FLAC, WAV, OGG, ... whatever libsndfile reads).
        sample_rate: resample to this rate; ``None`` keeps the file's rate.
        mono: average the channels into one waveform ``(S,)``; otherwise return ``(C, S)``.
        name: how messages name the sample; defaults to the path.
        max_seconds: keep at most this much audio: longer files are truncated with a warning, and the part past
            the cut (beyond a short margin that keeps the resampled cut exact) is never decoded.
        refuse_longer_than: seconds; a longer file is refused (:class:`AudioTooLongError`), decoded no further.

    Returns:
        ``(waveform, rate)`` where ``rate`` is the rate of the returned waveform.
    """
    wave, rate = decode_audio(source, sample_rate, resampler=sinc_resampler, mono=mono, name=name,
                              max_seconds=max_seconds, refuse_longer_than=refuse_longer_than)  # fmt: skip
    return torch.from_numpy(wave), rate


def read_text(source: Source, *, name: str | None = None) -> str:
    """UTF-8 text, stripped; empty text is a SampleError (a caption or transcript is required)."""
    name = source_name(source, name)
    fp = open_source(source, name)
    try:
        raw = Path(fp).read_bytes() if isinstance(fp, str) else fp.read()  # a path, or the bytes / a pipe read in
        text = raw.decode("utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        raise SampleError(name, f"cannot read text ({type(e).__name__}: {e})") from e
    if not text:
        raise SampleError(name, "empty text")
    return text


def _absent(value: object) -> bool:
    """No value at all: None, or the NaN of an empty cell."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def is_missing_text(value: object) -> bool:
    """A row without a text (none, an empty cell, or a blank string), as prediction data may have; unlike a bad text
    (not a string, not UTF-8), which is an error wherever it is."""
    return _absent(value) or (isinstance(value, str) and not value.strip())


def is_valid_text(value: object) -> bool:
    """A usable caption: a string that is not blank and holds no undecodable bytes (see :func:`clean_text`)."""
    try:
        clean_text(value, "")
    except SampleError:
        return False
    return True


def clean_text(value: object, name: str) -> str:
    """A caption/transcript field from a manifest: must be a non-empty string.

    Index files are read with ``errors="surrogateescape"``, so that one row with bytes that are not UTF-8 does not
    stop the whole data set: such a text holds lone surrogates and is refused here, naming the sample.
    """
    if _absent(value):
        raise SampleError(name, "missing text")
    if not isinstance(value, str):
        raise SampleError(name, f"text must be a string; got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start : e.end].encode("utf-8", "surrogateescape")
        raise SampleError(name, f"text is not valid UTF-8 (bytes {bad!r} at character {e.start})") from e
    text = value.strip()
    if not text:
        raise SampleError(name, "empty text")
    return text


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON to a temporary file beside ``path`` and move it into place: never a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
