"""mmformer: images, audio and text on one shared transformer stack.

Public names load lazily, so ``import mmformer`` (and ``mmformer --help``) stays fast: torch, Lightning and timm are
imported only when something that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "mmformer.config",
    "StackConfig": "mmformer.config",
    "ImageConfig": "mmformer.config",
    "AudioConfig": "mmformer.config",
    "TextConfig": "mmformer.config",
    "MultimodalTransformer": "mmformer.model",
    "KVCache": "mmformer.layers.cache",
    "Tokenizer": "mmformer.preprocess.tokenizer",
    "Processor": "mmformer.preprocess.processor",
    "ZeroShotClassifier": "mmformer.zeroshot",
    "load_pretrained": "mmformer.io.auto",
    "from_pretrained": "mmformer.io.auto",
    "load_for_inference": "mmformer.io.auto",
    "save_pretrained": "mmformer.io.pretrained",
}
_SUBMODULES = {"convert", "data", "layers", "embedders", "generation", "tasks"}

__all__ = [
    "AudioConfig",
    "ImageConfig",
    "KVCache",
    "ModelConfig",
    "MultimodalTransformer",
    "Processor",
    "StackConfig",
    "TextConfig",
    "Tokenizer",
    "ZeroShotClassifier",
    "convert",
    "data",
    "embedders",
    "from_pretrained",
    "generation",
    "layers",
    "load_for_inference",
    "load_pretrained",
    "save_pretrained",
    "tasks",
]

if TYPE_CHECKING:
    from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
    from mmformer.io.auto import from_pretrained, load_for_inference, load_pretrained
    from mmformer.io.pretrained import save_pretrained
    from mmformer.layers.cache import KVCache
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer
    from mmformer.zeroshot import ZeroShotClassifier


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mmformer.{name}")
    raise AttributeError(f"module 'mmformer' has no attribute {name!r}")
