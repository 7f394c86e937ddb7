"""Inference preprocessing: raw images, waveforms and strings → the tensors the model takes.

``Processor(images=..., audio=..., text=...)`` accepts what users have at hand (PIL images, tensors, numpy
arrays, file paths, waveforms at any sample rate, strings) and returns a plain dict:

    pixel_values    float (B, C, H, W), normalised
    audio           float (B, S) mono waveform at ``audio.sample_rate``, right-padded with zeros
    audio_lengths   long  (B,)  number of real samples per row
    input_ids       long  (B, T) and attention_mask bool (B, T), True = real token (from the tokenizer)

The same image pipeline (:meth:`Processor.image_transform`) and file loaders (:meth:`Processor.load_image`,
:meth:`Processor.load_audio`) serve the training data sets in :mod:`mmformer.data`, so training and inference
see identical pixels and waveforms.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from mmformer.data.collate import pad_audio, tokenize_counting_cuts
from mmformer.data.io import (
    check_resample,
    read_audio,
    read_image,
    resample,
    truncate_audio,
    write_json_atomic,
)
from mmformer.preprocess.image_transforms import CenterCropFloor, LimitAspect, ResizeCover, ToChannels
from mmformer.preprocess.media import check_unicode
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.config import ModelConfig
    from mmformer.preprocess.tokenizer import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"
TOKENIZER_NAME = "tokenizer.json"
OWN_KEYS = ("processor_class", "image", "audio")  # what to_dict writes
# A model folder's config: mmformer's, Hugging Face's and timm's config.json; open_clip's own file
MODEL_CONFIG_FILES = ("config.json", "open_clip_config.json")
# A 2-D waveform array with at most this many columns and more rows than columns is (samples, channels), as soundfile
# and librosa read a multi-channel file, not a (B, S) batch: a batch of waveforms of a few samples each is no audio.
MAX_CHANNELS = 8
_INTERPOLATION = ("bicubic", "bilinear", "nearest")  # torchvision's InterpolationMode values


@dataclass
class ImageProcessorConfig:
    """How images become ``pixel_values``."""

    image_size: int | tuple[int, int] = 224  # (H, W) of the output; an int means square
    resize: Literal["shortest", "exact"] = "shortest"  # shortest: scale to cover + center crop (CLIP); exact: stretch
    mean: tuple[float, ...] = CLIP_MEAN  # per channel, or one value for all channels
    std: tuple[float, ...] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    channels: int = 3  # 3 = RGB, 1 = grayscale
    # shortest: the short side's length before the center crop (Hugging Face's size.shortest_edge when it differs
    # from crop_size); None: just enough to cover image_size
    resize_size: int | None = None
    # where an odd margin puts the center crop: "round" (torchvision's CenterCrop, open_clip) rounds half to even,
    # "floor" (Hugging Face's image processors) keeps the extra row/column at the bottom/right
    crop_offset: Literal["round", "floor"] = "round"

    def __post_init__(self):
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"image_size: expected a positive int or (H, W); got {self.image_size!r}")
        self.image_size = size
        if self.resize not in ("shortest", "exact"):
            raise ValueError(f"resize: expected 'shortest' or 'exact'; got {self.resize!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation: expected one of {list(_INTERPOLATION)}; got {self.interpolation!r}")
        if self.resize_size is not None and (not is_int(self.resize_size) or self.resize_size <= 0):
            raise ValueError(f"resize_size: expected None or a positive int; got {self.resize_size!r}")
        if self.resize_size is not None and self.resize != "shortest":
            raise ValueError(f"resize_size: only with resize='shortest' (before the crop); got {self.resize!r}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset: expected 'round' or 'floor'; got {self.crop_offset!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB); got {self.channels!r}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.channels == 1 and (self.mean, self.std) == (CLIP_MEAN, CLIP_STD):
            # the default RGB statistics, reduced to one channel, so that ImageProcessorConfig(channels=1) just works
            self.mean, self.std = (sum(CLIP_MEAN) / 3,), (sum(CLIP_STD) / 3,)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name}: expected 1 or channels={self.channels} values; got {values}")
        if min(self.std) <= 0:
            raise ValueError(f"std: expected positive values; got {self.std}")


@dataclass
class AudioProcessorConfig:
    """How waveforms are decoded, resampled and cut."""

    sample_rate: int = 16000  # every waveform is resampled to this rate (Hz)
    max_seconds: float | None = 30.0  # longer waveforms are truncated (with a warning); None = no limit
    mono: bool = True  # average the channels of multi-channel files; False keeps them, audio is then (B, C, S)

    def __post_init__(self):
        if not is_int(self.sample_rate) or self.sample_rate <= 0:
            raise ValueError(f"sample_rate: expected a positive int (Hz); got {self.sample_rate!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds: expected a positive number or None; got {self.max_seconds!r}")

    @property
    def max_samples(self) -> int | None:
        return None if self.max_seconds is None else int(round(self.max_seconds * self.sample_rate))


def _as_list(value: Any, name: str, batch_dims: int) -> list:
    """A list/tuple as is; a tensor/array with ``batch_dims`` dims split along dim 0; anything else as one item."""
    batched = isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == batch_dims
    if isinstance(value, (list, tuple)) or batched:
        items = list(value)
    else:
        items = [value]
    if not items:
        raise ValueError(f"{name}: expected at least one item; got an empty {type(value).__name__}")
    return items


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    return list(values) * (channels // len(values))


def tokenize_with_warning(
    tokenizer: Tokenizer, texts: list[str], max_length: int, *, what: str = "text"
) -> dict[str, torch.Tensor]:
    """``tokenizer(texts, max_length=max_length)``, warning (naming the texts ``what[i]``) when one is longer and gets
    cut (:func:`~mmformer.data.collate.tokenize_counting_cuts`); a text that is not valid Unicode is refused under
    that name too (the tokenizer's own check would call it ``texts[i]``)."""
    for i, t in enumerate(texts):
        check_unicode(t, f"{what}[{i}]")
    out, too_long = tokenize_counting_cuts(tokenizer, texts, max_length)
    if not too_long:
        return out
    shown = ", ".join(f"{what}[{i}] {texts[i][:40]!r}" for i in too_long[:3]) + (", ..." if len(too_long) > 3 else "")
    warnings.warn(
        f"{len(too_long)} of {len(texts)} texts are longer than the context length of {max_length} tokens and are "
        f"truncated: {shown}",
        stacklevel=3,
    )
    return out


def _from_dict(cls: type, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; expected some of {sorted(known)}")
    return cls(**values)


def _describe(x: Any) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def check_not_channels_last(audio: Any, where: str, expected: str = "a waveform (S,) or a batch (B, S)") -> None:
    """Refuse a 2-D waveform array laid out (samples, channels) — what ``soundfile.read`` returns for a stereo file —
    which would otherwise be read as a batch of thousands of waveforms of one sample per channel (or as thousands of
    channels). The processor and :class:`~mmformer.ZeroShotClassifier` check their inputs with it; ``expected`` is
    what the caller accepts where ``audio`` came from (one list item is no batch)."""
    if not isinstance(audio, (torch.Tensor, np.ndarray)) or audio.ndim != 2:
        return
    rows, columns = audio.shape
    if columns <= MAX_CHANNELS and rows > columns:
        raise ValueError(
            f"{where}: expected {expected}; got shape {tuple(audio.shape)}, which looks like (samples, channels) as "
            f"soundfile reads a {columns}-channel file; downmix it to mono first (`x.mean(axis=1)`), or pass the "
            "file's path"
        )


def check_sampling_rate(value: Any) -> int:
    """``sampling_rate`` as an int: Python and numpy integers, and whole floats (``16000.0``, as float-typed metadata
    gives a rate); a ValueError for anything else (16000.5, bools, strings, rates <= 0)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"sampling_rate: expected a positive int (Hz); got {value!r}")
    return int(value)


def _model_settings(model: ModelConfig | None) -> dict[str, dict[str, Any]]:
    """The image and audio settings a model's config fixes: the image size and channels it was built for, the sample
    rate it hears at. A processor saved without these settings gets them from here instead of CLIP's defaults."""
    image = getattr(model, "image", None)
    audio = getattr(model, "audio", None)
    return {
        "image": {} if image is None else {"image_size": tuple(image.image_size), "channels": image.channels},
        "audio": {} if audio is None else {"sample_rate": audio.sample_rate},
    }


def _needs_the_loader(where: str, why: str) -> ValueError:
    """The error for a model folder whose processor this class cannot make alone: it depends on the model, and the
    loaders that read models (:func:`mmformer.io.auto.load_processor`) sit above this class."""
    return ValueError(
        f"{where}: {why}; its processor depends on the model (converted from a Hugging Face, open_clip or timm "
        "folder, or sized to an mmformer model's config): load it with mmformer.io.auto.load_processor(FOLDER), or "
        "mmformer.from_pretrained(FOLDER).processor"
    )


def fit_tokenizer(tokenizer: Any, model: ModelConfig | None) -> Any:
    """``tokenizer`` truncating to at most the text tokens ``model`` reads (its position table), as open_clip's
    tokenizer takes the model's context length: a tokenizer saved with a longer default (77) made ids the model
    refuses ("expected at most 16 tokens"). Every processor a loaded model carries goes through here
    (:meth:`Processor.from_dict`); so should a tokenizer saved beside a model's config."""
    text = getattr(model, "text", None)
    if tokenizer is None or text is None or text.position == "none" or tokenizer.max_length <= text.max_tokens:
        return tokenizer
    return tokenizer.replace(max_length=text.max_tokens)


class Processor:
    """Tokenizer + image pipeline + audio loader, saved and loaded together.

    Args:
        tokenizer: the text tokenizer; required only when ``text`` is given.
        image: image settings (defaults: 224×224, CLIP normalisation).
        audio: audio settings (defaults: 16 kHz mono, at most 30 s).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        image: ImageProcessorConfig | None = None,
        audio: AudioProcessorConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.image = image if image is not None else ImageProcessorConfig()
        self.audio = audio if audio is not None else AudioProcessorConfig()

    def __repr__(self) -> str:
        return f"Processor(tokenizer={self.tokenizer!r}, image={self.image}, audio={self.audio})"

    def check_audio_rate(self, model_rate: int) -> None:
        """Raise ValueError unless this processor's audio rate is the model's (``AudioConfig.sample_rate``): a model
        fed audio at another rate hears it at the wrong speed."""
        if self.audio.sample_rate != model_rate:
            raise ValueError(
                f"processor: its audio sample_rate {self.audio.sample_rate} differs from the model's {model_rate} "
                "(AudioConfig.sample_rate); the model would hear the audio at the wrong speed"
            )

    # ------------------------------------------------------------------ images
    @functools.cached_property
    def _transform(self) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
        return self.image_transform()  # built at the first image: audio- and text-only work never imports torchvision

    def image_transform(self) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
        """PIL image or (C, H, W) tensor (uint8, or float in [0, 1]) → normalised float (C, H, W)."""
        import torchvision.transforms.v2 as v2  # imported here: torchvision's own import takes ~1.3 s

        cfg = self.image
        interpolation = v2.InterpolationMode(cfg.interpolation)
        h, w = cfg.image_size
        crop = v2.CenterCrop((h, w)) if cfg.crop_offset == "round" else CenterCropFloor((h, w))
        if cfg.resize == "exact":
            resize = [v2.Resize((h, w), interpolation=interpolation, antialias=True)]
        elif cfg.resize_size is not None or h == w:  # exactly CLIP's (and Hugging Face's) Resize(int) + CenterCrop
            resize = [v2.Resize(cfg.resize_size or h, interpolation=interpolation, antialias=True), crop]
        else:
            resize = [ResizeCover((h, w), interpolation), crop]
        limit = [] if cfg.resize == "exact" else [LimitAspect((h, w))]  # "exact" never enlarges a side
        return v2.Compose(
            [
                ToChannels(cfg.channels),
                *limit,
                *resize,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=_per_channel(cfg.mean, cfg.channels), std=_per_channel(cfg.std, cfg.channels)),
                v2.ToPureTensor(),
            ]
        )

    @property
    def image_mode(self) -> str:
        """The PIL mode image files are decoded to (:func:`~mmformer.data.io.read_image`): RGB, or L (grayscale)."""
        return "RGB" if self.image.channels == 3 else "L"

    def load_image(self, source: str | os.PathLike | bytes, *, name: str | None = None) -> torch.Tensor:
        """Decode an image file (path or bytes) and transform it → float (C, H, W).

        Raises:
            mmformer.data.SampleError: the file is missing or cannot be decoded; the message names it.
        """
        return self._transform(read_image(source, self.image_mode, name=name))

    def _image_to_tensor(self, x: Any, where: str) -> Image.Image | torch.Tensor:
        """One user image → PIL image or (C, H, W) tensor, checked; errors name ``where`` (e.g. ``images[2]``)."""
        if isinstance(x, Image.Image):
            if x.width == 0 or x.height == 0:
                raise ValueError(f"{where}: expected an image of at least 1×1 pixels; got a {x.width}×{x.height} image")
            return x
        if isinstance(x, (str, os.PathLike)):
            return read_image(x, self.image_mode, name=str(x))
        if isinstance(x, np.ndarray):
            if x.ndim == 3 and x.shape[-1] in (1, 3, 4):
                t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)  # HWC → CHW
            elif x.ndim == 2:
                t = torch.from_numpy(np.ascontiguousarray(x))[None]  # HW → 1HW
            else:
                raise ValueError(
                    f"{where}: expected a numpy image (H, W, C) with C in 1, 3, 4 or (H, W); got {_describe(x)}"
                )
        elif isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                raise ValueError(f"{where}: expected a tensor with data; got a meta tensor of shape {tuple(x.shape)}")
            if x.ndim == 2:
                t = x[None]
            elif x.ndim == 3 and x.shape[0] in (1, 3, 4):
                t = x
            else:
                raise ValueError(
                    f"{where}: expected a tensor (C, H, W) with C in 1, 3, 4 or (H, W); got {_describe(x)}"
                )
            t = t.detach().cpu()
        else:
            raise TypeError(f"{where}: expected PIL image, tensor (C,H,W), numpy array or path; got {_describe(x)}")
        if t.shape[-1] == 0 or t.shape[-2] == 0:
            raise ValueError(f"{where}: expected an image of at least 1×1 pixels; got {_describe(x)}")
        if t.dtype == torch.uint8:
            return t
        if not t.is_floating_point():
            raise TypeError(f"{where}: expected uint8 or float pixels; got {_describe(x)}")
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: expected finite pixel values; got NaN or infinity in {_describe(x)}")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(
                f"{where}: expected float pixels in [0, 1]; got values in [{t.min():.3g}, {t.max():.3g}] "
                "(pass uint8 for 0-255 data)"
            )
        return t

    def _process_images(self, images: Any) -> torch.Tensor:
        items = _as_list(images, "images", batch_dims=4)
        pixels = [self._transform(self._image_to_tensor(x, f"images[{i}]")) for i, x in enumerate(items)]
        return torch.stack(pixels)  # (B, C, H, W)

    # ------------------------------------------------------------------ audio
    def _truncate(self, wave: torch.Tensor, where: str) -> torch.Tensor:
        return truncate_audio(wave, self.audio.sample_rate, self.audio.max_seconds, where)

    def _read_audio(self, source: str | os.PathLike | bytes, name: str) -> torch.Tensor:
        cfg = self.audio
        wave, _ = read_audio(source, cfg.sample_rate, mono=cfg.mono, name=name, max_seconds=cfg.max_seconds)
        return wave  # already cut to max_seconds (with a warning naming the file), the rest never decoded

    def load_audio(self, source: str | os.PathLike | bytes, *, name: str | None = None) -> torch.Tensor:
        """Decode an audio file (path or bytes) → float (S,) (or (C, S) when not mono) at ``audio.sample_rate``.

        Raises:
            mmformer.data.SampleError: the file is missing or cannot be decoded; the message names it.
        """
        return self._read_audio(source, name or str(source))

    def waveform(self, x: Any, where: str, sampling_rate: int | None) -> torch.Tensor:
        """One waveform as this processor reads it: a file (decoded, resampled) or an array / tensor recorded at
        ``sampling_rate`` — float or int16 PCM (scaled by 1/32768), checked (errors name ``where``), resampled to
        the processor's rate and cut to its ``max_seconds``. Mono: (S,); keeping channels: (C, S)."""
        if isinstance(x, (str, os.PathLike)):
            return self._read_audio(x, str(x))  # errors and the truncation warning name the file
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"{where}: expected a 1-D waveform (numpy array or tensor) or a file path; got {_describe(x)}"
            )
        if sampling_rate is None:
            raise ValueError(
                f"{where}: sampling_rate is required with waveform arrays (the rate they were recorded at; they are "
                f"resampled to {self.audio.sample_rate} Hz); got sampling_rate=None"
            )
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise ValueError(f"{where}: expected a waveform with data; got a meta tensor of shape {tuple(x.shape)}")
        check_not_channels_last(x, where, self._audio_forms(item=True))
        wave = torch.as_tensor(x).detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if wave.ndim != 1 and (self.audio.mono or wave.ndim != 2):
            raise ValueError(f"{where}: expected {self._audio_forms(item=True)}; got {_describe(x)}")
        if wave.shape[-1] == 0:
            raise ValueError(f"{where}: expected a non-empty waveform; got {_describe(x)}")
        if wave.dtype == torch.int16:
            wave = wave.float() / 32768.0
        elif wave.is_floating_point():
            wave = wave.float()
        else:
            raise TypeError(f"{where}: expected float (or int16 PCM) samples; got {_describe(x)}")
        if not torch.isfinite(wave).all():
            raise ValueError(f"{where}: waveform contains NaN or infinite values")
        if not self.audio.mono and wave.ndim == 1:
            wave = wave[None]  # (1, S)
        return self._truncate(resample(wave, sampling_rate, self.audio.sample_rate), where)

    def _audio_forms(self, item: bool) -> str:
        """What audio arrays are taken, for errors: as one item of a list (a waveform), or as the whole ``audio``
        (also a batch: (B, S) when mono, else (B, C, S), as :func:`_as_list` splits them)."""
        one = "(S,)" if self.audio.mono else "(S,) or (C, S)"
        if item:
            return f"a waveform {one}"
        return f"a waveform {one}, a batch {'(B, S)' if self.audio.mono else '(B, C, S)'} or a list of waveforms"

    def _process_audio(self, audio: Any, sampling_rate: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if sampling_rate is not None:
            sampling_rate = check_sampling_rate(sampling_rate)
            check_resample(sampling_rate, self.audio.sample_rate, what="sampling_rate")
        check_not_channels_last(audio, "audio", self._audio_forms(item=False))
        items = _as_list(audio, "audio", batch_dims=2 if self.audio.mono else 3)
        return pad_audio([self.waveform(x, f"audio[{i}]", sampling_rate) for i, x in enumerate(items)])

    # ------------------------------------------------------------------ text
    def _process_text(self, text: Any, max_length: int | None) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("text: this Processor has no tokenizer; create it with Processor(tokenizer=...)")
        items = [text] if isinstance(text, str) else _as_list(text, "text", batch_dims=-1)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}]: expected str; got {_describe(t)}")
        if max_length is not None:  # the caller chose the length: truncation is what they asked for
            out = self.tokenizer(items, max_length=max_length, name="text")
        else:
            out = tokenize_with_warning(self.tokenizer, items, self.tokenizer.max_length, what="text")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(
        self,
        images: Any = None,
        audio: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        sampling_rate: int | None = None,
        text_max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Preprocess any combination of images, audio and text into one batch dict.

        Args:
            images: PIL images, tensors (C, H, W) uint8 or float in [0, 1], numpy (H, W, C)/(H, W) arrays or
                file paths; a list, or a single item (a batch of one), or a (B, C, H, W) tensor.
            audio: waveforms (S,) recorded at ``sampling_rate``, or audio file paths; a list, a single item, or a
                (B, S) array.
            text: strings.
            sampling_rate: the rate of waveform arrays in ``audio`` (file paths carry their own rate).
            text_max_length: truncate texts to this many tokens (default: the tokenizer's ``max_length``).

        Returns:
            ``pixel_values`` (B, C, H, W); ``audio`` (B, S) and ``audio_lengths`` (B,); ``input_ids`` and
            ``attention_mask`` (B, T) — each present when its input was given.
        """
        if images is None and audio is None and text is None:
            raise ValueError("Processor: expected at least one of images=, audio=, text=; got none")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self._process_images(images)
        if audio is not None:
            out["audio"], out["audio_lengths"] = self._process_audio(audio, sampling_rate)
        if text is not None:
            out.update(self._process_text(text, text_max_length))
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": "Processor",
            "image": dataclasses.asdict(self.image),
            "audio": dataclasses.asdict(self.audio),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` (and ``tokenizer.json`` if there is a tokenizer) into ``directory``.

        Each file is written to a temporary name and moved into place, so an interrupted save never leaves a
        half-written file; other files in the directory are left alone.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            self.tokenizer.save(directory / TOKENIZER_NAME)  # atomic itself
        write_json_atomic(directory / CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, model: ModelConfig | None = None) -> Processor:
        """Load what :meth:`save_pretrained` wrote.

        Args:
            directory: the folder.
            model: the config of the model saved with the processor, which mmformer's loaders pass (see
                :meth:`from_dict`); with it, a missing ``preprocessor_config.json`` means the model's settings.

        Raises:
            FileNotFoundError: ``directory`` is not a folder.
            ValueError: the folder holds a model (a ``config.json`` or ``open_clip_config.json``) but no mmformer
                processor settings, or settings of another library: its processor depends on the model (converted
                from a Hugging Face, open_clip or timm folder; sized to an mmformer model's config), so the message
                names :func:`mmformer.io.auto.load_processor`, which reads every format (this class, below the
                loaders, cannot call it).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"directory: expected a folder with {CONFIG_NAME}/{TOKENIZER_NAME}; got {directory}"
            )
        config_path = directory / CONFIG_NAME
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if (
                not isinstance(config, dict)
                or set(config) - set(OWN_KEYS)
                or config.get("processor_class", "Processor") != "Processor"
            ):
                keys = sorted(config) if isinstance(config, dict) else type(config).__name__
                raise _needs_the_loader(str(config_path), f"not mmformer's processor settings (it holds {keys})")
        else:
            held = [name for name in MODEL_CONFIG_FILES if (directory / name).is_file()]
            if model is None and held:
                raise _needs_the_loader(f"directory: {directory}", f"holds a model ({held[0]}) but no {CONFIG_NAME}")
            sized = "" if model is None else f", sized to the model's config ({_model_settings(model)})"
            warnings.warn(f"{config_path} not found; using the default image and audio settings{sized}", stacklevel=2)
            config = {}
        tokenizer = None
        if (directory / TOKENIZER_NAME).is_file():
            from mmformer.preprocess.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_file(directory / TOKENIZER_NAME)
        return cls.from_dict(config, tokenizer, where=str(config_path), model=model)

    @classmethod
    def from_dict(
        cls,
        config: dict[str, Any],
        tokenizer: Any = None,
        *,
        where: str = "processor config",
        model: ModelConfig | None = None,
    ) -> Processor:
        """Rebuild a processor from :meth:`to_dict`'s output (e.g. as a training checkpoint stores it).

        ``model``: the config of the model the processor was saved with. Settings the dict leaves out then come from
        it (image size and channels, sample rate) rather than from CLIP's defaults, and the tokenizer truncates to
        the text tokens the model reads: every processor a loaded model carries is read through here.
        """
        defaults = _model_settings(model)
        image = {**defaults["image"], **config.get("image", {})}
        audio = {**defaults["audio"], **config.get("audio", {})}
        return cls(
            tokenizer=fit_tokenizer(tokenizer, model),
            image=_from_dict(ImageProcessorConfig, image, f"{where}: image"),
            audio=_from_dict(AudioProcessorConfig, audio, f"{where}: audio"),
        )
