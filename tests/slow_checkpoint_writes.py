"""``python tests/slow_checkpoint_writes.py SECONDS ARGS...``: the ``mmformer`` command with every checkpoint write
paused half-way for SECONDS (after flushing and fsyncing what was written), so that a test can kill a run in the
middle of writing a checkpoint. Injected here, in the tests, rather than as a hook inside mmformer."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from mmformer.cli.main import main


class PausingFile:
    """A file whose first write is flushed to disk and followed by a pause."""

    def __init__(self, f: Any, delay: float):
        self.f, self.delay = f, delay

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        if self.delay > 0 and n:
            self.f.flush()
            os.fsync(self.f.fileno())
            time.sleep(self.delay)
            self.delay = 0.0
        return n

    def flush(self) -> None:
        self.f.flush()


def pausing_save(delay: float):
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        return real_save(obj, PausingFile(f, delay) if hasattr(f, "fileno") else f, *args, **kwargs)

    return save


if __name__ == "__main__":
    torch.save = pausing_save(float(sys.argv[1]))  # this process only: AtomicCheckpointIO writes through torch.save
    main(sys.argv[2:])
