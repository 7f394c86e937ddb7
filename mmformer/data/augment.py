"""On-the-fly training augmentation from the field's libraries: torchaudio for audio, torchvision v2 for images.

Configured under the data module's ``augment`` (every augmentation is off at its defaults)::

    data:
      augment:
        audio:
          speed_prob: 0.5              # speed perturbation: tempo and pitch together (resampling)
          speed: [0.9, 1.1]
          pitch_prob: 0.3              # pitch shift at constant tempo (phase vocoder + resampling)
          pitch_semitones: [-2, 2]
          noise_prob: 0.5              # additive white noise at a random signal-to-noise ratio
          noise_snr_db: [15, 40]
          gain_prob: 0.5
          gain_db: [-6, 6]
          pad_prob: 0.5                # silence before and after the speech, as recordings and VAD cuts have it
          pad_seconds: [0.05, 1.0]     # each side's length, drawn independently
          empty_prob: 0.02             # the sample loses its speech: silence (or noise), an empty text, a blank
          empty_seconds: [0.3, 4.0]    # image; so that a model learns to say nothing over silence and noise
          freq_masks: 2                # SpecAugment on the log-mel: torchaudio FrequencyMasking / TimeMasking
          freq_mask_bins: 8
          time_masks: 2
          time_mask_frames: 10
        image:
          affine_prob: 0.8             # torchvision RandomAffine: rotation, shift, scale
          degrees: 8
          translate: [0.03, 0.1]       # largest shift: (width, height) fractions
          scale: [0.9, 1.1]
          blur_prob: 0.2               # GaussianBlur; also elastic_prob (ElasticTransform)

Only the training split is augmented, never validation, test or prediction data. The work happens where the
samples are loaded, in the DataLoader workers: :class:`AugmentedDataset` (map-style data) or
:class:`AugmentedStream` (WebDataset shards) wrap the training set and augment each sample's waveform and image;
with SpecAugment on, :class:`FeatureCollator` also computes the batch's log-mel features with the model's own
:class:`~mmformer.embedders.audio.LogMel` (same :class:`~mmformer.AudioConfig`, so the features are exactly those
the model would compute from the augmented waveforms) and masks them, and the batch carries ``audio_features`` +
``feature_lengths`` instead of ``audio`` + ``audio_lengths``.

Reproducible and resumable: sample ``i`` of epoch ``e`` draws every random choice from ``mix_seed(seed, e, i)``
(a streamed sample: from its key), so the augmented batches depend neither on the number of workers nor on where a
run was interrupted: a run resumed mid-epoch (see :class:`~mmformer.data.datamodule.ResumableLoader`) sees the
batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
import torchvision.transforms.v2 as v2
from torch.utils.data import Dataset, IterableDataset

from mmformer.data.seeding import mix_seed, seeded
from mmformer.values import is_int, is_number

if TYPE_CHECKING:
    from mmformer.config import AudioConfig
    from mmformer.data.collate import Collator
    from mmformer.preprocess.processor import Processor

MAX_SEMITONES = 12.0  # pitch shifts beyond an octave are out of what the phase vocoder does well
SPEED_LIMITS = (0.5, 2.0)  # speed factors outside would make speech another thing altogether
RATE_STEP = 100  # speed and pitch ratios are rounded to 1/RATE_STEP, so resampling filters stay small
# independent random streams of one sample, so that changing one augmentation leaves the others' draws alone
IMAGE_STREAM, AUDIO_STREAM, SPEC_STREAM, EMPTY_STREAM = 0, 1, 2, 3


def _number(name: str, value: Any) -> float:
    if not is_number(value):
        raise ValueError(f"{name}: expected a finite number; got {value!r}")
    return float(value)


def _probability(name: str, value: Any) -> float:
    p = _number(name, value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1]; got {value!r}")
    return p


def _range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    what: str = "values",
    pair: str | None = None,
):
    """``value`` as a (low, high) pair of numbers with low <= high, both within [``low``, ``high``] where given;
    with ``pair`` (its two names, e.g. "(width, height)"), two independent numbers in any order instead."""
    shape = f"a pair {pair}" if pair else "a range [low, high]"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name}: expected {shape} of {what}; got {value!r}")
    lo, hi = (_number(name, v) for v in value)
    if lo > hi and not pair:
        raise ValueError(f"{name}: expected a range [low, high] with low <= high; got {value!r}")
    if (low is not None and min(lo, hi) < low) or (high is not None and max(lo, hi) > high):
        bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        raise ValueError(f"{name}: expected {f'a pair {pair} of ' if pair else ''}{what} in {bounds}; got {value!r}")
    return (lo, hi)


def _count(name: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0; got {value!r}")
    return value


@dataclass
class AudioAugmentConfig:
    """Waveform augmentations (before the log-mel) and SpecAugment masks (on it). Each is off at its defaults
    (probability 0, no masks)."""

    speed_prob: float = 0.0  # probability of a speed perturbation (tempo and pitch change together)
    speed: tuple[float, float] = (0.9, 1.1)  # speed factor range (> 1 faster), drawn uniformly, rounded to 0.01
    pitch_prob: float = 0.0  # probability of a pitch shift at constant tempo
    pitch_semitones: tuple[float, float] = (-2.0, 2.0)  # shift range in semitones (ratio rounded to 0.01)
    noise_prob: float = 0.0  # probability of additive white noise
    noise_snr_db: tuple[float, float] = (10.0, 40.0)  # signal-to-noise ratio range in dB (>= 0)
    gain_prob: float = 0.0  # probability of a random gain
    gain_db: tuple[float, float] = (-6.0, 6.0)  # gain range in dB (no clipping: waveforms stay float)
    pad_prob: float = 0.0  # probability of silence before and after the speech (noise, if any, covers it too)
    pad_seconds: tuple[float, float] = (0.05, 1.0)  # length range of each side's silence, drawn independently
    empty_prob: float = 0.0  # probability that a sample loses its speech: silence or noise, text "", a blank image
    empty_seconds: tuple[float, float] = (0.3, 4.0)  # length range of such a speechless clip
    freq_masks: int = 0  # SpecAugment: frequency masks per utterance (torchaudio FrequencyMasking)
    freq_mask_bins: int = 8  # widest frequency mask, in mel bins (SpecAugment's F)
    time_masks: int = 0  # time masks per utterance (torchaudio TimeMasking)
    time_mask_frames: int = 20  # widest time mask, in mel frames (SpecAugment's T)
    time_mask_max_fraction: float = 0.2  # a time mask covers at most this fraction of the utterance (SpecAugment's p)

    def __post_init__(self) -> None:
        p = "augment.audio."
        for name in ("speed_prob", "pitch_prob", "noise_prob", "gain_prob", "pad_prob", "empty_prob"):
            setattr(self, name, _probability(p + name, getattr(self, name)))
        self.speed = _range(p + "speed", self.speed, *SPEED_LIMITS, what="speed factors")
        limit = MAX_SEMITONES
        self.pitch_semitones = _range(p + "pitch_semitones", self.pitch_semitones, -limit, limit, "semitones")
        self.noise_snr_db = _range(p + "noise_snr_db", self.noise_snr_db, 0.0, what="SNRs in dB (noise not louder)")
        self.gain_db = _range(p + "gain_db", self.gain_db, what="gains in dB")
        self.pad_seconds = _range(p + "pad_seconds", self.pad_seconds, 0.0, what="lengths in seconds")
        self.empty_seconds = _range(p + "empty_seconds", self.empty_seconds, 1e-3, what="lengths in seconds (> 0)")
        for count, width in (("freq_masks", "freq_mask_bins"), ("time_masks", "time_mask_frames")):
            _count(p + count, getattr(self, count))
            if _count(p + width, getattr(self, width)) == 0 and getattr(self, count) > 0:
                raise ValueError(f"{p}{width}: expected a mask width >= 1 with {count}={getattr(self, count)}; got 0")
        fraction = _number(p + "time_mask_max_fraction", self.time_mask_max_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{p}time_mask_max_fraction: expected a fraction in (0, 1]; got {fraction!r}")
        self.time_mask_max_fraction = fraction

    @property
    def waveform(self) -> bool:
        """Whether any waveform augmentation can happen."""
        return any(getattr(self, f"{n}_prob") > 0 for n in ("speed", "pitch", "noise", "gain", "pad", "empty"))

    @property
    def spec_augment(self) -> bool:
        """Whether SpecAugment masks the log-mel (then the training loader computes it)."""
        return self.freq_masks > 0 or self.time_masks > 0


@dataclass
class ImageAugmentConfig:
    """Image augmentations (torchvision v2) on the processed image; each is off at its defaults (probability 0)."""

    affine_prob: float = 0.0  # probability of a random affine transform (RandomAffine)
    degrees: float = 10.0  # rotation range: uniform in [-degrees, degrees]
    translate: tuple[float, float] = (0.0, 0.0)  # largest shift as a fraction of (width, height)
    scale: tuple[float, float] = (1.0, 1.0)  # scale factor range
    blur_prob: float = 0.0  # probability of a Gaussian blur (GaussianBlur)
    blur_kernel: int = 3  # odd kernel size in pixels
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # blur standard deviation range in pixels
    elastic_prob: float = 0.0  # probability of an elastic deformation (ElasticTransform)
    elastic_alpha: float = 10.0  # displacement magnitude
    elastic_sigma: float = 3.0  # displacement smoothness

    def __post_init__(self) -> None:
        p = "augment.image."
        for name in ("affine_prob", "blur_prob", "elastic_prob"):
            setattr(self, name, _probability(p + name, getattr(self, name)))
        self.degrees = _number(p + "degrees", self.degrees)
        if not 0.0 <= self.degrees <= 180.0:
            raise ValueError(f"{p}degrees: expected a rotation range in [0, 180] degrees; got {self.degrees!r}")
        # RandomAffine's largest shift along each axis, not a range: (0.2, 0.0) shifts only horizontally
        self.translate = _range(p + "translate", self.translate, 0.0, 1.0, "fractions", pair="(width, height)")
        self.scale = _range(p + "scale", self.scale, 1e-3, what="scale factors > 0")
        kernel = self.blur_kernel
        if not is_int(kernel) or kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"{p}blur_kernel: expected an odd int >= 1 (pixels); got {self.blur_kernel!r}")
        self.blur_sigma = _range(p + "blur_sigma", self.blur_sigma, 1e-3, what="standard deviations > 0 (pixels)")
        self.elastic_alpha = _number(p + "elastic_alpha", self.elastic_alpha)
        self.elastic_sigma = _number(p + "elastic_sigma", self.elastic_sigma)
        if self.elastic_alpha < 0 or self.elastic_sigma <= 0:
            raise ValueError(
                f"{p}elastic_alpha, elastic_sigma: expected alpha >= 0 and sigma > 0; got {self.elastic_alpha!r}, "
                f"{self.elastic_sigma!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.affine_prob > 0 or self.blur_prob > 0 or self.elastic_prob > 0


@dataclass
class AugmentConfig:
    """Training augmentation: ``audio`` and ``image`` settings (plain types; YAML's ``data.augment``)."""

    audio: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)
    image: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)

    def __post_init__(self) -> None:
        for name, cls in (("audio", AudioAugmentConfig), ("image", ImageAugmentConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"augment.{name}: unknown settings {unknown}; expected some of {sorted(known)}")
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise TypeError(f"augment.{name}: expected a {cls.__name__} or a dict; got {type(value).__name__}")

    @property
    def enabled(self) -> bool:
        return self.audio.waveform or self.audio.spec_augment or self.image.enabled

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- audio
@functools.lru_cache(maxsize=128)
def _resampler(orig: int, new: int) -> AT.Resample:
    """torchaudio's resampler for one ratio, its sinc filter built once (building it costs more than using it)."""
    return AT.Resample(orig, new)


def change_speed(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play ``wave`` (..., S) ``factor`` times faster (tempo and pitch together) by resampling; ``factor`` is rounded
    to 1/RATE_STEP, so that the ratio is a small fraction (the sinc filter has a phase per unit of the reduced ratio)
    and there are few distinct filters to cache."""
    steps = round(factor * RATE_STEP)
    if steps == RATE_STEP:
        return wave
    return _resampler(steps, RATE_STEP).to(wave.dtype)(wave)


def pitch_shift(wave: torch.Tensor, sample_rate: int, semitones: float) -> torch.Tensor:
    """Shift the pitch of ``wave`` (..., S) by ``semitones`` keeping its duration.

    As torchaudio's ``pitch_shift``: stretch the duration by the pitch ratio r with a phase vocoder
    (``torchaudio.functional.phase_vocoder``), then play it r times faster by resampling. The ratio is rounded to
    1/RATE_STEP: ``torchaudio.functional.pitch_shift`` resamples by the exact ratio, whose filter takes seconds
    to build per call. Waveforms shorter than half an analysis window are returned unchanged.
    """
    ratio = round(2 ** (semitones / 12) * RATE_STEP) / RATE_STEP
    n_fft = 2 ** max(6, round(math.log2(0.032 * sample_rate)))  # ~32 ms analysis windows
    if ratio == 1.0 or wave.shape[-1] <= n_fft // 2:
        return wave
    hop = n_fft // 4
    shape = wave.shape
    window = torch.hann_window(n_fft, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(wave.reshape(-1, shape[-1]), n_fft, hop, window=window, return_complex=True)  # (N, F, frames)
    advance = torch.linspace(0, math.pi * hop, spec.shape[-2], device=wave.device, dtype=wave.dtype)[:, None]
    spec = AF.phase_vocoder(spec, 1 / ratio, advance)  # rate < 1 for a higher pitch: longer before resampling
    stretched = torch.istft(spec, n_fft, hop, window=window, length=round(shape[-1] * ratio))
    out = change_speed(stretched, ratio)
    return out.reshape(*shape[:-1], out.shape[-1])


class WaveformAugment:
    """Speed perturbation, pitch shift, additive noise and gain of one waveform (..., S), each with its
    probability, drawing from torch's global generator (seed it: see :func:`~mmformer.data.seeding.seeded`).

    Args:
        config: the audio settings.
        sample_rate: the waveforms' rate (Hz).
        max_samples: cut longer results (a slowed-down clip) to this many samples; None = no limit.
    """

    def __init__(self, config: AudioAugmentConfig, sample_rate: int, max_samples: int | None = None):
        self.config, self.sample_rate, self.max_samples = config, sample_rate, max_samples

    def __call__(self, wave: torch.Tensor, *, speechless: bool = False) -> torch.Tensor:
        """The augmented ``wave``; ``speechless``: return the clip's background instead (silence, with the noise
        the speech would have had), ``empty_seconds`` long."""
        c = self.config
        # the scalar draws happen whatever is applied, so one augmentation's probability leaves the others' alone
        # (and a setting added later draws after the earlier ones: their draws stay those of earlier releases)
        happens = torch.rand(4).tolist()
        ranges = (c.speed, c.pitch_semitones, c.noise_snr_db, c.gain_db)
        speed, semitones, snr, gain = (lo + (hi - lo) * u for (lo, hi), u in zip(ranges, torch.rand(4).tolist()))
        pad_happens, *pad_draws = torch.rand(4).tolist()
        before, after, empty = (
            lo + (hi - lo) * u for (lo, hi), u in zip((c.pad_seconds,) * 2 + (c.empty_seconds,), pad_draws)
        )
        if happens[0] < c.speed_prob:
            wave = change_speed(wave, speed)
        if happens[1] < c.pitch_prob:
            wave = pitch_shift(wave, self.sample_rate, semitones)
        speech_power = wave.pow(2).mean(-1, keepdim=True)  # (..., 1) of the speech alone, not of the silence added
        if speechless:
            wave = wave.new_zeros((*wave.shape[:-1], max(1, round(empty * self.sample_rate))))
        elif pad_happens < c.pad_prob:
            wave = pad_silence(
                wave, round(before * self.sample_rate), round(after * self.sample_rate), self.max_samples
            )
        if happens[2] < c.noise_prob:
            wave = add_noise(wave, torch.randn(wave.shape, dtype=wave.dtype), snr, speech_power)
        if happens[3] < c.gain_prob:
            wave = AF.gain(wave, gain)
        if self.max_samples is not None and wave.shape[-1] > self.max_samples:
            wave = wave[..., : self.max_samples]
        return wave


def pad_silence(wave: torch.Tensor, before: int, after: int, max_samples: int | None = None) -> torch.Tensor:
    """``wave`` (..., S) with ``before`` and ``after`` samples of silence around it; with ``max_samples``, the
    silence shrinks (the trailing side first) so that the result fits and the speech is never cut."""
    if max_samples is not None:
        room = max(0, max_samples - wave.shape[-1])
        before = min(before, room)
        after = min(after, room - before)
    return torch.nn.functional.pad(wave, (before, after))


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float, speech_power: torch.Tensor) -> torch.Tensor:
    """``wave`` (..., S) plus ``noise`` (..., S) scaled so that ``speech_power`` (..., 1), the mean square of the
    speech alone, is ``snr_db`` above the noise's mean square. torchaudio's ``add_noise`` measures the signal over
    the whole wave, so silence padded around the speech (or a speechless clip) would lower the noise with it."""
    noise_power = noise.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(noise.dtype).tiny)
    return wave + noise * torch.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))


class SpecAugment:
    """SpecAugment's frequency and time masks (torchaudio ``FrequencyMasking`` / ``TimeMasking``) on one utterance's
    log-mel (M, Nf), filled with the utterance's mean (a neutral level in the model's log-mel scale).

    Args:
        config: the audio settings (its ``freq_*`` / ``time_*`` fields).
        features: the model's log-mel settings: a frequency mask may not be wider than ``n_mels`` nor a time mask
            longer than ``max_frames``.
    """

    def __init__(self, config: AudioAugmentConfig, features: AudioConfig):
        p = "augment.audio."
        if config.freq_masks and config.freq_mask_bins > features.n_mels:
            raise ValueError(
                f"{p}freq_mask_bins: expected a frequency mask at most as wide as the model's n_mels="
                f"{features.n_mels}; got {config.freq_mask_bins}"
            )
        if config.time_masks and config.time_mask_frames > features.max_frames:
            raise ValueError(
                f"{p}time_mask_frames: expected a time mask at most as long as the model's max_frames="
                f"{features.max_frames}; got {config.time_mask_frames}"
            )
        self.config = config
        self.freq = AT.FrequencyMasking(config.freq_mask_bins)
        self.time = AT.TimeMasking(config.time_mask_frames, p=config.time_mask_max_fraction)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        value = features.mean()
        for _ in range(self.config.freq_masks):
            features = self.freq(features, mask_value=value)
        for _ in range(self.config.time_masks):
            features = self.time(features, mask_value=value)
        return features


# ---------------------------------------------------------------------- images
def image_augment(config: ImageAugmentConfig, fill: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision v2 transforms of a processed image (C, H, W): random affine, elastic deformation, blur; ``fill``
    (one value per channel) paints what moves into view, so it should be black in the processed (normalised)
    scale."""
    bilinear = v2.InterpolationMode.BILINEAR
    ops = []
    if config.affine_prob > 0:
        affine = v2.RandomAffine(config.degrees, config.translate, config.scale, interpolation=bilinear, fill=fill)
        ops.append(v2.RandomApply([affine], p=config.affine_prob))
    if config.elastic_prob > 0:
        elastic = v2.ElasticTransform(config.elastic_alpha, config.elastic_sigma, interpolation=bilinear, fill=fill)
        ops.append(v2.RandomApply([elastic], p=config.elastic_prob))
    if config.blur_prob > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(config.blur_kernel, config.blur_sigma)], p=config.blur_prob))
    return v2.Compose(ops)


