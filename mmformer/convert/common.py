"""Helpers the converters share: safe state-dict and Hugging Face checkpoint loading, q/k/v fusing, an exact weight
mapper and the processor.

A converter turns a public checkpoint's state dict into an mmformer one with a :class:`WeightMap`::

    wm = WeightMap(source_state_dict, name="open_clip", ignore=["*.position_ids"])
    wm.copy("image_embed.patch.weight", "visual.conv1.weight")
    wm.copy("image_proj.weight", "visual.proj", torch.t)                    # transformed on the way
    wm.copy_module("stacks.vision.norm", "visual.ln_post")                  # .weight and .bias
    wm.fuse("stacks.text.blocks.0.attn.fn.qkv.weight", [f"layers.0.{n}_proj.weight" for n in "qkv"])
    wm.load_into(model)   # raises listing unmapped / missing source keys, missing target keys, shape mismatches

``copy``, ``copy_module`` and ``fuse`` record a missing source key and go on, so that one error lists every problem;
``get`` (for values a converter computes itself) raises at once.

Nothing here unpickles arbitrary objects: files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.io import weights
from mmformer.io.hub import Source, read_json
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

__all__ = [
    "STATE_DICT_NAMES",
    "UnsupportedModelError",
    "WeightMap",
    "activation_kind",
    "build_processor",
    "common_eps",
    "fuse_qkv",
    "is_path",
    "load_exact",
    "load_state_dict",
    "map_cross_attention",
    "read_hf_checkpoint",
    "stack_rows",
]

# File names looked for, in this order, when a converter is given a directory.
STATE_DICT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)


class UnsupportedModelError(ValueError):
    """The source model uses a feature mmformer cannot reproduce exactly; the message names the feature."""


def is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


# ---------------------------------------------------------------------------------------------------- loading
def lm_head_tied(
    state: Mapping[str, torch.Tensor], head: str, embedding: str, config: Mapping[str, Any] | None = None
) -> bool:
    """Whether a checkpoint's LM head ``head`` is its token table ``embedding``: absent from the state dict (tied
    in the model), or stored as an equal copy. A head absent from a checkpoint whose ``config`` says
    ``tie_word_embeddings: false`` is refused: the model has a head of its own that the file does not hold (a bare
    ``LlamaModel`` saved without its ``lm_head``), and tying it would give another model."""
    if head not in state and config is not None and config.get("tie_word_embeddings") is False:
        raise UnsupportedModelError(
            f"the checkpoint has no LM head ({head!r}) and its config says tie_word_embeddings=false, so the head is "
            f"not the token embeddings ({embedding!r}): save the model with its head (e.g. LlamaForCausalLM rather "
            "than LlamaModel)"
        )
    tokens = state.get(embedding)
    return head not in state or (tokens is not None and torch.equal(state[head], tokens))


def extra_eos_ids(config: Mapping[str, Any], directory: Path | None, eos_id: int | None) -> list[int]:
    """``TextConfig.extra_eos_ids``: the end-of-text ids a checkpoint lists besides ``eos_id`` (the one
    ``TextConfig.eos_id`` holds), from config.json's and generation_config.json's ``eos_token_id`` lists (Llama 3:
    ``[128001, 128008, 128009]``), which Hugging Face's ``generate`` stops at, each of them (``TextConfig`` refuses
    ids outside the vocabulary)."""
    generation = (read_json(directory / "generation_config.json") if directory is not None else None) or {}
    ids: list[int] = []
    for value in (config.get("eos_token_id"), generation.get("eos_token_id")):
        ids += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if is_int(v)]
    return [i for i in dict.fromkeys(ids) if i != eos_id]


def first_id(value: Any) -> Any:
    """The first of a config's token ids where it lists several (``eos_token_id: [2, 32000]``), else the value."""
    return value[0] if isinstance(value, (list, tuple)) else value


