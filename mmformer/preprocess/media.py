"""Media files without torch: the error an unusable sample raises, which modality a file holds, and how an image or
an audio file is read — fully decoded, checked, turned upright, 16-bit grayscale scaled, audio decoded block by block
into one output (mixed to mono and resampled as the blocks arrive).

These live here, not in :mod:`mmformer.data.io` (which imports torch, re-exports them and adds torchaudio's
resampler), so that the torch-free ONNX runner (:mod:`mmformer.ship.onnx_runner`, with its numpy resampler) reads
files by the same rules as the :class:`~mmformer.Processor`, the ``mmformer`` commands and the server: one owner
of how a media file is read.

Two rules of text live here too, for the same reason: the runner cannot import the torch-side
:class:`~mmformer.preprocess.tokenizer.Tokenizer`, and both must refuse text that is not valid Unicode
(:func:`check_unicode`) and read a tokenizer.json at any path (:func:`read_tokenizer_json`) alike.

Files are untrusted: what they claim does not decide how much memory or time decoding takes.

- An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89 million by default: PIL's decompression-bomb
  threshold, where PIL itself only warns) is refused before its pixels are decoded; set
  ``PIL.Image.MAX_IMAGE_PIXELS`` higher (or to None) to read bigger images.
- Audio is decoded block by block, so a header that lies about the length costs nothing; each block is mixed to mono
  and resampled as it arrives, so memory is the result's size (not several copies of the file at its own rate and
  channels); with ``max_seconds`` the rest of a long (or highly compressed) file is not decoded at all, and with
  ``refuse_longer_than`` a longer file is refused (:class:`AudioTooLongError`) without decoding past the limit.
- Resampling between rates that share no large common divisor (e.g. 44101 Hz → 16 kHz) would need a sinc filter
  of gigabytes; it is refused (:func:`check_resample`) before anything is decoded.
"""

from __future__ import annotations

import codecs
import functools
import io
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps

Source = str | os.PathLike | bytes  # a path, or a file's bytes (from a tar shard, an upload)
T = TypeVar("T")

