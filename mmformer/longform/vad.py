"""Voice activity: Silero VAD (the ``silero-vad`` package ships its ONNX models; nothing is downloaded) finds speech,
and whisperX's cut & merge turns the speech regions into windows no longer than the model's input; for a fixed-window
model (Whisper) the merged windows are packed as faster-whisper packs them (long pauses cut out, times mapped back).

Positions are sample indices at the model's rate; a region is ``(start, end)`` with ``end`` exclusive.

Shape legend: S samples, F energy frames.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmformer.longform.options import VadOptions

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

VAD_RATE = 16000  # Silero runs at 16 kHz (or 8 kHz); other rates are resampled for it
VAD_FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
VAD_CONTEXT = 64  # samples of the previous frame Silero reads before each frame


@dataclass(frozen=True)
class Window:
    """A stretch of one file decoded as one input: ``file`` indexes the inputs, ``start``/``end`` are samples, and
    ``regions`` the speech regions it holds (absolute samples). ``pieces``: the spans of the file whose audio,
    joined in order, is the input (a packed window, its long pauses cut out); empty: the span ``start:end``."""

    file: int
    start: int
    end: int
    regions: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return self.pieces or ((self.start, self.end),)

    @property
    def samples(self) -> int:
        """Samples of the window's input."""
        return sum(end - start for start, end in self.spans)

    def audio(self, wave: torch.Tensor) -> torch.Tensor:
        """The window's input (samples,) cut from its file's waveform (S,)."""
        if not self.pieces:
            return wave[self.start : self.end]
        return torch.cat([wave[start:end] for start, end in self.pieces])

    def piece_at(self, seconds: float, sample_rate: int, end: bool = False) -> int:
        """The index of the span holding the input's time ``seconds``; a time on the border of two spans belongs to
        the later one, or (``end``) to the earlier one, where an interval ending there lies."""
        position, first = seconds * sample_rate, 0
        for k, (start, stop) in enumerate(self.spans):
            length = stop - start
            if position < first + length or (end and position <= first + length):
                return k
            first += length
        return len(self.spans) - 1

    def file_time(self, seconds: float, sample_rate: int, piece: int | None = None, end: bool = False) -> float:
        """The input's time ``seconds`` on the file's timeline (seconds), through span ``piece`` (default: the one
        holding it, see :meth:`piece_at`) and kept within that span; a span window adds its start."""
        if not self.pieces:
            return self.start / sample_rate + seconds
        k = self.piece_at(seconds, sample_rate, end) if piece is None else piece
        before = sum(stop - start for start, stop in self.pieces[:k])  # input samples ahead of span k
        start, stop = self.pieces[k]
        return min(max((start + seconds * sample_rate - before) / sample_rate, start / sample_rate), stop / sample_rate)


def silero_package() -> ModuleType:
    """The ``silero_vad`` package, imported without its side effect on this process: its ``model`` module calls
    ``torch.set_num_threads(1)`` when first imported, which left every later torch operation on one thread (measured:
    the whisper-tiny encoder at batch 8 took 3.7 s instead of 2.1 s after the VAD had run on 2 cores). Import it
    through here (tests too) before any ``from silero_vad... import``."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
    except ImportError as e:
        raise _import_failed(e, "VAD needs the silero-vad package (pip install silero-vad); or pass vad=False") from e
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return silero_vad


def _import_failed(error: ImportError, missing: str) -> ImportError:
    """The error for a VAD package that cannot be imported: ``missing`` where it is not installed, else the loader's
    own reason (an installed onnxruntime whose shared library could not be mapped, memory being limited, was said to
    be missing)."""
    if isinstance(error, ModuleNotFoundError):
        return ImportError(missing)
    return ImportError(f"VAD: a package it needs is installed but cannot be loaded ({error}); or pass vad=False")


@functools.lru_cache(maxsize=1)
def silero_model() -> Any:
    """Silero VAD's ONNX model from the ``silero-vad`` wheel (loaded once per process)."""
    return silero_package().load_silero_vad(onnx=True)


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


