"""Skipping bad samples without hiding a broken data set.

One unreadable file in a million should not stop a training run; a data set where every tenth file is
unreadable almost certainly means a wrong path or a wrong format, and should. :class:`BadSampleTracker`
warns about each skipped sample (naming the file and the reason) and raises :class:`TooManyBadSamplesError`
once the skipped fraction exceeds ``max_bad_fraction`` after ``min_samples`` samples were seen.

Each DataLoader worker counts its own samples (workers are separate processes).
"""

from __future__ import annotations

import warnings

from mmformer.data.io import SampleError

MIN_SAMPLES = 20


class SkippedSampleWarning(UserWarning):
    """A bad sample was skipped; the message names the file and the reason."""


class TooManyBadSamplesError(RuntimeError):
    """More than ``max_bad_fraction`` of the samples seen so far were bad."""


class BadSampleTracker:
    """Counts good and bad samples of one data set.

    Args:
        name: the data set, for messages (usually its path).
        max_bad_fraction: the largest tolerated fraction of bad samples, in [0, 1].
        min_samples: how many samples must be seen before the fraction is checked.
    """

    def __init__(self, name: str, max_bad_fraction: float = 0.1, min_samples: int = MIN_SAMPLES):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1]; got {max_bad_fraction!r}")
        self.name = name
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.num_seen = 0
        self.num_bad = 0

    def good(self) -> None:
        self.num_seen += 1

    def bad(self, error: SampleError) -> None:
        """Record a skipped sample, warn, and raise if the data set looks broken."""
        self.num_seen += 1
        self.num_bad += 1
        warnings.warn(f"skipping bad sample {error.path}: {error.reason}", SkippedSampleWarning, stacklevel=3)
        fraction = self.num_bad / self.num_seen
        if self.num_seen >= self.min_samples and fraction > self.max_bad_fraction:
            raise TooManyBadSamplesError(
                f"{self.num_bad} of {self.num_seen} samples read from {self.name} were bad ({fraction:.0%}, more than "
                f"max_bad_fraction={self.max_bad_fraction}); last one: {error.path}: {error.reason}. Check the paths "
                f"and the format of the data, or raise max_bad_fraction."
            ) from error

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0
