"""Decoding one image or one audio file, with a single error type for anything unreadable.

Both readers accept a path or the raw bytes of a file (as found inside a WebDataset shard); ``name`` is what
error messages call the sample. Anything that cannot be decoded raises :class:`SampleError`, which the datasets
catch to skip the sample (see :mod:`mmformer.data.skipping`); the :class:`~mmformer.Processor` lets it propagate.

Files are untrusted: what they claim does not decide how much memory or time decoding takes.

- An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89 million by default: PIL's decompression-bomb
  threshold, where PIL itself only warns) is refused before its pixels are decoded; set
  ``PIL.Image.MAX_IMAGE_PIXELS`` higher (or to None) to read bigger images.
- Audio is decoded block by block, so a header that lies about the length costs nothing; with ``max_seconds`` the
  rest of a long (or highly compressed) file is not decoded at all.
- Resampling between rates that share no large common divisor (e.g. 44101 Hz → 16 kHz) would need a sinc filter
  of gigabytes; it is refused (:func:`check_resample`) instead of running for minutes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image

from mmformer.io.atomic import write_text_atomic

# the errors are defined torch-free (the ONNX runner raises them too) and imported from here as before
from mmformer.preprocess.media import MissingSampleError, SampleError, check_file, upright  # noqa: F401

Source = str | os.PathLike | bytes  # a path, or a file's bytes (from a tar shard)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale (16-bit PNG/TIFF)
MAX_RESAMPLE_PHASES = 2**24  # (orig/gcd) * (new/gcd): 16 kHz from 44.1 kHz is 70,560; from 44101 Hz, 705,616,000
_AUDIO_BLOCK = 2**18  # samples (frames × channels) decoded per read
T = TypeVar("T")


def _describe(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _reason(error: BaseException) -> str:
    """A decoder's message without the repr it gives in-memory data ("cannot identify image file <_io.BytesIO object
    at 0x...>"): the sample's name says which input it was, and a message that differs per call is never deduplicated
    (a shard's bad member warned again every epoch); nor soundfile's "Error opening b'path': " before its reason."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(in memory)", str(error))
    return re.sub(r"^Error opening (b?'.*'|\(in memory\)): ", "", text)


def _open(source: Source, name: str) -> io.BufferedIOBase | str:
    """A file object for bytes, the path otherwise; a missing path becomes a SampleError."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes for {name}; got {type(source).__name__}")
    check_file(source, name)
    return os.fspath(source)


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)``, except that 16-bit grayscale is scaled to 8 bits (``v >> 8``, as torchvision reads
    16-bit PNGs) rather than clipped at 255 by PIL, which would turn most of a 16-bit image white."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    return img.convert(mode)


def read_image(source: Source, mode: str = "RGB", *, name: str | None = None) -> Image.Image:
    """Decode an image fully (so truncation is detected here, not later), turn it upright (its EXIF orientation:
    :func:`~mmformer.preprocess.media.upright`) and convert it to ``mode``.

    Images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused before decoding (see the module notes).

    Args:
        source: path or encoded bytes.
        mode: PIL mode to convert to, ``"RGB"`` or ``"L"`` (grayscale).
        name: how messages name the sample; defaults to the path.
    """
    name = _describe(source, name)
    fp = _open(source, name)
    try:
        with Image.open(fp) as img:
            if img.width == 0 or img.height == 0:
                raise SampleError(name, f"image has no pixels ({img.width}×{img.height})")
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise SampleError(
                    name,
                    f"image of {img.width}×{img.height} = {img.width * img.height} pixels is larger than "
                    f"PIL.Image.MAX_IMAGE_PIXELS={limit} (a possible decompression bomb); raise that limit to read it",
                )
            img.load()
            return convert_image(upright(img), mode)
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise SampleError(name, f"cannot decode image ({type(e).__name__}: {_reason(e)})") from e


def read_each(sources: Sequence[T], read: Callable[[T], object], what: str) -> tuple[list, dict[int, str]]:
    """``read`` of each source, skipping the ones it refuses: one unreadable file in a list costs only its own result.

    A source ``read`` refuses with a :class:`SampleError` is None in the returned list, its message (naming it) is
    under its index in the returned dict, and a warning ``"{what}: skipped ..."`` says so as it happens. The commands
    that read lists of files (``mmformer caption``, ``zeroshot``) then give the others' results and exit non-zero
    naming the skipped ones, as ``transcribe`` does.
    """
    values: list = []
    errors: dict[int, str] = {}
    for i, source in enumerate(sources):
        try:
            values.append(read(source))
        except SampleError as e:
            warnings.warn(f"{what}: skipped {e}", stacklevel=2)
            values.append(None)
            errors[i] = str(e)
    return values, errors


def check_resample(orig_rate: int, new_rate: int, what: str = "sample rate") -> None:
    """Raise ValueError if resampling ``orig_rate`` → ``new_rate`` Hz would need an enormous sinc filter.

    torchaudio's exact resampler builds a (new/g) × (orig/g) polyphase kernel, g = gcd of the rates: tiny for the
    usual rates (8, 11.025, 16, 22.05, 44.1, 48 kHz ...), gigabytes and minutes for rates that share no large divisor.
    """
    g = math.gcd(int(orig_rate), int(new_rate))
    phases = (int(orig_rate) // g) * (int(new_rate) // g)
    if phases > MAX_RESAMPLE_PHASES:
        raise ValueError(
            f"{what}: cannot resample {orig_rate} Hz to {new_rate} Hz: the rates share no large common divisor (gcd "
            f"{g}), so exact resampling would need a {phases:,}-phase filter (gigabytes, minutes); resample the audio "
            "to a standard rate (e.g. 16000, 22050, 44100 or 48000 Hz) first"
        )


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last dimension (torchaudio's sinc interpolation).

    Raises:
        ValueError: the rates need an enormous filter (see :func:`check_resample`).
    """
    if orig_rate == new_rate:
        return wave
    check_resample(orig_rate, new_rate)
    return AF.resample(wave, int(orig_rate), int(new_rate))