def window_samples(model: MultimodalTransformer, options: VadOptions, sample_rate: int,
                   trained_samples: int | None = None) -> int:  # fmt: skip
    """The longest window decoded at once: the model's input (:func:`model_window_samples`), for a model without a
    fixed window no longer than ``trained_samples`` (its processor's ``max_seconds``: the longest clips it learned
    from, where ``model.transcribe`` cuts — the digits model's position table reaches 16 s, its clips 8 s, and a
    12-s file read whole lost most of its words), and ``options.max_window_s``."""
    limit = model_window_samples(model)
    if trained_samples is not None and not fixed_window(model):
        limit = min(limit, trained_samples)
    if options.max_window_s is not None:
        limit = min(limit, round(options.max_window_s * sample_rate))
    return limit


def background(wave: torch.Tensor, stamps: list[tuple[int, int]], sigmas: float = 5.0) -> tuple[float, float]:
    """``(offset, floor)`` of the samples outside the speech ``stamps`` (all samples when there is none): their median,
    the recording's DC offset, which speech is measured from (a microphone's offset of 0.2 put every sample of a
    recording under a floor measured from zero, and every region was dropped); and the level background noise stays
    under around it, ``sigmas`` standard deviations estimated robustly (median absolute deviation / 0.6745, so the
    speech onsets that Silero's frames miss barely move it; 0.0 without such samples).

    Both medians are torch's (the lower middle value), read block by block (:func:`_median`): gathering the samples
    outside the speech took seven times an hour's samples (1.7 GB, and a traceback where memory was limited)."""
    outside = _complement(stamps, wave.shape[0])
    if not outside:
        return (_median(lambda: _blocks(wave, [(0, wave.shape[0])])) if wave.numel() else 0.0), 0.0
    offset = _median(lambda: _blocks(wave, outside))
    spread = _median(lambda: ((x - offset).abs() for x in _blocks(wave, outside)))
    return offset, sigmas * spread / 0.6745


BLOCK = 2**20  # samples a whole-recording statistic reads at once (4 MiB of float32; an hour is 55 blocks)