# Other names of libsndfile's formats (AIFF, OGG), and .m4a: audio libsndfile does not decode (AAC in MP4), which
# then fails as audio ("format not recognised"), not as an image PIL cannot identify.
AUDIO_SUFFIX_ALIASES = (".aif", ".aifc", ".opus", ".oga", ".m4a")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale (16-bit PNG/TIFF)
MAX_RESAMPLE_PHASES = 2**24  # (orig/gcd) * (new/gcd): 16 kHz from 44.1 kHz is 70,560; from 44101 Hz, 705,616,000
AUDIO_BLOCK = 2**18  # samples (frames × channels) decoded per read
EMPTY_FILE = "empty file (0 bytes)"
UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count of a stream whose length its header leaves open (FLAC's 0)


class SampleError(ValueError):
    """A sample that cannot be used: corrupt file, empty text, ... (a ``ValueError``, as Python's readers raise for
    undecodable input; a missing file is a :class:`MissingSampleError`, also a ``FileNotFoundError``).

    Attributes:
        path: the file (or sample name) at fault.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:  # FileNotFoundError would format its (errno, strerror) instead
        return f"{self.path}: {self.reason}"


class MissingSampleError(SampleError, FileNotFoundError):
    """A sample whose file does not exist: caught by ``except FileNotFoundError`` (and ``OSError``) as well as by
    ``except SampleError`` / ``ValueError``."""

    def __init__(self, path: str | os.PathLike, reason: str = "file not found"):
        super().__init__(path, reason)


class AudioTooLongError(SampleError):
    """Audio longer than a reader's ``refuse_longer_than`` (the server's ``--max-audio-seconds``): refused, not cut,
    and decoded no further than the limit.

    Attributes:
        limit_seconds: the limit.
        seconds: the length the file's header claims, or None where the header does not say and decoding found it
            longer.
    """

    def __init__(self, path: str | os.PathLike, limit_seconds: float, seconds: float | None):
        self.limit_seconds, self.seconds = limit_seconds, seconds
        claimed = f"{seconds:.1f} s" if seconds is not None else "more than that"
        super().__init__(path, f"audio is longer than the limit of {limit_seconds:g} s ({claimed})")


def check_file(path: str | os.PathLike, name: str) -> os.stat_result:
    """The ``os.stat`` of a path to read, refusing one that is no file to read (missing, a folder:
    :class:`MissingSampleError`), an empty regular file (:class:`SampleError`: the decoders would only say "format not
    recognised") and a path the system cannot look up, for the reason it gives: a name the file system encoding cannot
    spell (a manifest's "é" under an ASCII locale), no permission, a loop of links, ... (:class:`SampleError`).

    Any existing path that is not a folder is readable: a pipe (``/dev/stdin``, bash's ``<(cat x.png)``) or a device
    too; :func:`open_source` reads those into memory."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingSampleError(name) from None
    except UnicodeEncodeError as e:  # Path.is_file() says False for this; the file may well be there
        raise SampleError(
            name,
            f"the path cannot be spelled in the file system encoding {sys.getfilesystemencoding()!r} ("
            f"{e.object[e.start : e.end]!r} at character {e.start}); use a UTF-8 locale or set PYTHONUTF8=1",
        ) from None
    except OSError as e:
        raise SampleError(name, f"cannot look the file up ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise MissingSampleError(name, "a folder, not a file")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise SampleError(name, EMPTY_FILE)
    return info


def source_name(source: Source, name: str | None) -> str:
    """How messages name a sample: ``name`` if given, else its path (``<bytes>`` for data in memory)."""
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def open_source(source: Source, name: str) -> io.BufferedIOBase | str:
    """A file object for bytes and for a path that is no regular file (a pipe: read into memory here, once, as the
    decoders seek), the path otherwise; a missing path, and an empty file or no bytes (the same message for both:
    :func:`check_file`'s), become a SampleError naming ``name``."""
    if isinstance(source, bytes):
        if not source:
            raise SampleError(name, EMPTY_FILE)
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes for {name}; got {type(source).__name__}")
    if stat.S_ISREG(check_file(source, name).st_mode):
        return os.fspath(source)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:  # a socket, a device that refuses reads, ...
        raise SampleError(name, f"cannot read ({e.strerror or e})") from None
    return open_source(data, name)


def library_reason(error: BaseException) -> str:
    """A decoder's message without the repr it gives in-memory data ("cannot identify image file <_io.BytesIO object
    at 0x...>"): the sample's name says which input it was, and a message that differs per call is never deduplicated
    (a shard's bad member warned again every epoch); nor soundfile's "Error opening b'path': " before its reason."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(in memory)", str(error))
    return re.sub(r"^Error opening (b?'.*'|\(in memory\)): ", "", text)


@functools.cache
def audio_suffixes() -> frozenset[str]:
    """Suffixes of audio files: one per format soundfile reads (``soundfile.available_formats()``: .wav, .flac,
    .ogg, .mp3, .aiff, .au, .caf, .w64, ...) and :data:`AUDIO_SUFFIX_ALIASES`; not .raw (headerless samples: nothing
    says they are audio, and camera raw images share the name)."""
    import soundfile  # here: reading images needs no libsndfile

    formats = {f".{name.lower()}" for name in soundfile.available_formats() if name != "RAW"}
    return frozenset(formats | set(AUDIO_SUFFIX_ALIASES))


def file_modality(path: str | os.PathLike, hint: str = "") -> str:
    """``"audio"`` or ``"image"``: what a file holds, for the commands that take both (``mmformer zeroshot
    --modality auto``, the ONNX runner). Its suffix decides where soundfile (:func:`audio_suffixes`) or PIL registers
    it; otherwise (a suffix neither knows, or none) its content: a header soundfile reads is audio, else one PIL
    identifies is an image.

    Args:
        hint: what the caller's user can do instead, added to the error (e.g. "pass --modality").

    Raises:
        MissingSampleError: a suffix neither knows, and no such file.
        SampleError: a file neither soundfile nor PIL reads, or a pipe without a suffix; the message names it.
    """
    suffix = Path(path).suffix.lower()
    if suffix in audio_suffixes():
        return "audio"
    if suffix in Image.registered_extensions():
        return "image"
    if not stat.S_ISREG(check_file(path, str(path)).st_mode):  # a pipe can be read once: by the reader, not here
        reason = "not a regular file (a pipe?), so its kind is not guessed from its content, which reading uses up"
        raise SampleError(path, f"{reason}; {hint}" if hint else reason)
    import soundfile

    try:
        soundfile.info(os.fsencode(path))  # bytes: a name that is not UTF-8 opens too (as read_audio opens it)
        return "audio"
    except (soundfile.SoundFileError, RuntimeError, OSError):
        pass
    try:
        with Image.open(path):
            return "image"
    except Image.DecompressionBombError:  # an image, too big to read: read_image says so
        return "image"
    except (OSError, ValueError, SyntaxError, EOFError):
        pass
    reason = "neither audio soundfile reads nor an image PIL reads"
    raise SampleError(path, f"{reason}; {hint}" if hint else reason)


def read_each(
    sources: Sequence[T], read: Callable[[T], object], what: str | None = None
) -> tuple[list, dict[int, str]]:
    """``read`` of each source, skipping the ones it refuses: one unreadable file in a list costs only its own result.

    A source ``read`` refuses with a :class:`SampleError` is None in the returned list and its message (naming it) is
    under its index in the returned dict; with ``what``, a warning ``"{what}: skipped ..."`` says so as it happens.
    The commands that read lists of files (``mmformer caption``, ``zeroshot``, the ONNX runner's) then give the
    others' results and exit non-zero naming the skipped ones, as ``transcribe`` does.
    """
    values: list = []
    errors: dict[int, str] = {}
    for i, source in enumerate(sources):
        try:
            values.append(read(source))
        except SampleError as e:
            if what is not None:
                warnings.warn(f"{what}: skipped {e}", stacklevel=2)
            values.append(None)
            errors[i] = str(e)
    return values, errors


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned the way its EXIF orientation tag says, in place: a phone stores a photo's pixels as its
    sensor read them (a portrait sideways) and the turn in the tag, which viewers, browsers and transformers'
    ``load_image`` apply. An image without the tag is left as it is, uncopied."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


# ---------------------------------------------------------------------------------------------------- text
def check_unicode(text: str, name: str) -> None:
    """Refuse (ValueError naming ``name``) a str that is not valid Unicode: one holding an unpaired surrogate, as
    Python makes of bytes that are not UTF-8 in a command line, a file name or a file read with
    ``errors="surrogateescape"`` (any non-ASCII byte under a non-UTF-8 locale). Tokenizers' encoders refuse such a
    string with a bare TypeError naming nothing, and ftfy (CLIP's cleaning) would turn it into U+FFFD unseen."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = text if len(text) <= 40 else text[:40] + "..."
        encoding = codecs.lookup(sys.getfilesystemencoding()).name  # not UTF-8: any non-ASCII argv ends up so
        locale = "" if encoding == "utf-8" else f"; the locale's encoding is {encoding}: PYTHONUTF8=1 reads UTF-8"
        raise ValueError(
            f"{name}: expected valid Unicode text; got {shown!r}, with an unpaired surrogate "
            f"{text[e.start : e.end]!r} at character {e.start} (undecodable bytes?){locale}"
        ) from None


def read_tokenizer_json(path: str | os.PathLike) -> Any:
    """The ``tokenizers.Tokenizer`` a tokenizer.json holds, its bytes read by Python: ``Tokenizer.from_file`` takes
    the path as UTF-8 text and cannot open one whose name Python holds with surrogate escapes (a folder named
    "modèle" under a non-UTF-8 locale); ``Path.read_bytes`` opens any path.

    Raises:
        ValueError: the file is not UTF-8, or not a tokenizer.json the installed ``tokenizers`` reads (naming it).
        OSError: the file cannot be read.
    """
    import tokenizers  # here: reading media needs no tokenizer

    data = Path(path).read_bytes()
    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise ValueError(f"path {os.fspath(path)!r} is not a valid tokenizer.json: {e}") from e


# ---------------------------------------------------------------------------------------------------- images
def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)``, except that 16-bit grayscale is scaled to 8 bits (``v >> 8``, as torchvision reads
    16-bit PNGs) rather than clipped at 255 by PIL, which would turn most of a 16-bit image white."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    return img.convert(mode)


def read_image(source: Source, mode: str = "RGB", *, name: str | None = None) -> Image.Image:
    """Decode an image fully (so truncation is detected here, not later), turn it upright (its EXIF orientation:
    :func:`upright`) and convert it to ``mode`` (:func:`convert_image`).

    Images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused before decoding (see the module notes).

    Args:
        source: path or encoded bytes.
        mode: PIL mode to convert to, ``"RGB"`` or ``"L"`` (grayscale).
        name: how messages name the sample; defaults to the path.

    Raises:
        SampleError: the file cannot be decoded, or is too big; :class:`MissingSampleError` where it does not exist.
    """
    name = source_name(source, name)
    fp = open_source(source, name)
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
        raise SampleError(name, f"cannot decode image ({type(e).__name__}: {library_reason(e)})") from e


# ---------------------------------------------------------------------------------------------------- audio
def check_resample(orig_rate: int, new_rate: int, what: str = "sample rate") -> None:
    """Raise ValueError if resampling ``orig_rate`` → ``new_rate`` Hz would need an enormous sinc filter.

    torchaudio's exact resampler (and the ONNX runner's numpy one) builds a (new/g) × (orig/g) polyphase kernel, g =
    gcd of the rates: tiny for the usual rates (8, 11.025, 16, 22.05, 44.1, 48 kHz ...), gigabytes and minutes for
    rates that share no large divisor.
    """
    g = math.gcd(int(orig_rate), int(new_rate))
    phases = (int(orig_rate) // g) * (int(new_rate) // g)
    if phases > MAX_RESAMPLE_PHASES:
        raise ValueError(
            f"{what}: cannot resample {orig_rate} Hz to {new_rate} Hz: the rates share no large common divisor (gcd "
            f"{g}), so exact resampling would need a {phases:,}-phase filter (gigabytes, minutes); resample the audio "
            "to a standard rate (e.g. 16000, 22050, 44100 or 48000 Hz) first"
        )


def truncate_audio(wave: Any, rate: int, max_seconds: float | None, name: str, seconds: float | None = None) -> Any:
    """Cut ``wave`` (..., S) at ``rate`` Hz (a numpy array or a tensor) to ``max_seconds``, with a warning naming the
    sample.

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


@dataclass(frozen=True)
class Resampler:
    """A band-limited resampler of whole signals from one rate to another, working as torchaudio's sinc resampling
    does: with the rates reduced by their gcd to ``orig`` → ``new``, output block i (``new`` samples) reads the input
    samples ``[i·orig - width, (i + 1)·orig + width)`` (zeros outside the signal), and S input samples give
    ``ceil(S · new / orig)``.

    Attributes:
        apply: (C, S) float32 → (C, ceil(S · new / orig)) float32.
        width: the filter's reach each side, in input samples (torchaudio's ``width``).
    """

    apply: Callable[[np.ndarray], np.ndarray]
    width: int


MakeResampler = Callable[[int, int], Resampler]  # (orig_rate, new_rate) → their Resampler


class StreamResampler:
    """Resample a signal block by block as it arrives, giving what its :class:`Resampler` gives the whole signal
    (to float rounding): each :meth:`push` resamples the output blocks whose input has all arrived, from the input
    they read — so it keeps only the filter's left reach (rounded up to whole input blocks) and the newest block,
    never the signal."""

    def __init__(self, resampler: Resampler, orig_rate: int, new_rate: int):
        g = math.gcd(orig_rate, new_rate)
        self.resampler, self.orig, self.new = resampler, orig_rate // g, new_rate // g
        self.context = -(-resampler.width // self.orig)  # input blocks that cover the filter's left reach
        self.pending: np.ndarray | None = None  # (C, n): the input from input block `first` on
        self.first = 0
        self.done = 0  # output blocks given
        self.received = 0  # input samples received

    def push(self, x: np.ndarray) -> np.ndarray:
        """(C, n) more input samples → (C, k · new) the output they complete (k may be 0)."""
        self.pending = x if self.pending is None else np.concatenate([self.pending, x], axis=1)
        self.received += x.shape[1]
        width = self.resampler.width
        ready = max(0, (self.received - width) // self.orig)  # output blocks whose input (right reach too) is here
        if ready <= self.done:
            return self.pending[:, :0]
        first = self.first
        out = self.resampler.apply(self.pending[:, : (ready - first) * self.orig + width])
        out = out[:, (self.done - first) * self.new : (ready - first) * self.new]
        self.first = ready - self.context if ready > self.context else 0
        self.pending = self.pending[:, (self.first - first) * self.orig :]
        self.done = ready
        return out

    def finish(self) -> np.ndarray:
        """(C, rest) the output after the last push, the signal ending there (zeros past it, as a whole signal's)."""
        if self.pending is None:
            return np.zeros((1, 0), np.float32)
        return self.resampler.apply(self.pending)[:, (self.done - self.first) * self.new :]


class _Output:
    """The decoded (resampled) samples, written block by block into one (S, C) float32 buffer: sized by the
    header's claim, never past a first allocation of ``INITIAL`` rows before the samples arrive (a header may claim
    2**36 frames), then grown in doublings that stop at the claim — in place where the allocator can (realloc)."""

    INITIAL = 2**24  # rows: 64 MB of mono float32, 17 min at 16 kHz

    def __init__(self, channels: int, claimed: int | None):
        self.claimed = claimed
        self.data = np.empty((min(claimed or self.INITIAL, self.INITIAL), channels), np.float32)
        self.n = 0

    def write(self, chunk: np.ndarray) -> None:
        """Append (C, k) samples."""
        end = self.n + chunk.shape[1]
        if end > len(self.data):
            size = max(end, 2 * len(self.data))
            if self.claimed is not None and end <= self.claimed:
                size = min(size, self.claimed)
            self.data.resize((size, self.data.shape[1]), refcheck=False)  # nothing else refers to it
        self.data[self.n : end] = chunk.T
        self.n = end

    def result(self) -> np.ndarray:
        """(S,) for one channel, else (C, S)."""
        self.data.resize((self.n, self.data.shape[1]), refcheck=False)
        return self.data[:, 0] if self.data.shape[1] == 1 else np.ascontiguousarray(self.data.T)


def decode_audio(
    source: Source,
    sample_rate: int | None = None,
    *,
    resampler: MakeResampler | None = None,
    mono: bool = True,
    name: str | None = None,
    max_seconds: float | None = None,
    refuse_longer_than: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode an audio file with soundfile to float32 in [-1, 1], block by block: each block checked, mixed to mono
    and resampled as it arrives (:class:`StreamResampler`), into one output the size of the result.

    Args:
        source: path or encoded bytes (FLAC, WAV, OGG, ... whatever libsndfile reads).
        sample_rate: resample to this rate; ``None`` keeps the file's rate.
        resampler: builds the resampler between the file's rate and ``sample_rate`` (torchaudio's in
            :func:`mmformer.data.io.read_audio`, numpy's in the ONNX runner); needed where they differ.
        mono: average the channels into one waveform ``(S,)``; otherwise return ``(C, S)``.
        name: how messages name the sample; defaults to the path.
        max_seconds: keep at most this much audio: longer files are truncated with a warning, and the part past
            the cut (beyond a short margin that keeps the resampled cut exact) is never decoded.
        refuse_longer_than: seconds; a longer file is refused (:class:`AudioTooLongError`), at once where its header
            says so, else once decoding passes the limit (the rest is never decoded).

    Returns:
        ``(waveform, rate)`` where ``rate`` is the rate of the returned waveform.

    Raises:
        SampleError: the file is missing (:class:`MissingSampleError`), empty, corrupt, cut short, holds NaN or
            infinite samples, has no samples or an invalid rate, or would need an enormous resampling filter
            (:func:`check_resample`); its message names it.
    """
    import soundfile  # here, so that reading images needs no libsndfile

    name = source_name(source, name)
    fp = open_source(source, name)
    errors = (soundfile.SoundFileError, RuntimeError, OSError, ValueError, EOFError, MemoryError)

    def undecodable(e: BaseException) -> SampleError:
        return SampleError(name, f"cannot decode audio ({type(e).__name__}: {library_reason(e)})")

    try:
        # a path as bytes: soundfile encodes a str strictly, and a name that is not UTF-8 (a Latin-1 "café.wav",
        # held by Python with surrogate escapes) could not be opened
        f = soundfile.SoundFile(os.fsencode(fp) if isinstance(fp, str) else fp)
    except errors as e:
        raise undecodable(e) from e
    with f:
        claimed = 0 if f.frames >= UNKNOWN_FRAMES else f.frames  # 0: the header does not say
        rate, channels = f.samplerate, f.channels
        if rate <= 0:
            raise SampleError(name, f"invalid sample rate {rate} Hz in the header")
        new_rate = rate if sample_rate is None else sample_rate
        stream = None
        if new_rate != rate:  # checked before anything is decoded
            try:
                check_resample(rate, new_rate, what="audio")
            except ValueError as e:
                raise SampleError(name, str(e)) from e
            if resampler is None:
                raise ValueError(f"resampler: required to resample {rate} Hz to sample_rate={sample_rate}")
            stream = StreamResampler(resampler(rate, new_rate), rate, new_rate)
        cut_at = None if max_seconds is None else math.ceil(max_seconds * rate) + rate // 10 + 1
        most = None if refuse_longer_than is None else math.floor(refuse_longer_than * rate)  # frames allowed
        if most is not None and cut_at is not None and cut_at <= most:
            most = None  # cut before the limit: nothing past it is read
        if most is not None and claimed > most:
            raise AudioTooLongError(name, refuse_longer_than, claimed / rate)
        limit = cut_at if most is None else min(cut_at or most + 1, most + 1)  # frames decoded at most
        frames = claimed if claimed > 0 else None  # what will come, as far as the header and the limits say
        if limit is not None:
            frames = limit if frames is None else min(frames, limit)
        out = _Output(1 if mono else channels, None if frames is None else math.ceil(frames * new_rate / rate))
        block = max(1, AUDIO_BLOCK // max(1, channels))
        n_read = 0
        while limit is None or n_read < limit:
            try:
                part = f.read(block if limit is None else min(block, limit - n_read), dtype="float32", always_2d=True)
            except errors as e:
                raise undecodable(e) from e
            if len(part) == 0:
                break
            n_read += len(part)
            if mono and channels > 1:  # (k, 1): each channel weighted first, so that loud float samples never overflow
                part = part @ np.full((channels, 1), 1 / channels, np.float32)
            if not np.isfinite(part).all():
                raise SampleError(name, "audio contains NaN or infinite values")
            out.write(part.T if stream is None else stream.push(np.ascontiguousarray(part.T)))  # (C, k)
    if n_read == 0:
        raise SampleError(name, "audio has no samples")
    if most is not None and n_read > most:
        raise AudioTooLongError(name, refuse_longer_than, None)
    cut = cut_at is not None and n_read >= cut_at  # stopped before the end of the file
    if not cut and claimed > 0 and n_read < claimed:
        raise SampleError(name, f"truncated audio: header says {claimed} frames, read {n_read}")
    if stream is not None:
        out.write(stream.finish())
    wave = out.result()
    if max_seconds is not None:
        wave = truncate_audio(wave, new_rate, max_seconds, name, seconds=claimed / rate if cut and claimed else None)
    return wave, new_rate