# ---------------------------------------------------------------------- samples, data sets, batches
class Augmenter:
    """Augments one sample dict (``image`` (C, H, W) processed, ``audio`` (..., S) at the processor's rate) with the
    seed it is given; the result also carries ``augment_seed`` (for SpecAugment at collation). The input sample is
    not modified (a data set may cache it).

    Args:
        config: what to apply.
        processor: the data's :class:`~mmformer.Processor`: its sample rate, longest audio and image normalisation
            (black, the fill of shifted-in pixels, in its scale).
    """

    def __init__(self, config: AugmentConfig, processor: Processor):
        image, audio = processor.image, processor.audio
        kernel = config.image.blur_kernel
        if config.image.blur_prob > 0 and kernel > min(image.image_size):
            raise ValueError(
                f"augment.image.blur_kernel: expected a kernel at most the image's smaller side (image_size="
                f"{list(image.image_size)}); got {kernel}"
            )
        mean, std = (v if len(v) == image.channels else v * image.channels for v in (image.mean, image.std))
        self.fill = [-m / s for m, s in zip(mean, std)]  # black (pixel value 0) after normalisation
        self.image = image_augment(config.image, self.fill) if config.image.enabled else None
        self.audio = None
        if config.audio.waveform:
            self.audio = WaveformAugment(config.audio, audio.sample_rate, audio.max_samples)
        self.empty_prob = config.audio.empty_prob

    def __call__(self, sample: dict[str, Any], seed: int) -> dict[str, Any]:
        out = dict(sample, augment_seed=seed)
        # a speechless sample: its audio becomes its background alone, its text empty and its image blank (what an
        # empty transcript and an empty caption describe); only samples with audio, the speech it removes
        with seeded(mix_seed(seed, EMPTY_STREAM)):
            speechless = self.empty_prob > 0 and "audio" in out and torch.rand(()).item() < self.empty_prob
        if speechless:
            if "text" in out:
                out["text"] = ""
            if "image" in out:
                out["image"] = (
                    torch.tensor(self.fill, dtype=out["image"].dtype)[:, None, None].expand_as(out["image"]).clone()
                )
        if self.image is not None and "image" in out and not speechless:
            with seeded(mix_seed(seed, IMAGE_STREAM)):
                out["image"] = self.image(out["image"])
        if self.audio is not None and "audio" in out:
            with seeded(mix_seed(seed, AUDIO_STREAM)):
                out["audio"] = self.audio(out["audio"], speechless=speechless)
        return out