def _complement(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The stretches of ``[0, n)`` outside every span (in order, none empty)."""
    stretches, position = [], 0
    for start, end in sorted(spans):
        start, end = min(max(start, 0), n), min(max(end, 0), n)
        if end <= start:  # empty: covers nothing
            continue
        if start > position:
            stretches.append((position, start))
        position = max(position, end)
    if position < n:
        stretches.append((position, n))
    return stretches


def _blocks(wave: torch.Tensor, spans: list[tuple[int, int]], reverse: bool = False) -> Iterator[torch.Tensor]:
    """The samples of ``wave`` (S,) in ``spans``, as views of at most :data:`BLOCK` samples, in order (``reverse``:
    last block first)."""
    cuts = [(a, min(a + BLOCK, end)) for start, end in spans for a in range(start, end, BLOCK)]
    for a, b in reversed(cuts) if reverse else cuts:
        yield wave[a:b]


def _median(blocks: Callable[[], Iterable[torch.Tensor]]) -> float:
    """``torch.median`` of the float32 samples ``blocks()`` yields (the lower of the two middle values; at least one
    sample, none NaN), without gathering them: an exact radix selection on their bit patterns, 16 bits per pass over
    the blocks. Each pattern becomes a key whose unsigned order is the numbers' (a negative number's bits inverted, a
    positive one's sign bit set)."""

    def keys() -> Iterator[np.ndarray]:
        for block in blocks():
            bits = block.float().contiguous().numpy().view(np.int32)
            yield (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.uint32) ^ np.uint32(1 << 31)

    high = sum(np.bincount(key >> 16, minlength=1 << 16) for key in keys())  # (65536,) keys per high half
    rank = (int(high.sum()) - 1) // 2  # the lower middle one
    below = np.cumsum(high)
    top = int(np.searchsorted(below, rank, side="right"))  # the high half holding it
    rank -= int(below[top - 1]) if top else 0
    low = sum(np.bincount(key[key >> 16 == top] & 0xFFFF, minlength=1 << 16) for key in keys())
    key = top << 16 | int(np.searchsorted(np.cumsum(low), rank, side="right"))
    bits = key ^ (1 << 31) if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def _trim(
    wave: torch.Tensor, start: int, end: int, trim_db: float, offset: float, floor: float
) -> tuple[int, int] | None:
    """The first and last sample of ``wave[start:end]`` within ``trim_db`` of its peak and above the noise ``floor``,
    both measured from the recording's DC ``offset`` (see :func:`background`); None when no sample is. Read block by
    block: a region may be as long as the recording."""
    end = min(end, wave.shape[0])
    span = [(start, end)]
    peak = max((float((x - offset).abs().max()) for x in _blocks(wave, span)), default=0.0)
    level = max(peak * 10 ** (-trim_db / 20), floor)

    def loud(reverse: bool) -> int | None:
        """The first (``reverse``: last) sample above the level."""
        position = end if reverse else start  # the block's end (reverse), else its start
        for x in _blocks(wave, span, reverse):
            above = ((x - offset).abs() > level).nonzero().flatten()  # (loud samples,)
            if above.numel():
                return position - x.shape[0] + int(above[-1]) if reverse else position + int(above[0])
            position += -x.shape[0] if reverse else x.shape[0]
        return None

    first = loud(False)
    return None if first is None else (first, loud(True) + 1)


@functools.lru_cache(maxsize=1)
def silero_sequence_session() -> Any:
    """An onnxruntime session of Silero VAD's sequence model from the same wheel (the file
    ``load_silero_vad(sequence=True)`` loads, its options, and its load-time warnings about unused initializers
    silenced): the network of :func:`silero_model` exported with its frame loop inside, so a block of frames is one
    session call. Its probabilities are bit-identical to the frame-by-frame model's (tests/test_longform_speed.py)."""
    silero_package()
    try:
        import onnxruntime
        from silero_vad import data
    except ImportError as e:
        raise _import_failed(e, "VAD needs the silero-vad and onnxruntime packages; or pass vad=False") from e
    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = options.intra_op_num_threads = 1
    options.log_severity_level = 3
    path = importlib.resources.files(data) / "silero_vad_16k_sequence.onnx"
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def speech_probabilities(waves: list[torch.Tensor]) -> list[list[float]]:
    """Silero's speech probability of each 32-ms frame of each 16-kHz waveform (S,), exactly as its
    ``get_speech_timestamps`` computes them frame after frame from a fresh state (the last frame zero-padded, each
    frame read after the previous frame's last 64 samples), but with silero-vad's sequence model: one session call
    per 512 frames instead of one per frame (about 2x faster on one core; a file is still one pass from a fresh
    state, so the result is exact).

    Cutting a file into streams that run in parallel does not pay: Silero's LSTM remembers a minute of audio (on a
    5-min digits recording, 30-s streams after a 15-s warm-up differ by up to 0.37 in probability and move speech
    edges; after 60 s still by 0.015), so exact warm-ups would cost more than the parallelism saves on few cores.
    Files run on ``torch.get_num_threads()`` threads instead (onnxruntime releases the GIL)."""
    if not waves:
        return []
    session = silero_sequence_session()  # imports silero_vad through silero_package
    from silero_vad.sequence_vad import DEFAULT_MAX_FRAMES, frame_blocks

    def one(wave: torch.Tensor) -> list[float]:
        """silero-vad's SileroVADSequence.audio_forward: blocks of frames (each after the previous frame's last 64
        samples), the LSTM state carried from block to block."""
        h = c = np.zeros((1, 1, 128), dtype=np.float32)
        probs = []
        for block in frame_blocks(wave.float().numpy(), VAD_FRAME, VAD_CONTEXT, DEFAULT_MAX_FRAMES):  # (n, 64 + 512)
            p, h, c = session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
            probs += p.tolist()
        return probs

    threads = min(torch.get_num_threads(), len(waves))
    if threads <= 1:
        return [one(w) for w in waves]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, waves))


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
    silero_package()
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
    offset, floor = background(wave, spans) if options.trim_db is not None else (0.0, 0.0)
    pad = round(options.speech_pad_ms * sample_rate / 1000)
    regions: list[tuple[int, int]] = []
    for start, end in spans:
        end = min(end, wave.shape[0])
        if options.trim_db is not None:
            # Silero's edges fall on 32-ms frames and lag the onset: search a frame either side, then place the edge
            # on the energy and pad it as speech_pad_ms says
            reach = round(0.064 * sample_rate)
            lo = max(start - reach, regions[-1][1] if regions else 0)
            # a region with no sample above the noise keeps Silero's edges: Silero hears speech the level misses
            hi = min(end + reach, wave.shape[0])
            trimmed = _trim(wave, lo, hi, options.trim_db, offset, floor) or (start, end)
            start, end = max(trimmed[0] - pad, lo), min(trimmed[1] + pad, wave.shape[0])
        if regions and start <= regions[-1][1]:  # padding made neighbours touch: one region
            regions[-1] = (regions[-1][0], max(end, regions[-1][1]))
        elif end > start:
            regions.append((start, end))
    return regions


