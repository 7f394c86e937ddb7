"""LoRA / DoRA adapters through ``peft``, QLoRA's 4-bit base through ``bitsandbytes``, and the adapter files peft
users read.

peft wraps mmformer's ``nn.Linear`` layers as they are (its custom-model support: ``target_modules``), in place, so
an adapted model is still a :class:`~mmformer.MultimodalTransformer` that zero-shot classification, captioning and
transcription use unchanged::

    add_lora(model, LoraSettings(r=8, target_modules=["qkv", "out", "mlp"], routes=["audio", "decoder"]))
    ...train...
    save_adapter(model, "out/adapter", base_model="data/digits_model")  # adapter_config.json + ...safetensors
    model = mmformer.from_pretrained("data/digits_model", adapter="out/adapter")
    merge_and_unload(model)   # a plain model with the adapter folded into its weights
    unload(model)             # the base model back, exactly

The folder is peft's own layout (``PeftModel.save_pretrained``): ``peft.PeftModel.from_pretrained(base, folder)``
reads it on the same base module. Reading follows mmformer's loading rule: the adapter is created on the meta
device, its tensors are checked against the file's safetensors header (names and shapes, which name the module
when the adapter belongs to another base), and only then read and assigned. Pickled ``adapter_model.bin`` files are
refused.

Target names. mmformer's self-attention projects q, k and v with one fused linear layer (as GPT-2's ``c_attn``),
so LoRA adapts them together; ``target_modules`` takes these kinds, or regular expressions over module names:

    qkv        self-attention q/k/v (``blocks.N.attn.fn.qkv``)   out        its output projection (``attn.fn.proj``)
    cross_q    cross-attention query (``cross_attn.fn.q``)      cross_kv   its fused key/value (``cross_attn.fn.kv``)
    cross_out  cross-attention output (``cross_attn.fn.proj``)  mlp        the MLP's fc1 and fc2 (every expert's)
    attention = qkv + out;  cross_attention = cross_q + cross_kv + cross_out;  all = every kind

``routes`` restricts the kinds and regexes to the stacks those routes run through (with a shared stack, every
route's).

QLoRA (Dettmers et al. 2023): ``quantize: nf4`` replaces the frozen base's linear layers with bitsandbytes
``Linear4bit`` (NF4, double-quantized block scales) before LoRA is added; peft then wraps them with its 4-bit LoRA
layer. bitsandbytes was chosen over torchao's NF4 tensor because peft's LoRA layers dispatch on bitsandbytes'
``Linear4bit`` (merging dequantizes and requantizes), and bitsandbytes >= 0.45 runs ``Linear4bit`` on CPU as well
as CUDA with torch 2.11-2.14 wheels; torchao's ``NF4Tensor`` has no peft LoRA layer.

Shape legend: r rank, D_in / D_out a linear layer's input / output width, V vocabulary, D width.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn

from mmformer.compress.quantization import quantizable
from mmformer.io.pretrained import has_adapter
from mmformer.io.weights import TensorSpec, base_layer, human_count, listed
from mmformer.values import is_int, is_number

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's adapter name inside a model; files store tensors without it
PEFT_PREFIX = "base_model.model."  # keys as PeftModel.save_pretrained writes them (PeftModel → LoraModel → model)

TARGET_KINDS = {
    "qkv": r"attn\.fn\.qkv",
    "out": r"attn\.fn\.proj",
    "cross_q": r"cross_attn\.fn\.q",
    "cross_kv": r"cross_attn\.fn\.kv",
    "cross_out": r"cross_attn\.fn\.proj",
    "mlp": r"mlp\.(?:.+\.)?fc[12]",
}
TARGET_GROUPS = {
    "attention": ("qkv", "out"),
    "cross_attention": ("cross_q", "cross_kv", "cross_out"),
    "all": tuple(TARGET_KINDS),
}
QUANT_TYPES = ("nf4", "fp4")
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size: the CPU eval kernel needs whole blocks per weight row
BNB_CPU_ROWS = 32  # and output rows in groups of 32
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)  # module types peft's LoRA wraps


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class LoraSettings:
    """LoRA as the task configures it (field names follow ``peft.LoraConfig``); validated on construction."""

    r: int = 8  # rank of the update B @ A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "out", "mlp"])  # kinds or module regexes
    routes: list[str] | None = None  # only the stacks these routes run through (None: every stack)
    use_dora: bool = False  # DoRA: a learned magnitude per output row beside the LoRA direction
    use_rslora: bool = False  # rank-stabilised LoRA: updates scale by lora_alpha / sqrt(r) instead of / r
    trainable_token_indices: list[int] = field(default_factory=list)  # token rows (embedding and LM head) to train
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained as copies saved in the adapter
    quantize: str | None = None  # QLoRA: nf4 | fp4 keeps the frozen base's linear layers in 4 bits

    def __post_init__(self) -> None:
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"lora.r: expected the LoRA rank, an int >= 1, got {self.r!r}")
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(
                f"lora.lora_alpha: expected a number > 0 (updates scale by alpha / r), got {self.lora_alpha!r}"
            )
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora.lora_dropout: expected a number in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"lora.target_modules: expected a non-empty list of kinds ({', '.join([*TARGET_KINDS, *TARGET_GROUPS])}"
                f") or module-name regexes, got {self.target_modules!r}"
            )
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"lora.{flag}: expected true or false, got {getattr(self, flag)!r}")
        if self.quantize not in (None, *QUANT_TYPES):
            raise ValueError(f"lora.quantize: expected None or one of {list(QUANT_TYPES)}, got {self.quantize!r}")
        self.target_modules = list(self.target_modules)
        self.trainable_token_indices = list(self.trainable_token_indices)
        self.modules_to_save = list(self.modules_to_save)
        if any(not is_int(i) or i < 0 for i in self.trainable_token_indices):
            raise ValueError(
                f"lora.trainable_token_indices: expected token ids >= 0, got {self.trainable_token_indices}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_peft() -> None:
    """A clear error where peft is missing (it is an optional dependency: ``pip install 'mmformer[adapt]'``)."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError("LoRA adapters need the peft package (>= 0.21): pip install 'mmformer[adapt]'")


