"""Compiled inference with the weights frozen into the graph: inductor's ``freezing``, set around the calls of one
compiled function only.

Freezing folds what a graph reads as parameters (and tensors marked as static addresses) into the compiled code as
constants: CPU linear layers then run on MKL's packed weights, PT2E's quantize/dequantize patterns lower to oneDNN
int8 kernels. Set process-wide, it froze the buffers of every model compiled later in the process — a static KV
cache's write position among them — so the callers here set it for their own calls. (Passed as
``torch.compile(..., options={"freezing": True})`` instead, torch 2.14's lowering of PT2E graphs fails:
"onednn.qlinear_prepack is not an OpOverload".) A frozen graph keeps the weights it was compiled with: its caller
compiles again when they change (:func:`mmformer.generation.search.frozen_next_logits`) or owns weights that never do
(:class:`mmformer.compress.pt2e.PT2EModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def with_freezing(compiled: Callable) -> Callable:
    """``compiled`` (a ``torch.compile`` result) called under inductor's ``freezing``, set for these calls only (a
    compile that happens in one of them freezes)."""
    import torch._inductor.config as inductor

    def call(*inputs: Any) -> Any:
        with inductor.patch(freezing=True):
            return compiled(*inputs)

    return call
