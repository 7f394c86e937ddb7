"""The demo shares the cores between the training step's threads and the data loader workers."""

from __future__ import annotations

from mmformer.demos.digits import share_cores


def test_cores_are_shared_between_compute_and_loading():
    assert share_cores(1) == (1, 0)  # one core: everything in the training process
    assert share_cores(2) == (1, 1)  # a loader worker decodes and augments beside the step
    assert share_cores(8) == (6, 2)
    assert share_cores(2, threads=2) == (2, 1) and share_cores(4, workers=0) == (4, 0)