# ---------------------------------------------------------------------------------------------------- targets
def target_regex(
    model: MultimodalTransformer, target_modules: Sequence[str], routes: Sequence[str] | None = None
) -> str:
    """The regular expression (peft full-matches it against module names) for ``target_modules`` on the stacks
    of ``routes``; every kind and regex must select at least one adaptable module, or ValueError names it."""
    stacks = _route_stacks(model, routes)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, ADAPTABLE)}
    parts = []
    for target in target_modules:
        kinds = TARGET_GROUPS.get(target, (target,) if target in TARGET_KINDS else ())
        if target in ("q", "k", "v"):
            raise ValueError(
                f"lora.target_modules: {target!r}: mmformer's self-attention projects q, k and v with one fused "
                "linear layer, so LoRA adapts them together: use 'qkv' (and 'cross_q' / 'cross_kv' for "
                "cross-attention)"
            )
        if kinds:
            for kind in kinds:
                regex = rf"stacks\.(?:{'|'.join(map(re.escape, stacks))})\.blocks\.\d+\.{TARGET_KINDS[kind]}"
                if not any(re.fullmatch(regex, name) for name in modules) and target not in TARGET_GROUPS:
                    raise ValueError(
                        f"lora.target_modules: {target!r} matches no module of the stacks {stacks} (e.g. "
                        f"{_example(modules)}); this model's kinds: {_present_kinds(modules, stacks)}"
                    )
                parts.append(regex)
            continue
        try:
            re.compile(target)
        except re.error as e:
            kinds = ", ".join(TARGET_KINDS)
            raise ValueError(f"lora.target_modules: {target!r} is neither a kind ({kinds}) nor a regex ({e})") from e
        regex = target
        if routes is not None:  # only the routed stacks' modules: a lookahead on the name's start
            regex = rf"(?=stacks\.(?:{'|'.join(map(re.escape, stacks))})\.)(?:{target})"
        if not any(re.fullmatch(regex, name) for name in modules):
            where = f" in the stacks {stacks} of routes {list(routes)}" if routes is not None else ""
            raise ValueError(
                f"lora.target_modules: {target!r} matches no linear, convolution or embedding module{where} (module "
                f"names look like {_example(modules)}); kinds: {', '.join([*TARGET_KINDS, *TARGET_GROUPS])}"
            )
        parts.append(regex)
    regex = "|".join(f"(?:{p})" for p in dict.fromkeys(parts))
    if not any(re.fullmatch(regex, name) for name in modules):
        raise ValueError(f"lora.target_modules: {list(target_modules)} select no module of the stacks {stacks}")
    return regex


