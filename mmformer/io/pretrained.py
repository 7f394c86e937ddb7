"""Model files: mmformer's own directory format, Lightning training checkpoints, bare weights files.

This module does file I/O only. It writes a config, a state dict and a processor, and reads them back as a
:class:`Checkpoint` — the config, the tensors' header (names, shapes, dtypes) and a reader for the tensors — without
knowing the model class: :meth:`mmformer.MultimodalTransformer.from_pretrained` builds the model from it (see
:mod:`mmformer.io.weights` for how the tensors are checked and assigned).

The directory format, as Hugging Face users know it::

    out/model/
        config.json                 ModelConfig as JSON, plus ``format_version`` and ``mmformer_version``
        model.safetensors           the state dict; tied tensors (the LM head) stored once, re-tied on load
        tokenizer.json              the processor's files, when the model carries a processor
        preprocessor_config.json

A Lightning checkpoint written by ``mmformer fit`` keeps the model under the ``model.`` prefix of ``state_dict`` and
its config (with the processor) under ``checkpoint["mmformer"]``, as :class:`~mmformer.tasks.MultimodalTask` writes
it. Formats are told apart by what a path is (a folder, ``.safetensors``, or a torch file: ``.ckpt`` ``.pt``
``.pth`` ``.bin``), never by guessing from the contents.

Every load is safe: safetensors, or ``torch.load(weights_only=True)`` (memory-mapped where the file allows); a
pickle that would need to run code or build other objects is refused, never executed.

Saving is atomic: the new directory is built beside the target and swapped in with renames, so an interrupted save
leaves either the previous model or the new one, never a mix. Files in the target that this save does not write (a
README, training logs, a processor saved there before the first model) are kept: they are hard-linked (copied where
links are impossible) into the new directory before the swap; the previous model's own files (its weights, its
processor) are not. A save killed at the wrong moment (SIGTERM, SIGKILL: no clean-up runs) may leave a hidden
``.NAME.PID.tmp-*`` (unfinished) or ``.NAME.PID.old-*`` (the previous version) folder beside the target; nothing else;
the next save of that target deletes them once their process has gone (an ``old`` folder only where the target
exists: otherwise it is the previous version's only copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from mmformer import __version__
from mmformer.config import ModelConfig
from mmformer.io.atomic import (
    WriteError,
    fsync_path,
    remove_stale_staging,
    save_safetensors,
    staging_prefix,
    umask_mode,
    write_json,
)
from mmformer.io.quantized_files import flatten_state
from mmformer.io.training_checkpoints import (
    CHECKPOINT_KEY,
    TORCH_SUFFIXES,
    checkpoint_processor,
    is_distributed,
    read_torch,
    read_training_checkpoint,
    refuse_adaptation_run,
    split_checkpoint,
)
from mmformer.io.weights import Reader, TensorSpec, aliases, in_memory
from mmformer.preprocess.processor import Processor

# What a config.json holds, numbered so that an older mmformer refuses a newer folder as newer (its reader refuses
# keys it does not know): 2: derived constants (mel filters, STFT window) are no longer stored; 3: the config's
# fields as tests/test_pretrained.py records them (TextConfig.extra_eos_ids was added under 2: readers of 2 failed
# on it as an unknown key). A new config field raises it.
FORMAT_VERSION = 3
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")  # written by Processor.save_pretrained
OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, *PROCESSOR_FILES)
# The files that make a folder with a config.json the artifact it is — float or torchao weights, PT2E int8 scales
# (compress.pt2e.QPARAMS_FILE), an export's config, graphs and mel filter bank (ship.export): a save that writes a
# config replaces these, never carrying the old folder's over beside its own (a float export written over a PT2E
# folder kept the stale scales and loaded as int8). The user's files and separately saved processor files carry over.
EXPORT_CONFIG = "export_config.json"  # an export folder's index (ship.export; the torch-free runner names it too)
MEL_FILTERS = "mel_filters.npy"  # an export's mel filter bank, for the runner's log-mel (ship.export)
ARTIFACT_FILES = frozenset({WEIGHTS_NAME, "pt2e_qparams.safetensors", EXPORT_CONFIG, MEL_FILTERS})
ARTIFACT_SUFFIXES = (".onnx", ".onnx.data", ".pt2")
ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder (mmformer.adapt.adapter_files writes it)
QUANTIZATION_KEY = "quantization_config"  # config.json / safetensors metadata: torchao-quantized weights
_CONFIG_META_KEYS = ("format_version", "mmformer_version", QUANTIZATION_KEY)
# Format 1 stored torchaudio's mel filter bank and STFT window; they are computed from the config now.
_DERIVED_V1 = ("audio_embed.features.mel.spectrogram.window", "audio_embed.features.mel.mel_scale.fb")
_ACCEPTED = (
    "a directory written by save_pretrained (config.json + model.safetensors), a Lightning training checkpoint "
    f"(.ckpt, read with torch.load(weights_only=True)), a torch state-dict file ({', '.join(TORCH_SUFFIXES)}) next "
    "to a config.json, or a .safetensors file next to a config.json"
)


# ---------------------------------------------------------------------------------------------------- saving
def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    processor: Any = None,
    *,
    overwrite: bool = True,
) -> None:
    """Write ``model`` (and its processor) into ``directory`` atomically.

    Args:
        model: an mmformer model (a module with a :class:`~mmformer.ModelConfig` as ``config``); its config becomes
            config.json, its state dict model.safetensors.
        directory: created if missing. If it already holds a saved model, that model is replaced (Hugging Face's
            behaviour) unless ``overwrite`` is False. Other files in it are kept.
        processor: the :class:`~mmformer.Processor` to save beside the weights; defaults to ``model.processor``.
        overwrite: False refuses to replace a model already saved in ``directory`` (FileExistsError).

    Raises:
        ValueError: ``directory`` is an existing file, or the current working directory (or contains it), which
            cannot be swapped out from under the running process; ``model`` carries an adapter or bitsandbytes
            4-bit layers (merge first).
        FileExistsError: ``overwrite=False`` and ``directory`` already holds a saved model.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original module's weights
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "config", None), ModelConfig):
        raise TypeError(
            f"model: expected mmformer.MultimodalTransformer (a module with a ModelConfig), got {type(model).__name__}"
        )
    if has_adapter(model):
        raise ValueError(
            "model: carries adapter layers (LoRA); save the adapter with mmformer.adapt.adapter_files.save_adapter, "
            "or fold it in first with mmformer.adapt.adapters.merge_and_unload (mmformer merge)"
        )
    four_bit = [name for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if four_bit:  # bitsandbytes' packed codes and block scales are no weights a model folder can hold
        raise ValueError(
            f"model: holds {len(four_bit)} bitsandbytes 4-bit layers (QLoRA's base, e.g. {four_bit[0]}); merge the "
            "adapter into float weights first with mmformer.adapt.adapters.merge_and_unload, or turn the base back "
            "into float layers with mmformer.adapt.four_bit.dequantize_4bit"
        )
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise TypeError(
            f"processor: expected an mmformer.Processor (with save_pretrained), got {type(processor).__name__}"
        )
    with atomic_directory(directory, overwrite=overwrite) as staging:
        quantization = getattr(model, "quantization", None)
        # keep_vars: tied tensor subclasses (a quantized table and its LM head) are then one object, stored once
        state = model.state_dict(keep_vars=quantization is not None)
        write_model(staging, model.config, state, processor, quantization=quantization)


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapter layers (:mod:`mmformer.adapt.adapters`): no model folder holds them,
    and quantizing would quantize them with the base."""
    return bool(getattr(model, "peft_config", None))


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike, *, overwrite: bool = True, marker_files: Iterable[str] = (CONFIG_NAME, WEIGHTS_NAME)
) -> Iterator[Path]:
    """``with atomic_directory(target) as staging:`` — build a folder's new contents in ``staging``; on success the
    files of ``target`` this save did not write are carried over (not those of the artifact it replaces:
    :func:`_old_artifact`) and ``staging`` replaces ``target`` atomically; on failure ``target`` is left as it was
    and ``staging`` is removed. Every saved folder (models, adapters, prompts, exports) goes through here.

    Args:
        directory: the folder to create or replace.
        overwrite: False refuses to replace a folder that already holds one of ``marker_files`` (FileExistsError).
        marker_files: the files whose presence means "something is saved there".
    """
    target = Path(os.path.realpath(directory))  # a symlinked folder is replaced where it really lives
    exists = target.exists()
    if exists and not target.is_dir():
        raise ValueError(
            f"directory: expected a folder to save into (or a path to create), got an existing file {target}"
        )
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise ValueError(
            f"directory: {target} is (or contains) the current working directory; saving swaps the whole folder for a "
            "new one, so save into a subfolder instead"
        )
    if exists and not overwrite and any((target / name).exists() for name in marker_files):
        raise FileExistsError(f"directory: {target} already holds a saved model and overwrite=False")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target, "tmp"), dir=target.parent))
    try:
        yield staging
        for path in staging.iterdir():
            if path.is_file():
                os.chmod(path, umask_mode(0o666))  # safetensors writes 0600; give what a plain open() would
                fsync_path(path)
        if exists:
            _carry_over(target, staging)
        _match_permissions(staging, target if exists else None)
        fsync_path(staging)
        swap_in(staging, target)
        fsync_path(target.parent)
    except WriteError as e:
        e.filename = str(_in_target(Path(e.filename), staging, target))  # the user's name, not the staging folder's
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap


def _in_target(path: Path, staging: Path, target: Path) -> Path:
    """``path`` in ``staging`` named as it will be in ``target``; any other path as it is."""
    return target / path.relative_to(staging) if path.is_relative_to(staging) else path


def write_model(
    directory: Path,
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    processor: Any = None,
    metadata: Mapping[str, str] | None = None,
    quantization: Any = None,
) -> None:
    """config.json, model.safetensors (tied tensors once) and the processor's files into an existing folder.

    ``quantization`` (a :class:`mmformer.io.quantized_files.QuantizationConfig`) marks torchao-quantized weights: they
    are
    stored as their parts plus the metadata that rebuilds them (see :mod:`mmformer.compress.quantization`), and
    config.json
    records it as ``quantization_config``."""
    extra = {} if quantization is None else {QUANTIZATION_KEY: quantization.to_dict()}
    write_config(directory, config, extra)
    tied = aliases(state)
    state = {k: v for k, v in state.items() if k not in tied}
    info = {"format": "pt", "format_version": str(FORMAT_VERSION), "mmformer_config": config.to_json()}
    if quantization is not None:
        state, quantized = flatten_state(state, getattr(torch, quantization.float_storage))
        info = {**info, **quantized, QUANTIZATION_KEY: json.dumps(quantization.to_dict())}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={**info, **(metadata or {})})
    if processor is not None:
        processor.save_pretrained(directory)


def write_config(directory: Path, config: ModelConfig, extra: Mapping[str, Any] | None = None) -> None:
    """config.json: the ModelConfig with ``format_version`` and ``mmformer_version``, plus ``extra`` top-level keys
    (such as ``quantization_config``)."""
    record = {"format_version": FORMAT_VERSION, "mmformer_version": __version__, **config.to_dict(), **(extra or {})}
    write_json(directory / CONFIG_NAME, record)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) every entry of ``old`` that this save did not write into ``new``: the user's files, and
    processor files saved separately into a folder without a model (``processor.save_pretrained(d);
    save_pretrained(model, d)``) — but not, when this save writes a config, the old artifact's files
    (:func:`_old_artifact`)."""
    for entry in old.iterdir():
        if _carried(entry, new):
            _link_tree(entry, new / entry.name)


def _carried(entry: Path, new: Path) -> bool:
    """Whether an entry of the folder being replaced goes on into its replacement ``new``."""
    if os.path.lexists(new / entry.name):
        return False
    return not (entry.is_file() and (new / CONFIG_NAME).is_file() and _old_artifact(entry))


def _old_artifact(entry: Path) -> bool:
    """A file of the artifact saved in the folder being replaced: :data:`ARTIFACT_FILES`, and the processor files of
    a saved model (a config.json or model.safetensors beside them) — they belong to that model: a new model saved
    without a processor kept the old one's tokenizer, whose ids meant other tokens to the new weights."""
    if entry.name in ARTIFACT_FILES or entry.name.endswith(ARTIFACT_SUFFIXES):
        return True
    held_a_model = any((entry.parent / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))
    return entry.name in PROCESSOR_FILES and held_a_model


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
        os.chmod(staging, umask_mode(0o777))


def swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.parent / f"{staging_prefix(target, 'old')}{uuid.uuid4().hex[:12]}"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    # Entries that appeared in the old folder while we were saving (another writer) are moved over, not lost.
    for entry in aside.iterdir():
        if _carried(entry, target):
            os.rename(entry, target / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- reading
def load_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating-point dtype a model is loaded in: a ``torch.dtype``, or its name as configs and command lines
    spell it (``"bfloat16"``, ``"torch.float16"``, as Hugging Face's ``torch_dtype``); None: as stored. A TypeError
    naming ``dtype`` otherwise (``Module.to`` would raise its own, naming none of it)."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else dtype
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise TypeError(
        "dtype: expected a floating-point torch.dtype or its name ('float32', 'bfloat16', 'float16', "
        f"'torch.bfloat16', ...), got {dtype!r}"
    )


@dataclass
class Checkpoint:
    """What a model file holds: its config and tensor header now, the tensors on demand.

    Attributes:
        source: the file or folder read.
        config: the model config stored with the weights (or the one the caller passed).
        specs: name → shape and dtype of every stored tensor, from the header (no tensor data read yet).
        read: names → tensors, read from the file (memory-mapped where the format allows).
        processor: the processor saved with the weights (fitted to ``config``: see
            :meth:`~mmformer.Processor.from_dict`), or None.
        metadata: the safetensors header's string metadata (empty for torch files).
        quantization: the ``quantization_config`` of torchao-quantized weights (see
        :mod:`mmformer.compress.quantization`,
            whose ``open_quantized`` turns the checkpoint into one of the weights' logical tensors), or None.
    """

    source: Path
    config: ModelConfig
    specs: dict[str, TensorSpec]
    read: Reader
    processor: Processor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    quantization: Any = None


def read_checkpoint(
    path: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    map_location: Any = "cpu",
    config_class: type[ModelConfig] = ModelConfig,
) -> Checkpoint:
    """Open a save_pretrained directory, a Lightning ``.ckpt``, or a weights file beside a config.json.

    Args:
        path: the directory or file (a folder's ``config.json`` names its folder).
        config: use this config instead of the one stored with the weights (an instance of ``config_class``).
        map_location: where tensors are read to (``torch.load``'s argument; a device for safetensors).
        config_class: the class the stored config is read as: a model subclass's own
            (:attr:`mmformer.MultimodalTransformer.config_class`, a ModelConfig subclass with the fields it added).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a needed config.json / model.safetensors is missing.
        ValueError: the file is not a checkpoint, is corrupt, is a pickle that is not weights-only, or records no
            config; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no such file or directory: {path}; expected {_ACCEPTED}")
    if not (isinstance(config_class, type) and issubclass(config_class, ModelConfig)):
        raise TypeError(f"config_class: expected mmformer.ModelConfig or a subclass of it, got {config_class!r}")
    if config is not None and not isinstance(config, config_class):
        raise TypeError(f"config: expected {config_class_name(config_class)} or None, got {type(config).__name__}")
    if path.name == CONFIG_NAME and path.is_file():
        path = path.parent  # a save_pretrained folder named by its config.json
    folder = path if path.is_dir() else path.parent
    processor = None
    if is_distributed(path):  # FSDP's sharded training checkpoint
        checkpoint = read_training_checkpoint(path)
        refuse_adaptation_run(checkpoint, path)
        state, recorded = _split(checkpoint, path, config_class)
        specs, read = in_memory(state)
        metadata = {}
        config = config or recorded
        processor = checkpoint_processor(checkpoint, path, config)
        source = path
    elif path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            if (path / EXPORT_CONFIG).is_file():
                raise FileNotFoundError(f"{path}: an `mmformer export` folder (ONNX / torch.export graphs), which "
                                        "holds no weights to load here; run its ONNX graphs with "
                                        "mmformer.ship.onnx_runner.OnnxModel, or pass the model it was exported "
                                        "from")  # fmt: skip
            if (path / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(_adapter_folder_hint(path))
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in this folder; expected {_ACCEPTED}")
        specs, read, metadata = open_safetensors(weights, map_location)
        config = config or read_config(path / CONFIG_NAME, required=True, config_class=config_class)
        source = weights
    elif path.suffix == ".safetensors":
        specs, read, metadata = open_safetensors(path, map_location)
        config = config or read_config(folder / CONFIG_NAME, config_class=config_class)
        config = config or _config_from_metadata(metadata, path, config_class)
        source = path
    elif path.suffix in TORCH_SUFFIXES:
        checkpoint = read_torch(path, map_location, expected=_ACCEPTED)
        refuse_adaptation_run(checkpoint, path)
        state, recorded = _split(checkpoint, path, config_class)
        specs, read = in_memory(state)
        metadata = {}
        config = config or recorded or read_config(folder / CONFIG_NAME, config_class=config_class)
        processor = checkpoint_processor(checkpoint, path, config)
        source = path
    else:
        raise ValueError(
            f"{path}: not a checkpoint (unrecognised file type {path.suffix or '(no suffix)'!r}); expected {_ACCEPTED}"
        )
    if config is None:
        raise ValueError(
            f"{path}: found no model config: the file records none (mmformer's training checkpoints keep it in "
            f"checkpoint[{CHECKPOINT_KEY!r}]['model_config']) and there is no {CONFIG_NAME} beside it; pass "
            "config=ModelConfig(...)"
        )
    specs = {k: v for k, v in specs.items() if k not in _DERIVED_V1}
    if processor is None:
        processor = read_processor(folder, config)
    return Checkpoint(source, config, specs, read, processor, metadata, _quantization(metadata, source))


def _metadata_json(metadata: Mapping[str, str], key: str, source: Path) -> Any:
    """The JSON value a safetensors header's metadata holds under ``key`` (None without one)."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata[{key!r}] is not valid JSON ({e})") from e


def _quantization(metadata: Mapping[str, str], source: Path) -> dict | None:
    """The quantization config a safetensors file records (mmformer writes it beside config.json's copy)."""
    value = _metadata_json(metadata, QUANTIZATION_KEY, source)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{source}: metadata[{QUANTIZATION_KEY!r}] is not a JSON object")
    return value


def open_safetensors(path: Path, map_location: Any) -> tuple[dict[str, TensorSpec], Reader, dict[str, str]]:
    """Header (validated by safetensors against the file's size), a reader and the metadata of a safetensors file
    (model weights, adapters, prompts: every safetensors file mmformer reads)."""
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"

    def fail(e: Exception) -> ValueError:
        return ValueError(
            f"{path}: not a valid safetensors file ({e}); its header may be corrupt or disagree with the data "
            "(tensor sizes/offsets), or the file may be truncated"
        )

    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            specs = {}
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part = f.get_slice(key)
                specs[key] = TensorSpec(tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()])
    except Exception as e:  # SafetensorError and friends: wrap with the file's name
        raise fail(e) from e

    def read(keys: Iterable[str]) -> dict[str, torch.Tensor]:
        try:
            with safetensors.safe_open(str(path), framework="pt", device=device) as f:
                return {key: f.get_tensor(key) for key in keys}
        except Exception as e:
            raise fail(e) from e

    return specs, read, metadata


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _adapter_folder_hint(folder: Path) -> str:
    """What to do with a LoRA adapter folder named where a model is expected: load it on the base its
    ``adapter_config.json`` names (``base_model_name_or_path``, when readable)."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        base = None
    base = base or "BASE"
    return (
        f"{folder}: a LoRA adapter folder ({ADAPTER_CONFIG}), not a model; load it on its base model: --model {base} "
        f"--adapter {folder} (from_pretrained({base!r}, adapter={str(folder)!r})); for commands that take a model "
        f"only (export, quantize), merge it into one first: mmformer merge --base {base} --adapter {folder} --out "
        "MERGED"
    )


def _split(
    checkpoint: Any, path: Path, config_class: type[ModelConfig]
) -> tuple[Mapping[str, torch.Tensor], ModelConfig | None]:
    """A training checkpoint's model state dict and its recorded config, validated (:func:`split_checkpoint`)."""
    state, recorded = split_checkpoint(checkpoint, path)
    if recorded is None:
        return state, None
    return state, validated_config(recorded, f"{path}: checkpoint[{CHECKPOINT_KEY!r}]['model_config']", config_class)


def config_class_name(config_class: type[ModelConfig]) -> str:
    """How errors name a config class: mmformer's own, or a subclass a user wrote."""
    return "mmformer ModelConfig" if config_class is ModelConfig else config_class.__qualname__


def validated_config(d: dict, where: str, config_class: type[ModelConfig] = ModelConfig) -> ModelConfig:
    """A ``config_class`` (ModelConfig, or a model subclass's own config class) from its dict (format metadata
    dropped), or a ValueError naming ``where``. Keys that are no field of ``config_class`` are refused as what they
    usually are, the fields a subclass's config added, naming the way to load them."""
    d = {k: v for k, v in d.items() if k not in _CONFIG_META_KEYS}
    unknown = config_class.unknown_keys(d)
    if unknown:
        raise ValueError(
            f"{where}: has keys that are no field of {config_class_name(config_class)}: {unknown}; a model subclass "
            f"with a config class of its own (a {config_class.__name__} subclass with these fields) saves them: load "
            "its folder with that subclass, MyModel.from_pretrained(path), which reads the config as "
            "MyModel.config_class (see docs/extending.md); if they are typos, correct them"
        )
    try:
        return config_class.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a valid {config_class_name(config_class)}: {e}") from e


def read_config(
    path: Path, required: bool = False, config_class: type[ModelConfig] = ModelConfig
) -> ModelConfig | None:
    """The ``config_class`` of a config.json (None if absent and not ``required``)."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path.parent}: no {CONFIG_NAME} in this folder; expected {_ACCEPTED}")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return config_from_dict(d, str(path), config_class)


def config_from_dict(d: Any, where: str, config_class: type[ModelConfig] = ModelConfig) -> ModelConfig:
    """The ``config_class`` of a config.json's content (read by :func:`read_config`, or once by
    :func:`mmformer.io.hub.resolve_source`): a JSON object of a ``format_version`` this mmformer reads."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object (a ModelConfig), got {type(d).__name__}")
    version = d.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version!r} was written by a newer mmformer; this one "
            f"({__version__}) reads format_version <= {FORMAT_VERSION}"
        )
    return validated_config(d, where, config_class)


def _config_from_metadata(
    metadata: Mapping[str, str], path: Path, config_class: type[ModelConfig]
) -> ModelConfig | None:
    value = _metadata_json(metadata, "mmformer_config", path)
    return None if value is None else validated_config(value, f"{path}: metadata['mmformer_config']", config_class)


def read_processor(folder: Path, config: ModelConfig | None = None) -> Processor | None:
    """The processor saved in ``folder`` (tokenizer.json, preprocessor_config.json), or None; ``config``: the model's,
    which fills the settings a missing preprocessor_config.json leaves out and bounds the tokenizer's length (see
    :meth:`Processor.from_dict`)."""
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        return None
    return Processor.from_pretrained(folder, model=config)
