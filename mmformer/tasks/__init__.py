"""Training logic: losses, metrics, the learning-rate schedule and the LightningModule (the model knows nothing
about Lightning).

Names load lazily, so that ``import mmformer.tasks.losses`` needs only torch (not Lightning or torchmetrics).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ContrastiveLoss": "mmformer.tasks.losses",
    "SigLipLoss": "mmformer.tasks.losses",
    "caption_loss": "mmformer.tasks.losses",
    "ctc_loss": "mmformer.tasks.losses",
    "gather_features": "mmformer.tasks.losses",
    "MultimodalTask": "mmformer.tasks.module",
    "NonFiniteLossError": "mmformer.tasks.nonfinite",
    "adamw": "mmformer.tasks.module",
    "WarmupCosine": "mmformer.tasks.schedule",
}

__all__ = [
    "ContrastiveLoss",
    "MultimodalTask",
    "NonFiniteLossError",
    "SigLipLoss",
    "WarmupCosine",
    "adamw",
    "caption_loss",
    "ctc_loss",
    "gather_features",
]

if TYPE_CHECKING:
    from mmformer.tasks.losses import ContrastiveLoss, SigLipLoss, caption_loss, ctc_loss, gather_features
    from mmformer.tasks.module import MultimodalTask, adamw
    from mmformer.tasks.nonfinite import NonFiniteLossError
    from mmformer.tasks.schedule import WarmupCosine


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmformer.tasks' has no attribute {name!r}")