def _route_stacks(model: MultimodalTransformer, routes: Sequence[str] | None) -> list[str]:
    config_routes = model.config.routes
    if routes is None:
        return sorted(model.config.stacks)
    unknown = [r for r in routes if r not in config_routes]
    if unknown or not routes:
        raise ValueError(f"lora.routes: expected some of this model's routes {sorted(config_routes)}, got {routes!r}")
    return sorted({config_routes[r] for r in routes})


def _example(modules: dict[str, nn.Module]) -> str:
    return next((n for n in modules if ".blocks." in n), next(iter(modules), "(none)"))


def _present_kinds(modules: dict[str, nn.Module], stacks: list[str]) -> list[str]:
    prefix = rf"stacks\.(?:{'|'.join(map(re.escape, stacks))})\.blocks\.\d+\."
    return [k for k, r in TARGET_KINDS.items() if any(re.fullmatch(prefix + r, n) for n in modules)]


def lora_config(model: MultimodalTransformer, settings: LoraSettings, *, inference_mode: bool = False) -> Any:
    """The ``peft.LoraConfig`` of ``settings`` on ``model`` (targets resolved to one regex and checked)."""
    require_peft()
    import peft

    if not isinstance(settings, LoraSettings):
        raise TypeError(f"settings: expected mmformer.adapt.adapters.LoraSettings, got {type(settings).__name__}")
    tokens = None
    if settings.trainable_token_indices:
        vocab = model.config.text.vocab_size
        if model.text_embed is None:
            raise ValueError("lora.trainable_token_indices: this model has no token embedding")
        wrong = [i for i in settings.trainable_token_indices if i >= vocab]
        if wrong:
            raise ValueError(
                f"lora.trainable_token_indices: ids {listed(wrong)} are outside the vocabulary of {vocab} tokens "
                "(grow it first: resize_vocab / resize_token_embeddings)"
            )
        ids = sorted(set(settings.trainable_token_indices))
        tokens = {"text_embed.tokens": ids, **({"lm_head": ids} if model.lm_head is not None else {})}
    names = dict(model.named_modules())
    missing = [m for m in settings.modules_to_save if m not in names]
    if missing:
        top = [name for name, _ in model.named_children()]
        raise ValueError(f"lora.modules_to_save: no module named {missing} (top-level modules: {top})")
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=target_regex(model, settings.target_modules, settings.routes),
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        trainable_token_indices=tokens,
        modules_to_save=list(settings.modules_to_save) or None,
        inference_mode=inference_mode,
    )


