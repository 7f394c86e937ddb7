"""Training checkpoints and torch weight files, read safely: what ``mmformer fit`` writes (a Lightning ``.ckpt``, or
under FSDP a distributed checkpoint folder) and the bare state dicts users bring (``.pt``, ``.pth``, ``.bin``).

Every read is ``torch.load(weights_only=True)`` (memory-mapped where the file allows): a pickle that would need to run
code or build other objects than tensors and plain containers is refused, naming the file, never executed.
:func:`mmformer.io.pretrained.read_checkpoint` turns what is read here into a model's checkpoint
(:func:`split_checkpoint`); ``mmformer export --ckpt`` reads an adaptation run's record
(:func:`adaptation_record`).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmformer.config import ModelConfig
from mmformer.io.weights import listed
from mmformer.preprocess.processor import Processor
from mmformer.preprocess.tokenizer import Tokenizer

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_KEY = "mmformer"  # where MultimodalTask.on_save_checkpoint records the config and the processor
CHECKPOINT_PREFIX = "model."  # the LightningModule attribute holding the model
# The entries of checkpoint[CHECKPOINT_KEY] that make a run an adaptation run (mmformer.tasks.adapt.checkpoint_record):
# its state dict is the base with LoRA layers, or the unchanged base beside a prompt, not the model a user wants
ADAPTER_KEYS = ("lora", "prompt")
DISTRIBUTED_METADATA = ".metadata"  # torch.distributed.checkpoint's index file in a sharded checkpoint folder
TORCH_FILES = (
    f"a Lightning training checkpoint (.ckpt) or a torch state-dict file ({', '.join(TORCH_SUFFIXES[1:])}), read with "
    "torch.load(weights_only=True)"
)


def read_torch(path: Path, map_location: Any = "cpu", expected: str = TORCH_FILES) -> Any:
    """``torch.load(weights_only=True)`` — memory-mapped for zip files — with errors that name the file and say why a
    pickle was refused."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (a folder)" if Path(path).is_dir() else ""))
    try:
        mmap = zipfile.is_zipfile(path)  # torch.save's default format can be memory-mapped; legacy pickles cannot
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(str(e))
        if "Weights only load failed" in str(e) and "Unsupported operand" not in reason:  # else: not a pickle at all
            raise ValueError(
                f"{path}: refused: this pickle is not weights-only; loading it would need to run Python code or "
                f"build objects other than tensors and plain containers ({reason}). mmformer reads checkpoints only "
                "with torch.load(weights_only=True) and never unpickles arbitrary objects; if you trust the file, "
                "re-save its weights as safetensors (mmformer.save_pretrained)"
            ) from e
        raise ValueError(
            f"{path}: not a checkpoint: torch.load could not read it ({reason}); expected {expected}"
        ) from e
    except Exception as e:
        raise ValueError(
            f"{path}: not a checkpoint: torch.load could not read it ({type(e).__name__}: {e}); the file may be "
            f"corrupt or truncated; expected {expected}"
        ) from e


def _unpickling_reason(message: str) -> str:
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)]
    return "; ".join(lines) or message.strip()


def is_distributed(path: Path) -> bool:
    """A distributed (sharded) checkpoint folder, as FSDP training writes ``last.ckpt``."""
    return path.is_dir() and (path / DISTRIBUTED_METADATA).is_file()


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning training checkpoint as one dict: a ``.ckpt`` file, or a distributed checkpoint folder consolidated
    in this process (:func:`read_distributed`)."""
    path = Path(path)
    return read_distributed(path) if is_distributed(path) else read_torch(path)


def read_distributed(folder: Path) -> dict[str, Any]:
    """A distributed checkpoint folder (each rank's shards, as Lightning's ModelParallelStrategy writes them under
    FSDP) consolidated into one checkpoint dict in this process: the full ``state_dict`` and Lightning's metadata
    (``meta.pt``). Both are read with ``weights_only=True``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "consolidated.pt"
        try:
            dcp_to_torch_save(folder, target)
        except Exception as e:  # a missing or corrupt shard file: name the folder, not a reader internal
            raise ValueError(f"{folder}: not a readable distributed checkpoint ({type(e).__name__}: {e})") from e
        state = read_torch(target)
    meta = folder / "meta.pt"
    return {**(read_torch(meta) if meta.is_file() else {}), **state}