class AugmentedDataset(Dataset):
    """A map-style training set whose sample ``index`` in epoch ``e`` is augmented with seed
    ``mix_seed(seed, e, index)``; bad samples (None) pass through.

    The loader calls :meth:`set_epoch` as each epoch starts, before its workers copy the data set (the data
    module's loaders are not ``persistent_workers``: persistent workers would keep the epoch of their first copy).
    """

    def __init__(self, dataset: Dataset, augmenter: Augmenter, seed: int):
        self.dataset, self.augmenter, self.seed = dataset, augmenter, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.dataset[index]
        return None if sample is None else self.augmenter(sample, mix_seed(self.seed, self.epoch, index))


class AugmentedStream(IterableDataset):
    """A streamed training set (WebDataset shards) whose samples are augmented with seed
    ``mix_seed(seed, epoch, key)``, the key being the sample's ``source``."""

    def __init__(self, dataset: IterableDataset, augmenter: Augmenter, seed: int):
        self.dataset, self.augmenter, self.seed = dataset, augmenter, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for sample in self.dataset:
            if sample is None:
                yield None
            else:
                yield self.augmenter(sample, mix_seed(self.seed, self.epoch, sample.get("source", "")))


class FeatureCollator:
    """A training ``collate_fn`` for SpecAugment: the :class:`~mmformer.data.Collator`'s batch, with the waveforms
    replaced by the model's log-mel features, each utterance masked with its own seed.

    The features come from the model's :class:`~mmformer.embedders.audio.LogMel` on the padded batch, exactly as
    the model computes them from ``audio`` + ``audio_lengths``; the batch then carries ``audio_features``
    (B, M, Nf) + ``feature_lengths`` (B,) (frames) instead, which the model takes as they are.

    Args:
        collate: the plain collator.
        features: the model's log-mel settings.
        config: the SpecAugment settings.
    """

    def __init__(self, collate: Collator, features: AudioConfig, config: AudioAugmentConfig):
        from mmformer.embedders.audio import LogMel

        self.collate = collate
        self.log_mel = LogMel(features)
        self.spec_augment = SpecAugment(config, features)

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        seeds = [s.get("augment_seed", 0) for s in samples if s is not None]
        batch = self.collate(samples)
        if batch is None or "audio" not in batch:
            return batch
        audio, lengths = batch.pop("audio"), batch.pop("audio_lengths")
        with torch.no_grad():
            features = self.log_mel(audio, lengths)  # (B, M, Nf)
        frames = self.log_mel.frames(lengths)  # (B,)
        for i, seed in enumerate(seeds):
            with seeded(mix_seed(seed, SPEC_STREAM)):
                features[i, :, : frames[i]] = self.spec_augment(features[i, :, : frames[i]])
        batch["audio_features"], batch["feature_lengths"] = features, frames
        return batch


