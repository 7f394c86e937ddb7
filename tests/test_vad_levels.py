"""The VAD's edges are placed on the signal's level (``VadOptions.trim_db``): measured from the recording's DC offset,
not from zero, and never losing a region Silero found. A microphone's offset of 0.2 once put every sample under the
noise floor, and every region of a recording was dropped (an empty transcript)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmformer.longform.vad import VAD_FRAME, VadOptions, _regions, speech_probabilities, speech_regions

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository: the recording is built by one function
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def recording() -> torch.Tensor:
    return digits_recording(6, seed=4)[0]  # ~16 s: six utterances of the shipped clips over -60 dBFS noise


@pytest.mark.parametrize("offset", [0.2, -0.3, 0.01])
def test_a_dc_offset_moves_no_edge_the_level_places(recording, offset):
    """On Silero's same frames, the edges placed on the signal with an offset added are the edges without it."""
    (probs,) = speech_probabilities([recording])
    clean = _regions(recording, probs, recording.shape[0], RATE, VadOptions())
    shifted = _regions(recording + offset, probs, recording.shape[0], RATE, VadOptions())
    assert len(clean) >= 6
    assert len(shifted) == len(clean)
    edges = torch.tensor(shifted) - torch.tensor(clean)  # (regions, 2) samples
    assert edges.abs().max() <= 1, (shifted, clean)  # a sample, for the float rounding of the offset


def test_a_dc_offset_keeps_every_region_silero_finds(recording):
    """The whole path, Silero included (its frames move a little under an offset, as its own get_speech_timestamps's
    do): every region Silero finds is kept, its edges placed within the level's reach of Silero's."""
    reach = round(0.064 * RATE) + RATE // 10  # the level's search beyond Silero's edges, and speech_pad_ms
    for offset in (0.2, -0.3):
        placed = speech_regions(recording + offset, RATE)
        silero = speech_regions(recording + offset, RATE, VadOptions(trim_db=None, speech_pad_ms=0))
        assert len(placed) == len(silero) >= 5
        edges = torch.tensor(placed) - torch.tensor(silero)  # (regions, 2) samples
        assert edges.abs().max() <= reach, (placed, silero)


def test_a_region_with_nothing_above_the_noise_keeps_silero_edges():
    """Speech Silero hears under the noise's level (nothing above its floor) keeps Silero's edges, padded, instead of
    being dropped by the level."""
    wave = torch.randn(40 * VAD_FRAME, generator=torch.Generator().manual_seed(0)) * 0.01  # (S,) noise, no peak
    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * 10  # one Silero region: frames 10..29
    options = VadOptions(speech_pad_ms=0)
    assert _regions(wave, probs, wave.shape[0], RATE, options) == [(10 * VAD_FRAME, 30 * VAD_FRAME)]
    pad = RATE // 50  # 20 ms
    padded = _regions(wave, probs, wave.shape[0], RATE, VadOptions(speech_pad_ms=20))
    assert padded == [(10 * VAD_FRAME - pad, 30 * VAD_FRAME + pad)]
