"""The demo gives every core to the training step's threads and runs its data loader workers in their idle moments."""

from __future__ import annotations

from mmformer.demos.digits import share_cores


def test_cores_are_shared_between_compute_and_loading():
    assert share_cores(1) == (1, 0)  # one core: everything in the training process
    assert share_cores(2) == (2, 1)  # both cores compute; a low-priority worker decodes and augments in between
    assert share_cores(8) == (8, 2)
    assert share_cores(2, threads=1) == (1, 1) and share_cores(4, workers=0) == (4, 0)
