"""Fitting a weights file to a model without trusting its config or wasting time and memory.

A model is built on the ``meta`` device (no memory, no random initialisation), its expected tensors are compared
with the file's *header* (names, shapes, dtypes) before anything is allocated, and only then are the file's tensors
read and assigned in place of the meta ones::

    with torch.device("meta"):
        model = MultimodalTransformer(config)          # instant, whatever the config declares
    fill(model, specs, read, strict=True, source=path)  # check against the header, then read and assign

Parameters the file does not hold (a new head, with ``strict=False``) are the only ones initialised: their module's
``reset_parameters()`` runs on real memory. Tied tensors (an LM head sharing the token embedding) are stored once and
tied again after assignment. Nothing here reads files or knows a model class: :mod:`mmformer.io.pretrained` reads the
files, the model builds itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MAX_LISTED = 20


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype, as a file header states them."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)


Reader = Callable[[Iterable[str]], Mapping[str, torch.Tensor]]  # names → tensors (read from the file on demand)


def listed(items: list) -> str:
    """At most :data:`MAX_LISTED` items, comma-separated, with a count of the rest."""
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def human_count(n: int) -> str:
    """1234567 → '1.23 M'."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is exactly an earlier key's tensor (tied weights) → that earlier key."""
    seen: dict[tuple, str] = {}
    found = {}
    for key, t in state.items():
        ident = (
            id(t)  # a meta tensor or a tensor subclass (quantized weights) has no storage of its own
            if t.device.type == "meta" or not is_plain_tensor(t)
            else (t.untyped_storage().data_ptr(), t.storage_offset()),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
        )
        if ident in seen:
            found[key] = seen[ident]
        else:
            seen[ident] = key
    return found


