"""The adapter folder on disk, in peft's own layout (``PeftModel.save_pretrained``): adapter_config.json +
adapter_model.safetensors, written atomically and read back onto a base model::

    save_adapter(model, "out/adapter", base_model="data/digits_model")  # adapter_config.json + ...safetensors
    model = load_adapter(mmformer.load_pretrained("data/digits_model"), "out/adapter")

``peft.PeftModel.from_pretrained(base, folder)`` reads the folder on the same base module. Reading follows mmformer's
loading rule: the adapter is created on the meta device, its tensors are checked against the file's safetensors
header (names and shapes, which name the module when the adapter belongs to another base), and only then read and
assigned. Pickled ``adapter_model.bin`` files are refused, and so are adapters that loading cannot apply exactly
(trained biases, initialisations that rewrote the base).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from mmformer.adapt.adapter_state import ADAPTER_NAME, _adapter_config, _adapter_state, require_peft
from mmformer.adapt.adapters import resize_token_embeddings, unload
from mmformer.io.atomic import save_safetensors
from mmformer.io.pretrained import ADAPTER_CONFIG, has_adapter
from mmformer.io.weights import TensorSpec, human_count, listed

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # keys as PeftModel.save_pretrained writes them (PeftModel → LoraModel → model)


# ---------------------------------------------------------------------------------------------------- files
def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    processor: Any = None,
    overwrite: bool = True,
) -> None:
    """Write the adapter in peft's layout (adapter_config.json + adapter_model.safetensors), atomically.

    Args:
        model: a model with an adapter (:func:`add_lora`, :func:`load_adapter`).
        directory: the adapter folder (created or replaced; other files in it are kept).
        base_model: recorded as ``base_model_name_or_path``, as peft does.
        processor: saved beside the adapter (tokenizer.json, preprocessor_config.json): needed when the adapter
            trains new tokens (a grown vocabulary), so that loading can grow the base to match.
        overwrite: False refuses to replace an adapter already saved there (FileExistsError).
    """
    require_peft()
    from mmformer.io.pretrained import atomic_directory

    config = _adapter_config(model)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in _adapter_state(model).items()}
    config = copy.deepcopy(config)
    config.inference_mode = True
    if base_model is not None:
        config.base_model_name_or_path = str(base_model)
    with atomic_directory(directory, overwrite=overwrite, marker_files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS)) as staging:
        config.save_pretrained(str(staging))
        save_safetensors(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if processor is not None:
            processor.save_pretrained(staging)


def read_adapter_config(directory: str | os.PathLike) -> Any:
    """The ``peft.LoraConfig`` of an adapter folder, or a clear error: no folder, no adapter_config.json, another
    peft method than LoRA, pickled weights only."""
    require_peft()
    import peft

    directory = Path(directory)
    if not directory.is_dir():
        expected = f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
        raise FileNotFoundError(f"adapter: no such folder {directory}; expected an adapter folder ({expected})")
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(
            f"adapter: {directory} has no {ADAPTER_CONFIG}; expected a folder written by mmformer's save_adapter or "
            f"peft's save_pretrained ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter: {path} is not valid JSON ({e})") from e
    if not isinstance(record, dict) or record.get("peft_type") != "LORA":
        kind = record.get("peft_type") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"adapter: {path}: expected a LoRA adapter (peft_type 'LORA'), got {kind!r}")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (directory / n).is_file()]
        if pickled:
            raise ValueError(
                f"adapter: {directory} holds {pickled[0]}, a pickle; mmformer reads adapter weights only as "
                f"{ADAPTER_WEIGHTS} (re-save it with peft's save_pretrained(safe_serialization=True))"
            )
        raise FileNotFoundError(f"adapter: {directory} has no {ADAPTER_WEIGHTS}")
    try:
        return peft.LoraConfig.from_pretrained(str(directory))
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter: {path}: not a valid peft LoraConfig ({e})") from e


def load_adapter(model: MultimodalTransformer, directory: str | os.PathLike) -> MultimodalTransformer:
    """Apply the adapter saved in ``directory`` to ``model`` in place (mmformer's loading rule: the adapter is built
    on the meta device and checked against the file's header before its tensors are read). An adapter saved with a
    larger vocabulary (new tokens) grows the model's token table to match first.

    Raises:
        FileNotFoundError: no such folder or no adapter_model.safetensors.
        ValueError: no adapter_config.json, not a LoRA adapter, pickled weights, target modules this model lacks,
            or tensors that do not fit this model (listed by module: the adapter belongs to another base).
    """
    require_peft()
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from mmformer.io.pretrained import open_safetensors, read_processor

    config = read_adapter_config(directory)
    directory = Path(directory)
    if has_adapter(model):
        raise ValueError("model: already carries an adapter; unload or merge it first (one adapter at a time)")
    _check_loadable(config, directory)
    weights_path = directory / ADAPTER_WEIGHTS
    specs, read, _ = open_safetensors(weights_path, "cpu")
    processor = read_processor(directory)
    vocab = getattr(getattr(processor, "tokenizer", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > model.config.text.vocab_size:
        resize_token_embeddings(model, vocab)
    config.inference_mode = False
    config.init_lora_weights = False  # the file's tensors replace any initialisation (checked: none rewrites the base)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True)
    except ValueError as e:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in name]
        raise ValueError(
            f"adapter: {directory}: its target modules do not fit this model ({e}); an adapter must target "
            f"mmformer's module names (e.g. {', '.join(linear[:4])}): adapters trained with peft on the original "
            "transformers model (q_proj, v_proj, ...) are not translated"
        ) from e
    try:
        expected = {
            PEFT_PREFIX + k: TensorSpec.of(v)
            for k, v in get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True)).items()
        }
        _check_adapter(expected, specs, weights_path)
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        tensors = {}
        for key, value in read(sorted(expected)).items():
            dtype = expected[key].dtype if value.is_floating_point() else value.dtype
            tensors[key.removeprefix(PEFT_PREFIX)] = value.to(device=device, dtype=dtype)
        set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True)
        still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
        if still_meta:
            raise ValueError(f"{weights_path}: no values for {listed(still_meta)}")
    except BaseException:
        unload(model)  # leave the base as it was
        raise
    for param in model.parameters():
        param.requires_grad_(False)  # a loaded adapter is for inference; add_lora trains one
    if processor is not None:
        model.processor = processor
    return model.eval()


# initialisations that rewrite the base weights (the adapter then belongs to that residual base, not to the model)
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _check_loadable(config: Any, directory: Path) -> None:
    """Refuse adapters that loading cannot apply exactly and ``unload`` cannot take back: trained biases (peft's
    ``bias`` 'all' / 'lora_only' overwrite the base's own biases) and initialisations that rewrote the base."""
    if config.bias != "none":
        raise ValueError(
            f"adapter: {directory}: bias={config.bias!r} (the adapter replaces the base's biases); mmformer loads "
            "adapters with bias='none' only"
        )
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"adapter: {directory}: init_lora_weights={init!r} rewrites the base weights when the adapter is created, "
            "so the adapter belongs to that residual base, not to this model; convert it to a plain LoRA adapter "
            "first with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )


def _check_adapter(expected: dict[str, TensorSpec], specs: dict[str, TensorSpec], source: Path) -> None:
    """Refuse a file whose tensors are not exactly the adapter this model expects, naming the modules."""

    def module(key: str) -> str:
        name = key.removeprefix(PEFT_PREFIX)
        for part in (".lora_", ".token_adapter.", ".modules_to_save."):
            if part in name:
                return name.split(part)[0]
        return name.rpartition(".")[0]

    wrong = [
        f"{module(k)} ({k.removeprefix(PEFT_PREFIX).removeprefix(module(k) + '.')}: expected "
        f"{tuple(expected[k].shape)}, found {tuple(s.shape)})"
        for k, s in sorted(specs.items())
        if k in expected and tuple(s.shape) != tuple(expected[k].shape)
    ]
    missing = sorted({module(k) for k in set(expected) - set(specs)})
    unexpected = sorted({module(k) for k in set(specs) - set(expected)})
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) have another shape than this model's modules give: {listed(wrong)}")
    if missing:
        problems.append(f"no tensors for the adapted modules {listed(missing)}")
    if unexpected:
        problems.append(f"tensors for modules this model does not adapt: {listed(unexpected)}")
    if problems:
        held = sum(s.numel for s in specs.values())
        raise ValueError(
            f"{source}: the adapter does not fit this base model (it was trained on another base or config): "
            + "; ".join(problems)
            + f" (the file holds {human_count(held)} parameters)"
        )
