"""QLoRA's 4-bit base through ``bitsandbytes``: the frozen base's linear layers quantized to NF4 / FP4 and back, and
the bytes a model's weights take with their quantization state.

QLoRA (Dettmers et al. 2023): ``quantize: nf4`` replaces the frozen base's linear layers with bitsandbytes
``Linear4bit`` (NF4, double-quantized block scales) before LoRA is added; peft then wraps them with its 4-bit LoRA
layer. bitsandbytes was chosen over torchao's NF4 tensor because peft's LoRA layers dispatch on bitsandbytes'
``Linear4bit`` (merging dequantizes and requantizes), and bitsandbytes >= 0.45 runs ``Linear4bit`` on CPU as well
as CUDA with torch 2.11-2.14 wheels; torchao's ``NF4Tensor`` has no peft LoRA layer.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.adapt.adapter_state import adapter_parameters
from mmformer.compress.quantization import quantizable
from mmformer.io.pretrained import has_adapter

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

QUANT_TYPES = ("nf4", "fp4")
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size: the CPU eval kernel needs whole blocks per weight row
BNB_CPU_ROWS = 32  # and output rows in groups of 32


def quantize_4bit(
    model: MultimodalTransformer, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None
) -> MultimodalTransformer:
    """Replace every linear layer :func:`mmformer.compress.quantization.quantizable` selects (the rule torchao
    quantization
    follows: not an LM or masked-LM head tied to the token table) by a frozen bitsandbytes ``Linear4bit`` holding its
    weight in 4 bits (NF4 or FP4, double-quantized block scales), on the weight's device.

    Layers whose input width is not a multiple of 64 (bitsandbytes' block) or whose output width is not a multiple
    of 32 stay float, with a warning that counts them: bitsandbytes' CPU eval kernel cannot lay such weights out
    and fails on the first forward in eval mode.

    The model is marked ``is_loaded_in_4bit`` (the attribute transformers sets), so that peft wraps these layers
    with its 4-bit LoRA layer. ``compute_dtype`` (default: the weights' dtype) is what the layers compute in.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            "lora.quantize (QLoRA) needs the bitsandbytes package: pip install 'bitsandbytes>=0.45'"
        ) from e
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {list(QUANT_TYPES)}, got {quant_type!r}")
    if has_adapter(model):
        raise ValueError("model: quantize the base before adding an adapter")
    names = quantizable(model)
    fits = lambda m: m.in_features % BNB_BLOCK == 0 and m.out_features % BNB_CPU_ROWS == 0  # noqa: E731
    left = [name for name in names if not fits(model.get_submodule(name))]
    if left:
        warnings.warn(
            f"lora.quantize: {len(left)} of {len(names)} linear layers stay float (e.g. {left[0]}): their input width "
            f"is not a multiple of {BNB_BLOCK} or their output width not a multiple of {BNB_CPU_ROWS}, which "
            "bitsandbytes' 4-bit CPU kernel needs",
            stacklevel=2,
        )
    for name in [n for n in names if n not in left]:
        module = model.get_submodule(name)
        weight = module.weight
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=True,
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.detach().to(torch.float32 if weight.dtype == torch.float64 else weight.dtype),
            requires_grad=False,
            compress_statistics=True,
            quant_type=quant_type,
        ).to(weight.device)  # bitsandbytes quantizes on the move to a device
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    model.is_loaded_in_4bit = True
    return model


def _four_bit_layers(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers in ``model`` (none without bitsandbytes)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"]


def dequantize_4bit(model: MultimodalTransformer) -> MultimodalTransformer:
    """Undo :func:`quantize_4bit` as far as rounding allows: every bitsandbytes ``Linear4bit`` becomes an
    ``nn.Linear`` holding its dequantized weight (in the dtype it was quantized from), so the model saves and merges
    as a float model. Returns ``model``."""
    if has_adapter(model):
        raise ValueError("model: dequantize the base without its adapter (merge_and_unload does both)")
    import bitsandbytes as bnb

    for name in _four_bit_layers(model):
        layer = model.get_submodule(name)
        # saving restores the layout dequantize_4bit reads: on CPU, bitsandbytes repacks the 4-bit codes in place for
        # its eval kernel on the first eval forward
        layer.state_dict()
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(weight.dtype), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    return model


def weight_bytes(model: nn.Module, *, exclude_adapter: bool = True) -> int:
    """Bytes the model's weights take in memory: parameters and buffers, 4-bit weights with their quantization
    state (block scales, code book), the adapter's own tensors left out unless ``exclude_adapter`` is False."""
    adapter = {id(p) for p in adapter_parameters(model).values()} if exclude_adapter else set()
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or id(tensor) in adapter:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state: Any) -> int:
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "absmax"):  # the nested state of double quantization
            total += _quant_state_bytes(value)
    return total