def _fit(regions: list[tuple[int, int]], max_samples: int) -> list[tuple[int, int]]:
    """Regions longer than ``max_samples`` cut into equal pieces that fit."""
    pieces: list[tuple[int, int]] = []
    for start, end in regions:
        n = math.ceil((end - start) / max_samples)
        bounds = [start + (end - start) * i // n for i in range(n + 1)]
        pieces += list(zip(bounds[:-1], bounds[1:]))
    return pieces


def cut_and_merge(
    regions: list[tuple[int, int]], file: int, max_samples: int, merge: bool, gap: int | None = None
) -> list[Window]:
    """whisperX's cut & merge: a region longer than ``max_samples`` is cut into equal pieces that fit, and (with
    ``merge``) consecutive regions join one window while it spans at most ``max_samples``. With ``gap`` (samples)
    merged windows are packed instead (faster-whisper's ``collect_chunks``): a window joins its regions' audio with
    each pause between two of them cut to at most ``gap`` (its first half kept after the earlier region, the rest
    before the later one), and grows while that input lasts at most ``max_samples``."""
    if merge and gap is not None:
        return _pack(_fit(regions, max_samples), file, max_samples, gap)
    windows: list[Window] = []
    for start, end in _fit(regions, max_samples):
        last = windows[-1] if windows else None
        if merge and last is not None and end - last.start <= max_samples:
            windows[-1] = Window(file, last.start, end, (*last.regions, (start, end)))
        else:
            windows.append(Window(file, start, end, ((start, end),)))
    return windows


def _pack(regions: list[tuple[int, int]], file: int, max_samples: int, gap: int) -> list[Window]:
    """Packed windows (see :func:`cut_and_merge`); ``regions`` fit ``max_samples`` already."""
    groups: list[list[tuple[int, int]]] = []
    size = 0  # input samples of the last group
    for start, end in regions:
        if groups:
            kept = min(start - groups[-1][-1][1], gap)
            if size + kept + end - start <= max_samples:
                groups[-1].append((start, end))
                size += kept + end - start
                continue
        groups.append([(start, end)])
        size = end - start
    windows = []
    for group in groups:
        pieces = [list(group[0])]
        for (_, previous_end), (start, end) in zip(group, group[1:]):
            pause = start - previous_end
            if pause <= gap:  # the whole pause kept: one span
                pieces[-1][1] = end
            else:
                pieces[-1][1] = previous_end + gap // 2
                pieces.append([start - (gap - gap // 2), end])
        spans = tuple((a, b) for a, b in pieces)
        windows.append(Window(file, group[0][0], group[-1][1], tuple(group), spans if len(spans) > 1 else ()))
    return windows
