"""Length distributions of real data, for the benchmarks that train as users do (no real data is read: nothing is
downloaded at run time, so the distributions are parametric models of published statistics, stated here).

Captions (COCO). Chen et al. 2015, "Microsoft COCO Captions: Data Collection and Evaluation Server"
(arXiv:1504.00325): crowd workers were asked for captions of at least 8 words; COCO captions average about 10.5
words, with a thin tail of long ones. Model: words = 8 + a geometric tail of mean 2.5, capped at 50 words; CLIP's
BPE spends about 1.15 tokens per word (punctuation, split words) plus start and end tokens. Mean ≈ 14 tokens,
95th percentile ≈ 21, so padding to CLIP's fixed context of 77 computes ~5 padding tokens per real one.

Speech (LibriSpeech-like). LibriSpeech utterances are read-speech segments of a few seconds to ~35 s; the
issue's benchmark spread is 2–15 s. Model: durations uniform in [2, 15] s (mean 8.5 s); transcripts at 2.7 words
per second (read speech, about 160 words/min) × 1.3 Whisper BPE tokens per word, plus start/end tokens. Hugging
Face's Whisper feature extractor pads every clip to 30 s (3000 mel frames, 1500 encoder positions).
"""

from __future__ import annotations

import torch

CLIP_CONTEXT = 77  # open_clip's tokenizer: every caption is padded (or cut) to 77 tokens
WHISPER_SECONDS = 30.0  # Hugging Face's WhisperFeatureExtractor pads every clip to 30 s
FRAMES_PER_SECOND = 100  # Whisper's log-mel: hop 160 at 16 kHz


def caption_tokens(n: int, generator: torch.Generator, context: int = CLIP_CONTEXT) -> torch.Tensor:
    """(n,) token counts of COCO-like captions (start and end tokens included), at most ``context``."""
    p = 1 / 3.5  # a geometric tail of mean (1 - p) / p = 2.5 words beyond the 8 asked for
    tail = (torch.rand(n, generator=generator).log() / torch.log(torch.tensor(1 - p))).floor()
    words = (8 + tail).clamp(max=50)
    dither = torch.rand(n, generator=generator) - 0.5  # rounds 1.15 tokens per word up or down at random
    tokens = (words * 1.15 + dither).round().long() + 2
    return tokens.clamp(max=context)


def clip_seconds(n: int, generator: torch.Generator, low: float = 2.0, high: float = 15.0) -> torch.Tensor:
    """(n,) clip durations in seconds, uniform in [low, high]."""
    return low + (high - low) * torch.rand(n, generator=generator)


def transcript_tokens(seconds: torch.Tensor) -> torch.Tensor:
    """(n,) transcript token counts of clips of these durations (start and end tokens included)."""
    return (seconds * 2.7 * 1.3).round().long() + 2