def expected_specs(model: nn.Module) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The tensors ``model`` stores (tied aliases removed) and its aliases (alias → canonical key)."""
    state = model.state_dict(keep_vars=True)
    tied = aliases(state)
    return {k: TensorSpec.of(v) for k, v in state.items() if k not in tied}, tied


def same_shape(expected: tuple[int, ...], found: tuple[int, ...]) -> bool:
    """Shapes that hold the same tensor: equal, or a scalar as ``()`` and as ``(1,)`` (FSDP2 trains 0-d parameters as
    ``(1,)``, see :mod:`mmformer.tasks.parallel`; either form loads into either)."""
    return tuple(expected) == tuple(found) or {tuple(expected), tuple(found)} == {(), (1,)}


def compatible_dtypes(expected: torch.dtype, found: torch.dtype) -> bool:
    """A floating-point tensor may be stored in another floating-point dtype (it is cast on load); other dtypes must
    match exactly."""
    return expected == found or (expected.is_floating_point and found.is_floating_point)


@dataclass(frozen=True)
class LoadPlan:
    """What loading a file into a model will do, decided from the header alone."""

    load: list[str]  # keys read from the file
    missing: list[str]  # keys the model has and the file lacks: initialised (strict=False, or asked for)
    unexpected: list[str]  # keys the file has and the model lacks (ignored, strict=False only)


def plan(
    model: nn.Module,
    specs: Mapping[str, TensorSpec],
    *,
    strict: bool,
    source: object,
    max_parameters: int | None = None,
    initialise: Iterable[str] = (),
) -> LoadPlan:
    """Compare ``model``'s expected tensors with a file header and decide what to load, or raise ``ValueError``.

    Shape and dtype mismatches are refused either way (the weights belong to another config); so is a model that
    declares more parameters than :func:`parameter_ceiling` allows. Missing and unexpected keys are refused when
    ``strict`` and reported as a warning otherwise, except the keys listed in ``initialise`` (parameters the source
    has no counterpart for, such as a converted tower's logit scale), which keep their initial values either way.
    The messages carry a one-line size summary.
    """
    expected, tied = expected_specs(model)
    specs = {k: v for k, v in specs.items() if k not in tied or tied[k] not in specs}  # an alias stored once
    specs = {tied.get(k, k): v for k, v in specs.items()}
    declared = sum(s.numel for s in expected.values())
    held = sum(s.numel for s in specs.values())
    summary = size_summary(declared, held, source)
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(s.shape)}"
        for k, s in sorted(specs.items())
        if k in expected and not same_shape(expected[k].shape, s.shape)
    ]
    if wrong_shape:
        raise ValueError(
            f"{source}: {len(wrong_shape)} tensor(s) have a different shape than the model config gives (the "
            f"weights belong to another config): {listed(wrong_shape)} ({summary})"
        )
    wrong_dtype = [
        f"{k}: expected {expected[k].dtype}, found {s.dtype}"
        for k, s in sorted(specs.items())
        if k in expected and not compatible_dtypes(expected[k].dtype, s.dtype)
    ]
    if wrong_dtype:
        raise ValueError(f"{source}: {len(wrong_dtype)} tensor(s) have an incompatible dtype: {listed(wrong_dtype)}")
    initialise = set(initialise)
    missing = sorted(set(expected) - set(specs) - initialise)
    unexpected = sorted(set(specs) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys (initialised afresh): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (ignored): {listed(unexpected)}")
    if problems:
        message = f"{source}: the weights do not match the model config: " + "; ".join(problems) + f" ({summary})"
        if strict:
            raise ValueError(message + ". Pass strict=False to load the matching tensors anyway")
    fresh = sum(expected[k].numel for k in initialise if k in expected and k not in specs)
    ceiling = parameter_ceiling(held + fresh, strict, max_parameters)
    if declared > ceiling:
        raise ValueError(too_many_parameters(source, summary, ceiling, max_parameters))
    if problems:
        warnings.warn(message, stacklevel=3)
    initialised = sorted(set(missing) | (initialise & set(expected)) - set(specs))
    return LoadPlan(load=sorted(set(expected) & set(specs)), missing=initialised, unexpected=unexpected)


def size_summary(declared: int, held: int, source: object, *, at_least: bool = False) -> str:
    """'config declares 51.5 G parameters; model.safetensors holds 1.3 M'."""
    declares = f"at least {human_count(declared)}" if at_least else human_count(declared)
    return f"config declares {declares} parameters; {_name(source)} holds {human_count(held)}"


def too_many_parameters(source: object, summary: str, ceiling: int, max_parameters: int | None) -> str:
    """The refusal of a config that declares more than :func:`parameter_ceiling` allows."""
    how = "max_parameters=N" + ("" if max_parameters is not None else " to allow more (e.g. training from scratch)")
    return (
        f"{source}: the model config declares more parameters than allowed ({summary}; the limit is "
        f"{human_count(ceiling)}: pass {how}); the config does not belong to these weights"
    )


def is_plain_tensor(t: torch.Tensor) -> bool:
    """A plain tensor or parameter, not a tensor subclass (such as torchao's quantized weights)."""
    return type(t) in (torch.Tensor, nn.Parameter)


def base_layer(module: nn.Module) -> nn.Module:
    """The layer inside the wrappers peft may put around ``module`` (LoRA / DoRA layers, ``modules_to_save`` copies,
    trainable-token rows, nested), or ``module`` itself.

    Read a weight's dtype and device here, never through the wrapper: a wrapper may not have the attribute
    (``TrainableTokensWrapper.bias``), may compute it on every read (its ``weight`` merges the trained rows into a
    full copy) or may give the base's value where its call gives another (a LoRA layer's ``weight``). Only the
    wrapper's call gives the adapted output. Duck-typed on peft's wrappers, so nothing here imports peft."""
    while True:
        kind = type(module)
        if hasattr(kind, "get_base_layer"):  # peft's tuner layers (LoRA, DoRA, trainable tokens)
            inner = module.get_base_layer()
        elif hasattr(kind, "original_module") or "original_module" in module._modules:  # peft's auxiliary wrappers
            inner = module.original_module
        else:
            return module
        if inner is module or inner is None:
            return module
        module = inner


def model_device(model: nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's); a model of compiled graphs that is no module
    (:class:`mmformer.compress.pt2e.PT2EModel`) says where its graphs run."""
    if not isinstance(model, nn.Module):
        return model.device
    return next(model.parameters()).device


def parameter_ceiling(held: int, strict: bool, max_parameters: int | None = None) -> int:
    """The most parameters a config may declare for a file holding ``held`` elements: ``max_parameters`` if given,
    else ``held`` (strict: every tensor must come from the file) or ``2 * held + 16 M`` (room for new heads)."""
    if max_parameters is not None:
        return max_parameters
    return held if strict else 2 * held + 2**24


def fill(
    model: nn.Module,
    specs: Mapping[str, TensorSpec],
    read: Reader,
    *,
    strict: bool = True,
    source: object = "weights",
    device: torch.device | str | None = None,
    max_parameters: int | None = None,
    initialise: Iterable[str] = (),
) -> LoadPlan:
    """Load a file into a model built on the meta device: :func:`plan` from the header, then read and assign.

    Floating-point tensors are cast to the dtype the model was built with; everything lands on ``device``
    (default CPU). Keys the file lacks (``strict=False``, or listed in ``initialise``) are initialised by their
    module's ``reset_parameters``.
    The file's alias of a tied tensor must equal the canonical one.
    """
    device = torch.device(device or "cpu")
    load = plan(model, specs, strict=strict, source=source, max_parameters=max_parameters, initialise=initialise)
    expected, tied = expected_specs(model)
    wanted = set(load.load) | {alias for alias, canonical in tied.items() if alias in specs}
    tensors = dict(read(sorted(wanted)))
    for alias, canonical in tied.items():
        if alias in tensors:
            value = tensors.pop(alias)
            if canonical not in tensors:
                tensors[canonical] = value
            elif not torch.equal(value, tensors[canonical]):
                raise ValueError(
                    f"{source}: {alias} differs from {canonical}, but this model ties them (e.g. tie_lm_head=True)"
                )
    subclasses = []  # tensor subclasses (torchao's quantized weights) are assigned as they are, frozen
    for key, value in tensors.items():
        if not is_plain_tensor(value):
            subclasses.append(key)
            if value.device != device:
                tensors[key] = value.to(device)
            continue
        dtype = expected[key].dtype
        value = value.reshape(expected[key].shape)  # a no-op but for a () ↔ (1,) scalar (same_shape)
        tensors[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    _initialise(model, load.missing, device)
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False, assign=True)
    for key in subclasses:
        model.get_parameter(key).requires_grad_(False)
    _retie(model, tied)
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{source}: no values for {listed(still_meta)} (neither in the file nor initialisable)")
    return load


def _initialise(model: nn.Module, keys: list[str], device: torch.device) -> None:
    """Give the missing ``keys`` real memory and their module's initial values (``reset_parameters``)."""
    owners = {key.rpartition(".")[0] for key in keys}
    for name in sorted(owners):
        module = model.get_submodule(name)
        reset = getattr(module, "reset_parameters", None)
        if reset is None:
            raise ValueError(f"cannot initialise the missing tensors of {name or 'the model'}: "
                             f"{type(module).__name__} has no reset_parameters()")  # fmt: skip
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            reset()


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Point every alias at its canonical parameter again (assignment replaced the canonical one)."""
    for alias, canonical in tied.items():
        owner_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, model.get_parameter(canonical))


def build_on_meta(factory: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``factory(*args, **kwargs)`` on the meta device: every parameter a shape without memory, so a config can be
    checked against a weights file before anything is allocated."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def in_memory(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, TensorSpec], Reader]:
    """Header and reader of a state dict already in memory (a converter's input, a module's state)."""
    return {k: TensorSpec.of(v) for k, v in state.items()}, lambda keys: {k: state[k] for k in keys}


def _name(source: object) -> str:
    text = str(source)
    return text.rsplit("/", 1)[-1] or text
