"""The adapter a model carries, as peft keeps it on the model (in place, under one adapter name): its config, its
tensors as peft saves them and its own parameters; and the check that peft is installed.

The lowest module of :mod:`mmformer.adapt`: making and merging adapters (:mod:`~mmformer.adapt.adapters`), QLoRA's
4-bit base (:mod:`~mmformer.adapt.four_bit`) and the adapter folder (:mod:`~mmformer.adapt.adapter_files`) all read
the adapter through here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from mmformer.io.pretrained import has_adapter

ADAPTER_NAME = "default"  # peft's adapter name inside a model; files store tensors without it


def require_peft() -> None:
    """A clear error where peft is missing (it is an optional dependency: ``pip install 'mmformer[adapt]'``)."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError("LoRA adapters need the peft package (>= 0.21): pip install 'mmformer[adapt]'")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's own parameters (LoRA A/B, DoRA magnitudes, trained token rows, saved module copies)."""
    from peft.utils import get_peft_model_state_dict

    if not has_adapter(model):
        return {}
    saved = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True), adapter_name=ADAPTER_NAME)
    ids = {id(t) for t in saved.values()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft saves them (names without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def _adapter_config(model: nn.Module) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    if ADAPTER_NAME not in configs:
        raise ValueError("model: carries no adapter (add_lora or load_adapter first)")
    return configs[ADAPTER_NAME]