def augment_training(
    dataset: Dataset,
    collate: Collator,
    config: AugmentConfig,
    processor: Processor,
    seed: int,
    features: Callable[[], AudioConfig],
) -> tuple[Dataset, Callable[[list], dict[str, Any] | None]]:
    """The training data set and ``collate_fn`` with ``config``'s augmentations (unchanged when it has none).

    Args:
        dataset: the training set (map-style or streamed).
        collate: its plain collator.
        config: the augmentations.
        processor: the data's processor (sample rate, image normalisation).
        seed: the run's data seed.
        features: returns the model's log-mel settings; called only when SpecAugment is on.
    """
    if not config.enabled:
        return dataset, collate
    augmenter = Augmenter(config, processor)
    wrapped = (AugmentedStream if isinstance(dataset, IterableDataset) else AugmentedDataset)(dataset, augmenter, seed)
    if not config.audio.spec_augment:
        return wrapped, collate
    audio_config = features()
    if audio_config.sample_rate != processor.audio.sample_rate:
        raise ValueError(
            f"augment.audio: SpecAugment computes the model's log-mel in the loader, but the data's sample_rate="
            f"{processor.audio.sample_rate} differs from the model's audio.sample_rate={audio_config.sample_rate}"
        )
    return wrapped, FeatureCollator(collate, audio_config, config.audio)
