"""Saving and loading models: mmformer's own directory format, Lightning training checkpoints, bare safetensors.

The directory format, as Hugging Face users know it::

    out/model/
        config.json                 ModelConfig as JSON, plus ``format_version`` and ``mmformer_version``
        model.safetensors           the state dict; tied tensors (the LM head) stored once, re-tied on load
        tokenizer.json              the processor's files, when the model carries a processor
        preprocessor_config.json

Every load is safe: safetensors, or ``torch.load(weights_only=True)`` (with mmformer's plain config dataclasses
allowed); a pickle that would need to run code or build other objects is refused, never executed.

Saving is atomic: the new directory is built beside the target and swapped in with renames, so an interrupted save
leaves either the previous model or the new one, never a mix. Files in the target that this save does not write (a
README, training logs, a tokenizer saved separately) are kept: they are hard-linked (copied where links are
impossible) into the new directory before the swap. A save killed at the wrong moment may leave a hidden
``.NAME.tmp-*`` (unfinished) or ``.NAME.old-*`` (the previous version) folder beside the target; nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from mmformer import __version__
from mmformer.atomic import default_file_mode, fsync_path
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.model import MultimodalTransformer

FORMAT_VERSION = 1  # bump when the directory layout or the state-dict naming changes incompatibly
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")  # written by Processor.save_pretrained
OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, *PROCESSOR_FILES)
_CONFIG_META_KEYS = ("format_version", "mmformer_version")
# Classes a training checkpoint's hyper_parameters may hold: plain dataclasses, rebuilt field by field.
_SAFE_GLOBALS = [ModelConfig, StackConfig, ImageConfig, AudioConfig, TextConfig]
_ACCEPTED = (
    "a directory written by save_pretrained (config.json + model.safetensors), a Lightning training checkpoint "
    "(.ckpt, read with torch.load(weights_only=True)), a torch state-dict file next to a config.json, or a "
    ".safetensors file next to a config.json"
)
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------------- saving
def save_pretrained(
    model: MultimodalTransformer,
    directory: str | os.PathLike,
    processor: Any = None,
    *,
    overwrite: bool = True,
) -> None:
    """Write ``model`` (and its processor) into ``directory`` atomically.

    Args:
        model: the model; its ``config`` becomes config.json.
        directory: created if missing. If it already holds a saved model, that model is replaced (Hugging Face's
            behaviour) unless ``overwrite`` is False. Other files in it are kept.
        processor: the :class:`~mmformer.Processor` to save beside the weights; defaults to ``model.processor``.
        overwrite: False refuses to replace a model already saved in ``directory`` (FileExistsError).

    Raises:
        ValueError: ``directory`` is an existing file, or the current working directory (or contains it), which
            cannot be swapped out from under the running process.
        FileExistsError: ``overwrite=False`` and ``directory`` already holds a saved model.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original module's weights
    if not isinstance(model, MultimodalTransformer):
        raise TypeError(f"model: expected mmformer.MultimodalTransformer, got {type(model).__name__}")
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise TypeError(
            f"processor: expected an mmformer.Processor (with save_pretrained), got {type(processor).__name__}"
        )
    target = Path(os.path.realpath(directory))  # a symlinked folder is replaced where it really lives
    exists = target.exists()
    if exists and not target.is_dir():
        raise ValueError(
            f"directory: expected a folder to save into (or a path to create), got an existing file {target}"
        )
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise ValueError(
            f"directory: {target} is (or contains) the current working directory; save_pretrained swaps the whole "
            "folder for a new one, so save into a subfolder instead"
        )
    if exists and not overwrite and any((target / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        raise FileExistsError(f"directory: {target} already holds a saved model and overwrite=False")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_model(model, staging, processor)
        if exists:
            _carry_over(target, staging)
        _match_permissions(staging, target if exists else None)
        fsync_path(staging)
        _swap_in(staging, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap


def _write_model(model: MultimodalTransformer, directory: Path, processor: Any) -> None:
    config = {"format_version": FORMAT_VERSION, "mmformer_version": __version__, **json.loads(model.config.to_json())}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = model.state_dict()
    aliases = _aliases(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    metadata = {"format": "pt", "format_version": str(FORMAT_VERSION), "mmformer_config": model.config.to_json()}
    safetensors.torch.save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    if processor is not None:
        processor.save_pretrained(directory)
    for path in directory.iterdir():
        os.chmod(path, default_file_mode())  # safetensors writes 0600; give what a plain open() would
        fsync_path(path)


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is exactly an earlier key's tensor (tied weights) → that earlier key."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        if t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) every entry of ``old`` that this save did not write into ``new``: the user's files, and
    processor files saved separately (``processor.save_pretrained(d); save_pretrained(model, d)``)."""
    for entry in old.iterdir():
        if not os.path.lexists(new / entry.name):
            _link_tree(entry, new / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for entry in src.iterdir():
            _link_tree(entry, dst / entry.name)
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:  # filesystems without hard links
            shutil.copy2(src, dst)


def _match_permissions(staging: Path, previous: Path | None) -> None:
    """mkdtemp creates a private (0700) folder; give it the old folder's mode, or what mkdir would have given."""
    if previous is not None:
        shutil.copymode(previous, staging)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    # Entries that appeared in the old folder while we were saving (another writer) are moved over, not lost.
    for entry in aside.iterdir():
        if not os.path.lexists(target / entry.name):
            os.rename(entry, target / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- loading
def load_pretrained(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device | Any = "cpu",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    config: ModelConfig | None = None,
) -> MultimodalTransformer:
    """Load a model from a save_pretrained directory, a Lightning ``.ckpt``, or a weights file beside a config.json.

    Args:
        path: the directory or file; the format is recognised from what it is and from the file's first bytes.
        map_location: where tensors are read to (``torch.load``'s argument; a device for safetensors).
        device: move the model there after loading.
        dtype: cast the floating-point parameters and buffers to this dtype after loading.
        strict: refuse missing and unexpected keys (False: load the rest and warn, listing them). Tensors with a
            different shape are refused either way.
        config: use this config instead of the one stored with the weights.

    Returns:
        The model in eval mode; ``model.processor`` holds the processor saved beside it, or None.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a needed config.json / model.safetensors is missing.
        ValueError: the file is not a checkpoint, is corrupt, is a pickle that is not weights-only, or its weights
            do not fit the config; the message names the file.
    """
    path = Path(path)
    processor = None
    if not path.exists():
        raise FileNotFoundError(f"path: no such file or directory: {path}; expected {_ACCEPTED}")
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected mmformer.ModelConfig or None, got {type(config).__name__}")
    if path.name == CONFIG_NAME and path.is_file():
        path = path.parent  # a save_pretrained folder named by its config.json
    folder = path if path.is_dir() else path.parent

    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in this folder; expected {_ACCEPTED}")
        state, _ = _read_safetensors(weights, map_location)
        config = config or _read_config(path / CONFIG_NAME, required=True)
    else:
        kind = _sniff(path)
        if kind == "safetensors":
            state, metadata = _read_safetensors(path, map_location)
            config = config or _read_config(folder / CONFIG_NAME) or _config_from_metadata(metadata, path)
        elif kind == "torch":
            checkpoint = _read_torch(path, map_location)
            state, found = _split_checkpoint(checkpoint, path)
            config = config or found or _read_config(folder / CONFIG_NAME)
            processor = _checkpoint_processor(checkpoint, path)
        else:
            raise ValueError(f"{path}: not a checkpoint (unrecognised file contents); expected {_ACCEPTED}")
        if config is None:
            raise ValueError(
                f"{path}: found no model config: the file records none (a Lightning checkpoint keeps it in "
                "hyper_parameters['model_config'], 'config' or 'model', as a ModelConfig or its dict) and there is "
                f"no {CONFIG_NAME} beside it; pass config=ModelConfig(...)"
            )

    model = MultimodalTransformer(config)
    _load_state(model, state, strict=strict, source=path)
    model.processor = processor if processor is not None else _read_processor(folder)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)  # nn.Module.to casts only floating-point tensors
    return model.eval()


def _sniff(path: Path) -> str | None:
    """'safetensors', 'torch' (zip or pickle, as torch.save writes) or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors":
        return "safetensors"  # a damaged one gets safetensors' own diagnosis rather than "unrecognised"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch"
    return None


def _read_safetensors(path: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # SafetensorError and friends: wrap with the file's name
        raise ValueError(
            f"{path}: not a valid safetensors file ({e}); its header may be corrupt or disagree with the data "
            "(tensor sizes/offsets), or the file may be truncated"
        ) from e
    return state, metadata


def _read_torch(path: Path, map_location: Any) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(str(e))
        if "Weights only load failed" in str(e):
            raise ValueError(
                f"{path}: refused: this pickle is not weights-only; loading it would need to run Python code or "
                f"build objects other than tensors and plain containers ({reason}). mmformer reads checkpoints only "
                "with torch.load(weights_only=True) and never unpickles arbitrary objects; if you trust the file, "
                "re-save its weights as safetensors (mmformer.save_pretrained)"
            ) from e
        raise ValueError(f"{path}: could not be read as a torch checkpoint ({reason}); expected {_ACCEPTED}") from e
    except Exception as e:
        raise ValueError(
            f"{path}: could not be read as a torch checkpoint ({type(e).__name__}: {e}); the file may be corrupt or "
            f"truncated; expected {_ACCEPTED}"
        ) from e


def _unpickling_reason(message: str) -> str:
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)]
    return "; ".join(lines) or message.strip()


def _split_checkpoint(checkpoint: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], ModelConfig | None]:
    """The state dict and (if recorded) the model config of a Lightning checkpoint or a plain state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{path}: expected a dict (a Lightning checkpoint with 'state_dict', or a state dict), got "
            f"{type(checkpoint).__name__}"
        )
    if isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    else:
        raise ValueError(
            f"{path}: expected a Lightning checkpoint (a dict with 'state_dict') or a state dict of tensors; got a "
            f"dict with keys {sorted(map(str, checkpoint))[:_MAX_LISTED]}"
        )
    found = _config_in(checkpoint.get("hyper_parameters"), f"{path}: hyper_parameters", mixed=True)
    if found is None:  # also accepted at the top level, next to state_dict (Whisper keeps its "dims" there)
        top = {k: checkpoint[k] for k in ("model_config", "config") if k in checkpoint}
        found = _config_in(top, f"{path}: checkpoint")
    return state, found


def _config_in(value: Any, where: str, *, mixed: bool = False, depth: int = 0) -> ModelConfig | None:
    """Find a ModelConfig in hyper_parameters: under model_config / config / model (searched a few levels deep), as
    an object, a dict, or jsonargparse's {class_path, init_args}. ``mixed``: ``value`` may itself be the config's
    fields mixed with other hyper-parameters (``save_hyperparameters(**cfg.to_dict(), lr=...)``)."""
    if isinstance(value, ModelConfig):
        return _validated(value.to_dict(), where)
    if not isinstance(value, Mapping) or depth > 4:
        return None
    if "init_args" in value and isinstance(value["init_args"], Mapping):
        return _config_in(value["init_args"], f"{where}.init_args", depth=depth + 1)
    if "stacks" in value and (depth > 0 or mixed):
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        return _validated({k: v for k, v in value.items() if k in fields or not mixed}, where)
    for key in ("model_config", "config", "model"):
        if key in value:
            found = _config_in(value[key], f"{where}[{key!r}]", depth=depth + 1)
            if found is not None:
                return found
    return None


def _validated(d: dict, where: str) -> ModelConfig:
    d = {k: v for k, v in d.items() if k not in _CONFIG_META_KEYS}
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a valid mmformer ModelConfig: {e}") from e


def _read_config(path: Path, required: bool = False) -> ModelConfig | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path.parent}: no {CONFIG_NAME} in this folder; expected {_ACCEPTED}")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object (a ModelConfig), got {type(d).__name__}")
    version = d.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} was written by a newer mmformer; this one "
            f"({__version__}) reads format_version <= {FORMAT_VERSION}"
        )
    return _validated(d, str(path))


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> ModelConfig | None:
    text = metadata.get("mmformer_config")
    if text is None:
        return None
    try:
        return _validated(json.loads(text), f"{path}: metadata['mmformer_config']")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata['mmformer_config'] is not valid JSON ({e})") from e


