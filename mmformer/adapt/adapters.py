"""LoRA / DoRA adapters through ``peft``: their settings, the modules they target, adding them to a model, merging
or unloading them, and growing the vocabulary they may train new tokens of.

peft wraps mmformer's ``nn.Linear`` layers as they are (its custom-model support: ``target_modules``), in place, so
an adapted model is still a :class:`~mmformer.MultimodalTransformer` that zero-shot classification, captioning and
transcription use unchanged::

    add_lora(model, LoraSettings(r=8, target_modules=["qkv", "out", "mlp"], routes=["audio", "decoder"]))
    ...train...
    save_adapter(model, "out/adapter", base_model="data/digits_model")  # adapter_files: peft's folder layout
    model = mmformer.from_pretrained("data/digits_model", adapter="out/adapter")
    merge_and_unload(model)   # a plain model with the adapter folded into its weights
    unload(model)             # the base model back, exactly

The adapter folder (save, read, load) is :mod:`mmformer.adapt.adapter_files`; QLoRA's 4-bit base (``quantize: nf4``)
is :mod:`mmformer.adapt.four_bit`; the adapter a model carries (its parameters, config, tensors) is
:mod:`mmformer.adapt.adapter_state`.

Target names. mmformer's self-attention projects q, k and v with one fused linear layer (as GPT-2's ``c_attn``),
so LoRA adapts them together; ``target_modules`` takes these kinds, or regular expressions over module names:

    qkv        self-attention q/k/v (``blocks.N.attn.fn.qkv``)   out        its output projection (``attn.fn.proj``)
    cross_q    cross-attention query (``cross_attn.fn.q``)      cross_kv   its fused key/value (``cross_attn.fn.kv``)
    cross_out  cross-attention output (``cross_attn.fn.proj``)  mlp        the MLP's fc1 and fc2 (every expert's)
    attention = qkv + out;  cross_attention = cross_q + cross_kv + cross_out;  all = every kind

``routes`` restricts the kinds and regexes to the stacks those routes run through (with a shared stack, every
route's).

Shape legend: r rank, D_in / D_out a linear layer's input / output width, V vocabulary, D width.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.adapt.adapter_state import ADAPTER_NAME, _adapter_config, _adapter_state, require_peft
from mmformer.adapt.four_bit import QUANT_TYPES, _four_bit_layers, dequantize_4bit, quantize_4bit
from mmformer.io.pretrained import has_adapter
from mmformer.io.weights import base_layer, listed
from mmformer.values import is_int, is_number

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

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