def adaptation_record(checkpoint: Any) -> dict[str, Any] | None:
    """The record of an adaptation run (``checkpoint["mmformer"]`` with a ``lora`` or ``prompt`` entry, beside the
    base it started from as ``init_from``) in a training checkpoint, or None for any other checkpoint: ``mmformer
    export --ckpt`` turns such a run into adapter or prompt files, and nothing loads it as a model."""
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
    if isinstance(saved, Mapping) and any(saved.get(key) for key in ADAPTER_KEYS):
        return dict(saved)
    return None


def refuse_adaptation_run(checkpoint: Any, path: Path) -> None:
    """A LoRA or prompt run's checkpoint named where a model is expected (loaded, or exported as graphs) is refused,
    naming the export and the use that serve what it learned: its weights are the base's with peft's adapter layers
    (which no model config declares; a QLoRA base is packed in 4 bits), or the unchanged base, whose prompt a model
    loaded from it would drop, silently."""
    record = adaptation_record(checkpoint)
    if record is None:
        return
    base = record.get("init_from") or "BASE"
    if record.get("lora"):
        raise ValueError(
            f"{path}: the checkpoint of a LoRA run on {base}: its weights are the base's with adapter layers, not a "
            f"model; write the adapter with `mmformer export --ckpt {path} --out ADAPTER` and load it on its base "
            f"(--model {base} --adapter ADAPTER; from_pretrained({base!r}, adapter='ADAPTER')), or the merged model "
            f"with `mmformer export --ckpt {path} --merge --out DIR` (also with --format onnx or torch-export)"
        )
    kind = (record.get("prompt") or {}).get("kind")
    use = "zeroshot --classes ..." if kind == "context" else "caption, transcribe or complete"
    raise ValueError(
        f"{path}: the checkpoint of a {kind} prompt run on {base}: its model is the unchanged base, and a model "
        f"loaded or exported from it would drop the prompt it learned; write the prompt with `mmformer export --ckpt "
        f"{path} --out PROMPT.safetensors` and use it with the base: `mmformer {use} --model {base} --prompt "
        "PROMPT.safetensors`"
    )


def split_checkpoint(checkpoint: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], dict | None]:
    """The model's state dict and recorded config (the fields of a ModelConfig, as stored: ``read_checkpoint``
    validates them) of a training checkpoint, or a plain state dict and no config."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{path}: expected a dict (a Lightning checkpoint with 'state_dict', or a state dict), got "
            f"{type(checkpoint).__name__}"
        )
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None  # a plain state dict, as torch.save(model.state_dict()) writes it
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(
            f"{path}: expected a Lightning checkpoint (a dict with 'state_dict') or a state dict of tensors; got a "
            f"dict with keys {listed(sorted(map(str, checkpoint)))}"
        )
    state = {
        k.removeprefix(CHECKPOINT_PREFIX): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(CHECKPOINT_PREFIX)  # others belong to the task (loss buffers), not to the model
    }
    if not state:
        raise ValueError(
            f"{path}: its state_dict holds no {CHECKPOINT_PREFIX!r} keys; mmformer's training checkpoints keep the "
            f"model there (keys such as {listed(sorted(checkpoint['state_dict'])[:3])} are not a model's)"
        )
    recorded = checkpoint.get(CHECKPOINT_KEY)
    config = recorded.get("model_config") if isinstance(recorded, Mapping) else None
    if config is None:
        return state, None
    if not isinstance(config, Mapping):
        raise ValueError(f"{path}: checkpoint[{CHECKPOINT_KEY!r}]['model_config'] is not a dict of ModelConfig fields")
    return state, dict(config)


def checkpoint_processor(checkpoint: Any, path: Path, config: ModelConfig | None) -> Processor | None:
    """The processor a training checkpoint carries (``checkpoint["mmformer"]``, written by the training task), fitted
    to the model's ``config`` (see :meth:`Processor.from_dict`)."""
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("preprocessor_config"), Mapping):
        return None
    tokenizer = saved.get("tokenizer_json")
    tokenizer = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else None
    where = f"{path}: {CHECKPOINT_KEY}"
    return Processor.from_dict(dict(saved["preprocessor_config"]), tokenizer, where=where, model=config)