def _checkpoint_processor(checkpoint: Any, path: Path) -> Any:
    """The processor a training checkpoint carries (``checkpoint["mmformer"]``, written by the training task)."""
    saved = checkpoint.get("mmformer") if isinstance(checkpoint, Mapping) else None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("preprocessor_config"), Mapping):
        return None
    from mmformer.processor import Processor
    from mmformer.tokenizer import Tokenizer

    tokenizer = saved.get("tokenizer_json")
    tokenizer = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else None
    return Processor.from_dict(dict(saved["preprocessor_config"]), tokenizer, where=f"{path}: mmformer")


def _read_processor(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        return None
    from mmformer.processor import Processor  # imported lazily: torchvision and PIL are only needed here

    return Processor.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- state dicts
def _strip_prefix(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove the LightningModule attribute prefix (``model.``, ``model._orig_mod.``, ...) that best matches the
    model's keys; keys outside it (a loss module's buffers, an EMA copy) are not the model's and are dropped."""
    counts = Counter({"": sum(k in expected for k in state)})
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in expected:
                counts[".".join(parts[:i]) + "."] += 1
    prefix = min(counts, key=lambda p: (-counts[p], len(p), p))
    if not prefix:
        return dict(state)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _listed(items: list) -> str:
    shown = ", ".join(map(str, items[:_MAX_LISTED]))
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _load_state(model: MultimodalTransformer, state: Mapping[str, torch.Tensor], *, strict: bool, source: Path) -> None:
    """Copy ``state`` into ``model``, checking keys and shapes and keeping tied tensors tied."""
    own = model.state_dict()
    aliases = _aliases(own)
    expected = {k: v for k, v in own.items() if k not in aliases}
    state = _strip_prefix(state, set(own))
    problems = []
    for alias, canonical in aliases.items():
        if alias not in state:
            continue
        value = state.pop(alias)
        if canonical not in state:
            state[canonical] = value
        elif value.shape != state[canonical].shape or not torch.equal(value, state[canonical].to(value.device)):
            problems.append(
                f"{alias} differs from {canonical}, but this config ties them (tie_lm_head=True; strict=False keeps "
                f"{canonical})"
            )
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
        for k, v in sorted(state.items())
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{source}: {len(mismatched)} tensor(s) have a different shape than the model config gives (the weights "
            f"belong to another config): {_listed(mismatched)}"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys (left at their initial values): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (ignored): {_listed(unexpected)}")
    if problems:
        message = f"{source}: the weights do not match the model config: " + "; ".join(problems)
        if strict:
            raise ValueError(message + ". Pass strict=False to load the matching tensors anyway")
        warnings.warn(message, stacklevel=3)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