# ---------------------------------------------------------------------------------------------------- adding
def add_lora(model: MultimodalTransformer, settings: LoraSettings) -> MultimodalTransformer:
    """Quantize the base (``settings.quantize``) and inject LoRA layers into ``model`` in place; only the adapter's
    parameters stay trainable. Returns ``model``."""
    require_peft()
    from peft.functional import inject_adapter_in_model

    if has_adapter(model):
        raise ValueError("model: already carries an adapter; unload or merge it first (one adapter at a time)")
    config = lora_config(model, settings)  # checks the targets before the model is changed
    if settings.quantize:
        quantize_4bit(model, settings.quantize)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's own parameters (LoRA A/B, DoRA magnitudes, trained token rows, saved module copies)."""
    from peft.utils import get_peft_model_state_dict

    if not has_adapter(model):
        return {}
    saved = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True), adapter_name=ADAPTER_NAME)
    ids = {id(t) for t in saved.values()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


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
        safetensors.torch.save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if processor is not None:
            processor.save_pretrained(staging)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft saves them (names without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def _adapter_config(model: nn.Module) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    if ADAPTER_NAME not in configs:
        raise ValueError("model: carries no adapter (add_lora or load_adapter first)")
    return configs[ADAPTER_NAME]


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


# ---------------------------------------------------------------------------------------------------- merging
def merge_and_unload(model: MultimodalTransformer) -> MultimodalTransformer:
    """Fold the adapter into the base weights and remove its layers: a plain model (peft's ``merge_and_unload``).
    An LM head tied to the token table is untied first when the adapter changes either (new token rows, a trained
    copy of the table). A QLoRA model's 4-bit base is first turned back into float layers (:func:`dequantize_4bit`)
    and the adapter merged into those, as ``mmformer export --ckpt --merge`` merges a run's adapter into its float
    base: peft's own 4-bit merge would round the sum back to 4 bits (and on CPU misreads the layout bitsandbytes
    repacks weights into for eval)."""
    if _four_bit_layers(model):
        _move_adapter(model, dequantize_4bit)
    _untie_adapted_head(model)
    return _unload(model, merge=True)


def _move_adapter(model: MultimodalTransformer, change_base: Any) -> None:
    """Take the adapter off, ``change_base(model)``, and put the same adapter (config and tensors) back on."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

    config, state = copy.deepcopy(_adapter_config(model)), _adapter_state(model)
    unload(model)
    change_base(model)
    config.init_lora_weights = False  # its tensors come from state
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)


def unload(model: MultimodalTransformer) -> MultimodalTransformer:
    """Remove the adapter's layers without merging: the base model, exactly as it was (peft's ``unload``)."""
    return _unload(model, merge=False)


def _unload(model: MultimodalTransformer, merge: bool) -> MultimodalTransformer:
    require_peft()
    # as peft's BaseTuner._unload_and_optionally_merge, on a model adapted in place (no PeftModel around it)
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not has_adapter(model):
        raise ValueError("model: carries no adapter to unload")
    tuners = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    inside = lambda name: any(name.startswith(t + ".") for t in tuners)  # noqa: E731
    for name in [n for n, _ in model.named_modules() if n and not inside(n)]:
        try:
            target = model.get_submodule(name)
        except AttributeError:  # under a wrapper replaced earlier in this loop
            continue
        parent_name, _, attr = name.rpartition(".")
        if isinstance(target, ModulesToSaveWrapper) and not merge:  # peft's unload keeps the trained copy
            replacement = target.original_module
        elif hasattr(target, "unload_and_optionally_merge_module"):
            replacement = target.unload_and_optionally_merge_module(merge=merge, safe_merge=True, adapter_names=None)
        elif isinstance(target, BaseTunerLayer):
            if merge:
                target.merge(safe_merge=True)
            replacement = target.get_base_layer()
        else:
            continue
        setattr(model.get_submodule(parent_name), attr, replacement)
    del model.peft_config
    return model


def _untie_adapted_head(model: MultimodalTransformer) -> None:
    """Give a tied LM head its own copy of the token table when an adapter changes either: merged separately, the
    two would otherwise overwrite each other's rows."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model.lm_head is None or not model.config.tie_lm_head:
        return
    wrapped = [
        name
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) or hasattr(m, "unload_and_optionally_merge_module")
    ]
    under = lambda path: any(path == w or path.startswith(w + ".") for w in wrapped)  # noqa: E731
    if not (under("lm_head") or under("text_embed.tokens")):  # a wrapper on either or on a module holding it
        return
    head = base_layer(model.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_lm_head = False


# ---------------------------------------------------------------------------------------------------- vocabulary
def resize_token_embeddings(model: MultimodalTransformer, vocab_size: int) -> MultimodalTransformer:
    """Grow the token table (and the LM and CTC heads) to ``vocab_size`` rows in place, as Hugging Face's
    ``resize_token_embeddings`` after ``tokenizer.add_tokens``. New rows start at zero: a new token's logit is
    exactly 0 and every existing token's logit and embedding is unchanged, so the model behaves as before on text
    without the new tokens (until a new logit outscores all others, which a zero cannot do where the best existing
    logit is positive)."""
    if has_adapter(model):
        raise ValueError("model: resize the vocabulary before adding an adapter")
    text = model.config.text
    old = text.vocab_size
    if not is_int(vocab_size) or vocab_size < old:
        raise ValueError(f"vocab_size: expected an int >= the model's {old} tokens (growing only), got {vocab_size!r}")
    if vocab_size == old or model.text_embed is None:
        return model

    def grow(param: nn.Parameter) -> nn.Parameter:
        extra = param.new_zeros(vocab_size - old, *param.shape[1:])
        return nn.Parameter(torch.cat([param.detach(), extra]), requires_grad=param.requires_grad)

    tokens = model.text_embed.tokens
    tokens.weight, tokens.num_embeddings = grow(tokens.weight), vocab_size
    if model.lm_head is not None:
        if model.config.tie_lm_head:
            model.tie_weights()
        else:
            model.lm_head.weight = grow(model.lm_head.weight)
        model.lm_head.out_features = vocab_size
    if model.ctc_head is not None:
        model.ctc_head.weight, model.ctc_head.bias = grow(model.ctc_head.weight), grow(model.ctc_head.bias)
        model.ctc_head.out_features = vocab_size
    text.vocab_size = vocab_size  # the config object the text embedder checks ids against
    return model


# ---------------------------------------------------------------------------------------------------- QLoRA
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
