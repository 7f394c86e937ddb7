"""Long-form transcription (issue #25): audio seconds per second on one long recording at whisper-tiny dimensions
(random weights), mmformer's paths beside openai-whisper, faster-whisper and Hugging Face's pipeline; and the
VAD-batched path's WER against the same utterances one by one on a digits recording (the shipped model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits"


def digits_recording(
    n_utterances: int,
    seed: int = 0,
    sample_rate: int = 16000,
    noise: float = 0.001,
    offset: int = 0,
    pause: tuple[float, float] = (0.3, 2.0),
) -> tuple[torch.Tensor, list[dict]]:
    """A long recording of test-split utterances (the shipped clips, resampled) separated by pauses drawn from
    ``pause`` seconds, over seeded white noise of standard deviation ``noise``; and the truth, one
    ``{"start", "end", "text"}`` per utterance (seconds: the clip's span in the recording)."""
    from mmformer.data.io import read_audio

    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    picks = [rows[(offset + i) % len(rows)] for i in range(n_utterances)]
    parts, truth, pos = [], [], 0
    for row in picks:
        gap = round(rng.uniform(*pause) * sample_rate)
        clip = read_audio(DIGITS / row["audio_filepath"], sample_rate)[0]
        parts += [torch.zeros(gap), clip]
        truth.append({"start": (pos + gap) / sample_rate, "end": (pos + gap + clip.shape[0]) / sample_rate,
                      "text": row["text"]})  # fmt: skip
        pos += gap + clip.shape[0]
    parts.append(torch.zeros(round(rng.uniform(*pause) * sample_rate)))
    wave = torch.cat(parts)
    wave += torch.from_numpy(rng.standard_normal(wave.shape[0]).astype(np.float32)) * noise
    return wave, truth