def id_in_vocab(token_id: Any, vocab_size: int) -> int | None:
    """A special-token id from a checkpoint's config if it names a row of the token table, else None (configs carry
    ids of tokens a tokenizer adds on top, or placeholders such as -1)."""
    ok = is_int(token_id) and 0 <= token_id < vocab_size
    return token_id if ok else None


def load_state_dict(path: str | os.PathLike, names: Iterable[str] = STATE_DICT_NAMES) -> dict[str, torch.Tensor]:
    """Read a state dict from a file or a directory, safely: safetensors, or ``torch.load(weights_only=True)``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped and a
    DDP ``module.`` prefix on every key is removed. Sharded checkpoints (``*.index.json``) are read shard by shard.

    Args:
        path: a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, a ``*.index.json``, or a directory holding
            one of ``names``.
        names: file names to look for, in order, when ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"path: expected a directory holding one of {list(names)}, got {os.fspath(path)!r}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {os.fspath(path)!r}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            shards = {str(shard) for shard in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"path: {os.fspath(path)!r} is not a sharded-checkpoint index (a JSON object with a 'weight_map' of "
                f"tensor name → shard file): {type(e).__name__}: {e}"
            ) from e
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            state.update(_load_file(path.parent / shard))
        return state
    return _load_file(path)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(path), device="cpu")
        except Exception as e:  # SafetensorError (a header lying about sizes/offsets, a truncated file), OSError
            raise ValueError(
                f"path: {os.fspath(path)!r} is not a valid safetensors file ({e}); its header may be corrupt or "
                "disagree with the data (tensor sizes/offsets), or the file may be truncated"
            ) from e
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                raise ValueError(
                    f"path: {os.fspath(path)!r} is a TorchScript archive (as OpenAI's original CLIP .pt files), which "
                    "mmformer does not load; if you trust it, pass `torch.jit.load(path, map_location='cpu')"
                    ".state_dict()` to the converter instead"
                )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"path: {os.fspath(path)!r} holds objects other than tensors and plain containers; mmformer only loads "
            f"weights (safetensors or torch.load(weights_only=True)) and never unpickles arbitrary objects: {e}"
        ) from e
    return _unwrap(obj, os.fspath(path))


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"path: expected {where!r} to hold a state dict, got a {type(obj).__name__}")
    for key in ("state_dict", "model", "module"):
        if not all(isinstance(v, torch.Tensor) for v in obj.values()) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    others = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"path: expected {where!r} to hold only tensors, but these entries are not: {others[:20]}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def read_hf_checkpoint(
    path_or_model: Any,
    *,
    model_type: str | tuple[str, ...],
    name: str,
    model_class: str,
    folder: str = "save_pretrained output",
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path | None]:
    """(config dict, state dict, directory or None) of a ``transformers`` model instance, a local directory or a
    resolved :class:`~mmformer.io.hub.Source` (whose ``config.json`` :func:`mmformer.io.hub.resolve_source` read once).

    The directory comes back so that a converter can read the files beside the weights (``tokenizer.json``, ...).

    Args:
        path_or_model: a model with a ``config`` (``PretrainedConfig``), a directory with ``config.json`` and
            weights (read with :func:`load_state_dict`), or a Source of a Hugging Face folder.
        model_type: the config's ``model_type`` the converter handles, or several (a config without one is taken as
            the first).
        name: the architecture in error messages (``"BERT"``).
        model_class: the model classes accepted, in error messages (``"BertModel"``).
        folder: what the directory may be, in error messages.

    Raises:
        FileNotFoundError: a directory without ``config.json``.
        TypeError: neither a path nor a model with a config.
        UnsupportedModelError: a config of another ``model_type``.
    """
    if isinstance(path_or_model, Source) and path_or_model.local and path_or_model.config is not None:
        directory, config = path_or_model.path, dict(path_or_model.config)
        state = load_state_dict(directory)
    elif is_path(path_or_model) or isinstance(path_or_model, Source):
        directory = Path(path_or_model.location if isinstance(path_or_model, Source) else path_or_model)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"path_or_model: expected a local {name} directory with config.json and model.safetensors ({folder}), "
                f"got {os.fspath(path_or_model)!r}"
            )
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        state = load_state_dict(directory)
    elif isinstance(path_or_model, nn.Module) and hasattr(getattr(path_or_model, "config", None), "to_dict"):
        directory, config, state = None, path_or_model.config.to_dict(), path_or_model.state_dict()
    else:
        raise TypeError(
            f"path_or_model: expected a transformers {model_class}, a local directory or an mmformer.io.hub.Source, "
            f"got {type(path_or_model).__name__}"
        )
    types = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    if config.get("model_type", types[0]) not in types:
        raise UnsupportedModelError(
            f"path_or_model: expected a {name} model (model_type {' or '.join(map(repr, types))}), got "
            f"model_type={config['model_type']!r}"
        )
    return config, state, directory


# ---------------------------------------------------------------------------------------------------- q/k/v
def fuse_qkv(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
    """Stack separate q, k, v projection weights (or biases) row-wise into mmformer's fused ``qkv`` layout.

    A missing bias (None, e.g. Whisper's key projection has none) becomes zeros shaped like the others.
    """
    return stack_rows([q, k, v], what="fuse_qkv: q, k, v")


def stack_rows(parts: Iterable[torch.Tensor | None], *, what: str = "parts") -> torch.Tensor:
    """Concatenate tensors along dim 0; a None part is zeros shaped like the first given one."""
    parts = list(parts)
    like = next((t for t in parts if t is not None), None)
    if like is None:
        raise ValueError(f"{what}: expected at least one tensor, got only None")
    shapes = [None if t is None else tuple(t.shape) for t in parts]
    if len({s[1:] for s in shapes if s is not None}) > 1:
        raise ValueError(f"{what}: must agree in all but the first dimension, got shapes {shapes}")
    return torch.cat([t if t is not None else torch.zeros_like(like) for t in parts], dim=0)


# ---------------------------------------------------------------------------------------------------- mapping
class WeightMap:
    """Builds an mmformer state dict from a source one, remembering which source keys each target came from.

    :meth:`load_into` refuses anything but an exact match: it raises one error listing every source key that was
    not used (unless ``ignore`` matches it), every target key left without a value and every shape mismatch
    (naming the source key(s), their shapes, and the target's expected shape).

    Args:
        source: the source state dict (tensors).
        name: the source's name in error messages (e.g. ``"open_clip"``).
        ignore: ``fnmatch`` patterns of source keys that may stay unused (buffers such as ``*.position_ids``).
    """

    def __init__(self, source: Mapping[str, torch.Tensor], *, name: str, ignore: Iterable[str] = ()):
        self.source = dict(source)
        self.name = name
        self.ignore = list(ignore)
        self.target: dict[str, torch.Tensor] = {}
        self.origin: dict[str, list[str]] = {}
        self._used: set[str] = set()
        self._pending: list[str] = []
        self._problems: list[str] = []  # found while mapping (parts that cannot be fused), reported by load_into
        self._broken: set[str] = set()  # targets those problems concern
        self._initialised: set[str] = set()  # targets that keep the model's initial value

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def get(self, key: str) -> torch.Tensor:
        """A source tensor, marked as used (and attributed to the next :meth:`set`); raises if there is none."""
        if key not in self.source:
            raise ValueError(f"{self.name}: the source state dict has no key {key!r}")
        self._used.add(key)
        self._pending.append(key)
        return self.source[key]

    def set(self, target: str, value: torch.Tensor, source: str | list[str] | None = None) -> None:
        """Target key ← value; ``source`` (default: the keys read with :meth:`get` since the last ``set``) is only
        for error messages."""
        origin = [source] if isinstance(source, str) else list(source) if source is not None else self._pending
        self.target[target] = value
        self.origin[target] = origin
        self._pending = []

    def copy(self, target: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Target key ← source key, optionally transformed (e.g. transposed). A source key that is not there is
        reported by :meth:`load_into` along with every other problem (:meth:`get` raises at once instead)."""
        if self._absent(target, [key]):
            return
        value = self.get(key)
        self.set(target, fn(value) if fn is not None else value)

    def _absent(self, target: str, keys: Iterable[str | None]) -> bool:
        absent = [k for k in keys if k is not None and k not in self.source]
        if absent:
            present = [k for k in keys if k is not None and k in self.source]
            self._used.update(present)
            self._problems.append(f"source keys missing: {absent} (needed for {target})")
            self._broken.add(target)
        return bool(absent)

    def copy_module(self, target: str, source: str, names: Iterable[str] = ("weight", "bias")) -> None:
        """Target ``{target}.{name}`` ← source ``{source}.{name}`` for each name (a LayerNorm, a Linear)."""
        for name in names:
            self.copy(f"{target}.{name}", f"{source}.{name}")

    def fuse(self, target: str, keys: Iterable[str | None]) -> None:
        """Target ← source tensors stacked row-wise, e.g. separate q, k, v projections into a fused ``qkv``; a None
        key is a zero block shaped like the others (a missing bias). Parts that cannot be stacked are reported by
        :meth:`load_into` with the other problems."""
        keys = list(keys)
        if self._absent(target, keys):
            return
        parts = [self.get(k) if k is not None else None for k in keys]
        try:
            self.set(target, stack_rows(parts, what=target))
        except ValueError:
            shapes = ", ".join(f"{k} {tuple(p.shape)}" for k, p in zip(keys, parts) if p is not None)
            self._problems.append(f"shape mismatch: cannot stack {shapes} into {target}")
            self._broken.add(target)
            self._pending = []

    def unused(self) -> list[str]:
        return sorted(
            k for k in self.source if k not in self._used and not any(fnmatch.fnmatchcase(k, p) for p in self.ignore)
        )

    def _describe(self, target: str) -> str:
        srcs = self.origin.get(target) or []
        return ", ".join(f"{s} {tuple(self.source[s].shape)}" for s in srcs if s in self.source) or "(computed)"

    def initialise(self, target: str) -> None:
        """Target key keeps the model's initial value: an mmformer-only parameter the source has no counterpart for
        (a converted tower's contrastive logit scale)."""
        self._initialised.add(target)

    def load_into(self, model: nn.Module) -> nn.Module:
        """Check the mapping against ``model`` (best built on the meta device: nothing is allocated before the check)
        and assign it (:func:`mmformer.io.weights.fill`); raise ``ValueError`` listing every mismatch instead of loading
        part of it."""
        expected, tied = weights.expected_specs(model)
        kind = type(model).__name__
        # Tied parameters (an LM head sharing the token embedding) appear under several keys: one value fills all.
        state = {tied.get(k, k): v for k, v in self.target.items()}
        problems = list(self._problems)
        unused = self.unused()
        if unused:
            problems.append(f"source keys with no place in the {kind}: {unused}")
        missing = sorted(k for k in expected if k not in state and k not in self._broken and k not in self._initialised)
        if missing:
            problems.append(f"{kind} keys the source does not provide: {missing}")
        unexpected = sorted(k for k in state if k not in expected)
        if unexpected:
            problems.append(f"mapped keys the {kind} does not have: {unexpected}")
        for key in sorted(set(state) & set(expected)):
            want, got = tuple(expected[key].shape), tuple(state[key].shape)
            if want != got:
                problems.append(
                    f"shape mismatch: {self._describe(key)} → {key}: expected {want}, got {got} after conversion"
                )
        if problems:
            raise ValueError(f"{self.name}: cannot load exactly into {kind}:\n  - " + "\n  - ".join(problems))
        device = next((t.device for t in state.values() if t.device.type != "meta"), None)
        state = {k: v.detach() for k, v in state.items()}
        weights.fill(model, *weights.in_memory(state), source=self.name, device=device, initialise=self._initialised)
        return model


def map_cross_attention(wm: WeightMap, target: str, source: str) -> None:
    """A ``torch.nn.MultiheadAttention`` at ``source`` (fused ``in_proj_weight``, or separate ``q/k/v_proj_weight``
    when keys come from another width) → mmformer's cross-attention layout ``{target}.q``, ``.kv`` (fused), ``.proj``,
    which :class:`~mmformer.layers.attention.Attention` (cross) and the attention-pooling heads share."""
    fused = f"{source}.in_proj_weight"
    if fused in wm:
        w = wm.get(fused)
        d = w.shape[0] // 3
        wm.set(f"{target}.q.weight", w[:d], fused)
        wm.set(f"{target}.kv.weight", w[d:], fused)  # rows k | v, as ours
    else:
        wm.copy(f"{target}.q.weight", f"{source}.q_proj_weight")
        wm.fuse(f"{target}.kv.weight", [f"{source}.k_proj_weight", f"{source}.v_proj_weight"])
    bias = f"{source}.in_proj_bias"
    if bias in wm:
        b = wm.get(bias)
        d = b.shape[0] // 3
        wm.set(f"{target}.q.bias", b[:d], bias)
        wm.set(f"{target}.kv.bias", b[d:], bias)
    wm.copy_module(f"{target}.proj", f"{source}.out_proj", ["weight", "bias"] if bias in wm else ["weight"])


def load_exact(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, name: str) -> nn.Module:
    """Load a state dict into a module of the same layout, key for key, with the same exact-match errors as
    :meth:`WeightMap.load_into`."""
    wm = WeightMap(state_dict, name=name)
    for key in module.state_dict():
        wm.copy(key, key)
    return wm.load_into(module)


# ---------------------------------------------------------------------------------------------------- settings
_ACTIVATIONS = {
    # names used by configs (Hugging Face hidden_act) and by activation module classes
    "gelu": "gelu",
    "quick_gelu": "quickgelu",
    "quickgelu": "quickgelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "GELUActivation": "gelu",
    "QuickGELU": "quickgelu",
    "QuickGELUActivation": "quickgelu",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "relu": "relu",
    "ReLU": "relu",
}


def activation_kind(act: str | nn.Module, *, what: str) -> str:
    """mmformer's MLP kind (``gelu`` | ``gelu_tanh`` | ``quickgelu`` | ``relu``) for an activation name or module.

    Args:
        act: a config name (``"gelu"``, ``"quick_gelu"``, ...) or an activation module (``nn.GELU``,
            open_clip/timm ``QuickGELU``, transformers' activation classes).
        what: where it comes from, for the error message.
    """
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.Module) and type(act).__name__ == "GELU" and hasattr(act, "approximate"):  # timm's GELU
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = act if isinstance(act, str) else type(act).__name__
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{what}: activation {name!r} is not supported; expected one of GELU (exact or tanh), QuickGELU or ReLU"
        )
    return _ACTIVATIONS[name]


def common_eps(norms: Iterable[nn.Module], *, what: str) -> float:
    """The one epsilon shared by LayerNorms (an mmformer stack has a single ``norm_eps``); raise if they differ or
    if one is not a plain affine LayerNorm."""
    eps = set()
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise UnsupportedModelError(f"{what}: norm layer {norm!r} is not supported; expected an affine LayerNorm")
        eps.add(float(norm.eps))
    if len(eps) != 1:
        raise UnsupportedModelError(f"{what}: expected one LayerNorm epsilon for the whole tower, got {sorted(eps)}")
    return eps.pop()


def build_processor(
    tokenizer: Tokenizer | None = None,
    *,
    image: Mapping[str, Any] | None = None,
    audio: Mapping[str, Any] | None = None,
) -> Processor:
    """A :class:`~mmformer.Processor` from a tokenizer and ``ImageProcessorConfig`` / ``AudioProcessorConfig``
    keyword arguments (None: that modality's defaults)."""
    from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor

    return Processor(
        tokenizer,
        image=ImageProcessorConfig(**image) if image is not None else None,
        audio=AudioProcessorConfig(**audio) if audio is not None else None,
    )