def truncate_audio(
    wave: torch.Tensor, rate: int, max_seconds: float | None, name: str, seconds: float | None = None
) -> torch.Tensor:
    """Cut ``wave`` (..., S) at ``rate`` Hz to ``max_seconds``, with a warning naming the sample.

    Args:
        seconds: the full duration, for the warning, when ``wave`` was already cut while decoding.
    """
    limit = None if max_seconds is None else int(round(max_seconds * rate))
    if limit is None or wave.shape[-1] <= limit:
        return wave
    seconds = wave.shape[-1] / rate if seconds is None else seconds
    # to the sample: a file one sample over read "1.0 s of audio is longer than max_seconds=1.0" at one decimal
    warnings.warn(
        f"{name}: {round(seconds, 6)} s of audio is longer than max_seconds={max_seconds} ({round(seconds * rate)} "
        f"samples at {rate} Hz, more than {limit}); truncated",
        stacklevel=3,
    )
    return wave[..., :limit]


def read_audio(
    source: Source,
    sample_rate: int | None = None,
    *,
    mono: bool = True,
    name: str | None = None,
    max_seconds: float | None = None,
):
    """Decode an audio file with soundfile to float32 in [-1, 1].

    Args:
        source: path or encoded bytes (FLAC, WAV, OGG, ... whatever libsndfile reads).
        sample_rate: resample to this rate; ``None`` keeps the file's rate.
        mono: average the channels into one waveform ``(S,)``; otherwise return ``(C, S)``.
        name: how messages name the sample; defaults to the path.
        max_seconds: keep at most this much audio: longer files are truncated with a warning, and the part past
            the cut (beyond a short margin that keeps the resampled cut exact) is never decoded.

    Returns:
        ``(waveform, rate)`` where ``rate`` is the rate of the returned waveform.
    """
    import soundfile  # here, so that models, training and benchmarks import without it until audio files are read

    name = _describe(source, name)
    fp = _open(source, name)
    try:
        # a path as bytes: soundfile encodes a str strictly, and a name that is not UTF-8 (a Latin-1 "café.wav",
        # held by Python with surrogate escapes) could not be opened
        with soundfile.SoundFile(os.fsencode(fp) if isinstance(fp, str) else fp) as f:
            expected, rate, channels = f.frames, f.samplerate, f.channels
            file_rate = rate
            if rate <= 0:
                raise SampleError(name, f"invalid sample rate {rate} Hz in the header")
            # Decoding in blocks keeps memory proportional to the data: one read of f.frames would allocate
            # whatever the header claims (a FLAC header may claim 2**36 frames).
            limit = None if max_seconds is None else math.ceil(max_seconds * rate) + rate // 10 + 1
            block = max(1, _AUDIO_BLOCK // max(1, channels))
            blocks, n_read = [], 0
            while limit is None or n_read < limit:
                part = f.read(block if limit is None else min(block, limit - n_read), dtype="float32", always_2d=True)
                if len(part) == 0:
                    break
                blocks.append(part)
                n_read += len(part)
    except SampleError:
        raise
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError, EOFError, MemoryError) as e:
        raise SampleError(name, f"cannot decode audio ({type(e).__name__}: {_reason(e)})") from e
    cut = limit is not None and n_read >= limit  # stopped before the end of the file
    if n_read == 0:
        raise SampleError(name, "audio has no samples")
    if not cut and expected > 0 and n_read < expected:
        raise SampleError(name, f"truncated audio: header says {expected} frames, read {n_read}")
    data = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]  # (S, C)
    if not np.isfinite(data).all():
        raise SampleError(name, "audio contains NaN or infinite values")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, S)
    if mono:
        wave = wave.mean(dim=0)  # (S,)
    if sample_rate is not None and sample_rate != rate:
        try:
            check_resample(rate, sample_rate, what="audio")
        except ValueError as e:
            raise SampleError(name, str(e)) from e
        wave = resample(wave, rate, sample_rate)
        rate = sample_rate
    if max_seconds is not None:
        wave = truncate_audio(wave, rate, max_seconds, name, seconds=expected / file_rate if cut else None)
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
