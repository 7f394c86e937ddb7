"""Media files without torch: the error an unusable sample raises, which modality a file holds, and the way up an
image is seen.

These live here, not in :mod:`mmformer.data.io` (which imports torch, and re-exports the errors), so that the
torch-free ONNX runner (:mod:`mmformer.ship.onnx_runner`) decides and reads files by the same rules as the
:class:`~mmformer.Processor` and the ``mmformer`` commands.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import Image, ImageOps

# Other names of libsndfile's formats (AIFF, OGG), and .m4a: audio libsndfile does not decode (AAC in MP4), which
# then fails as audio ("format not recognised"), not as an image PIL cannot identify.
AUDIO_SUFFIX_ALIASES = (".aif", ".aifc", ".opus", ".oga", ".m4a")


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


def check_file(path: str | os.PathLike, name: str) -> None:
    """Refuse a path that is no file to read (missing, a folder: :class:`MissingSampleError`) or an empty one
    (:class:`SampleError`: the decoders would only say "format not recognised")."""
    if not Path(path).is_file():
        raise MissingSampleError(name, "a folder, not a file" if Path(path).is_dir() else "file not found")
    if Path(path).stat().st_size == 0:
        raise SampleError(name, "empty file (0 bytes)")


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
        SampleError: a file neither soundfile nor PIL reads; the message names it.
    """
    suffix = Path(path).suffix.lower()
    if suffix in audio_suffixes():
        return "audio"
    if suffix in Image.registered_extensions():
        return "image"
    check_file(path, str(path))
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


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned the way its EXIF orientation tag says, in place: a phone stores a photo's pixels as its
    sensor read them (a portrait sideways) and the turn in the tag, which viewers, browsers and transformers'
    ``load_image`` apply. An image without the tag is left as it is, uncopied."""
    ImageOps.exif_transpose(img, in_place=True)
    return img
