"""Converters from public checkpoints into :class:`~mmformer.MultimodalTransformer` (nothing is downloaded).

Each returns a model whose ``processor`` attribute holds the matching :class:`~mmformer.Processor`.
"""

from __future__ import annotations

import importlib
from typing import Any

_CONVERTERS = {
    "from_open_clip": "mmformer.convert.open_clip",
    "from_hf_clip": "mmformer.convert.hf_clip",
    "from_hf_siglip": "mmformer.convert.hf_siglip",
    "from_timm_vit": "mmformer.convert.timm_vit",
    "from_hf_whisper": "mmformer.convert.hf_whisper",
    "from_hf_bert": "mmformer.convert.hf_bert",
    "from_hf_gpt2": "mmformer.convert.hf_gpt2",
    "from_hf_llama": "mmformer.convert.hf_llama",
    "from_hf_t5": "mmformer.convert.hf_t5",
    "from_openai_whisper": "mmformer.convert.openai_whisper",
}
SOURCES = {name.removeprefix("from_"): name for name in _CONVERTERS}  # CLI names: open_clip, hf_clip, ...

__all__ = [
    "SOURCES",
    "from_hf_bert",
    "from_hf_clip",
    "from_hf_gpt2",
    "from_hf_llama",
    "from_hf_siglip",
    "from_hf_t5",
    "from_hf_whisper",
    "from_open_clip",
    "from_openai_whisper",
    "from_timm_vit",
]


def __getattr__(name: str) -> Any:
    if name in _CONVERTERS:
        return getattr(importlib.import_module(_CONVERTERS[name]), name)
    raise AttributeError(f"module 'mmformer.convert' has no attribute {name!r}")
