"""Seeds derived from a few integers, and a scope in which torch's random draws follow one of them.

The training loader draws every random choice (the order of an epoch, each sample's augmentation) from seeds that
depend only on the run's seed and where the choice is made (epoch, rank, sample index): a resumed run, or one with
another number of loader workers, makes the same choices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a few ints (different tuples give unrelated seeds)."""
    digest = hashlib.sha256(",".join(map(str, values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the scope, torch's default CPU generator starts from ``seed``; afterwards it is back where it was.

    Library transforms (torchvision's, torchaudio's masking) draw from that global generator and take no generator
    of their own; restoring it keeps the caller's stream (in a loader without workers, the one training draws dropout
    from) untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
