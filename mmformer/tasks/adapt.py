"""Adapting a pretrained model in ``mmformer fit``: where the weights start, what trains, and the adapters and
prompts a :class:`~mmformer.tasks.MultimodalTask` carries.

The task's options (YAML under ``model.adapt:``, :class:`~mmformer.tasks.settings.AdaptSettings`)::

    init_from: data/digits_model     # anything mmformer.from_pretrained reads; its config and processor come along
    init_strict: true                # false: keys the checkpoint lacks (a new head) are initialised, and listed
    resize_vocab: false              # true: grow the token table to a larger tokenizer's (new rows start at zero)
    frozen: [image]                  # parameter-name patterns or route groups (below) that do not train
    trainable: [heads]               # ... that train; given alone, everything else is frozen
    lora: {r: 8, lora_alpha: 16, target_modules: [qkv, out, mlp], routes: [audio, decoder]}   # peft LoRA / QLoRA
    prompt: {kind: context, length: 4}                                                          # CoOp / decoder prefix

Route groups: ``image``, ``audio``, ``text``, ``decoder`` (a route's embedder, the stack it runs through, its
projection or head), ``embedders`` and ``heads`` (projections, logit scale and bias, LM and CTC heads). A pattern
is otherwise a parameter name, a module prefix (``stacks.shared.blocks.3``) or a glob (``stacks.*.blocks.3.*``).
Freezing sets ``requires_grad=False``: frozen parameters get no gradient, no optimizer state (the optimizer only
receives trainable ones) and stay bit-identical. With LoRA or a prompt, the base is frozen and only the adapter's
or prompt's parameters train; ``trainable`` may add prompt-tuning's partners (not LoRA's: unloading an adapter must
give the base back, so whole modules that train with LoRA go in ``lora.modules_to_save``).

The data module takes its processor from ``init_from`` (the CLI links ``model.adapt.init_from`` to
``data.processor_from``) instead of training a tokenizer: the model is loaded once, here, and the data module takes
its processor from this task under the trainer. Its tokenizer's size (or an explicit ``data.tokenizer``'s, through the
vocabulary link) must fit the checkpoint's token table (or ``resize_vocab``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mmformer.adapt.adapter_state import adapter_parameters
from mmformer.adapt.adapters import LoraSettings, add_lora, resize_token_embeddings
from mmformer.adapt.prompts import KINDS, PROMPT_FILE, ContextPrompt, DecoderPrefix, SoftPrompt, load_prompt
from mmformer.config import ModelConfig, TextConfig
from mmformer.io.training_checkpoints import ADAPTER_KEYS
from mmformer.io.weights import human_count
from mmformer.model import MultimodalTransformer
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

GROUPS = ("image", "audio", "text", "decoder", "embedders", "heads")


@dataclass
class PromptSettings:
    """A soft prompt trained with everything else frozen (see :mod:`mmformer.adapt.prompts`)."""

    kind: str = "context"  # context (CoOp, zero-shot classification) | decoder_prefix (captioning / speech)
    length: int = 4  # context vectors M, or prefix vectors P
    init: str | None = None  # words whose token embeddings start the vectors (CoOp's "a photo of a"); None: random
    path: str | None = None  # start from a saved prompt file instead

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"prompt.kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if not is_int(self.length) or self.length < 1:
            raise ValueError(f"prompt.length: expected an int >= 1, got {self.length!r}")
        if self.init is not None and self.path is not None:
            raise ValueError("prompt: pass init (words) or path (a saved prompt), not both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings(value: Any, cls: type, name: str) -> Any:
    """``value`` as ``cls`` (a dataclass; a dict from YAML or a checkpoint's hyperparameters is accepted)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, value)) - set(accepted))
        if unknown:  # the dataclass's own TypeError names one key and none of the accepted ones
            raise ValueError(f"{name}: unknown key(s) {unknown}; accepted keys: {accepted}")
        try:
            return cls(**value)
        except TypeError as e:
            raise ValueError(f"{name}: {e}") from e
    raise TypeError(f"{name}: expected {cls.__name__} or its dict, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------- weights
def _stored_vocab_size(init_from: str) -> int | None:
    """The token table size a model folder or training checkpoint of mmformer's records (None for other sources:
    their converters set it)."""
    from mmformer.io.hub import resolve_source
    from mmformer.io.pretrained import read_checkpoint

    source = resolve_source(init_from)
    if source.kind == "mmformer" and source.config is not None:
        return (source.config.get("text") or {}).get("vocab_size")
    if source.kind == "checkpoint":
        return read_checkpoint(source.location).config.text.vocab_size
    return None


def initial_model(
    config: ModelConfig | None,
    *,
    init_from: str | None,
    strict: bool = True,
    vocab_size: int | None = None,
    resize_vocab: bool = False,
) -> MultimodalTransformer:
    """The model a task starts from: a fresh one from ``config``, or the weights of ``init_from`` (in its own
    config unless ``config`` is given), checked against the tokenizer's ``vocab_size``.

    Raises:
        ValueError: missing / unexpected / misshapen keys (listed; ``strict=False`` initialises missing keys), or a
            tokenizer vocabulary larger than the checkpoint's token table without ``resize_vocab`` (both sizes named).
    """
    from mmformer.io.auto import from_pretrained

    if init_from is None:
        if config is None:
            raise ValueError("model: expected a ModelConfig, or init_from: a pretrained model to start from")
        if resize_vocab:
            raise ValueError("resize_vocab: only meaningful with init_from (a fresh model takes the vocabulary size)")
        if vocab_size is not None:
            if config.text.vocab_size not in (vocab_size, TextConfig.vocab_size):  # set by hand, and replaced
                rank_zero_warn(
                    f"model.text.vocab_size: {config.text.vocab_size} is replaced by the tokenizer's size, "
                    f"vocab_size={vocab_size} (the model's token table follows the tokenizer that reads its texts)"
                )
            config.text.vocab_size = vocab_size
        return MultimodalTransformer(config)
    if config is not None and not resize_vocab:
        # a given config takes the tokenizer's table size, or with the checkpoint's own tokenizer (vocab_size None:
        # data.processor_from) the checkpoint's: `fit --config configs/digits.yaml --model.adapt.init_from
        # data/digits_model` left the config's default (1000) against the checkpoint's 300 and stopped on the shapes
        size = vocab_size if vocab_size is not None else _stored_vocab_size(init_from)
        if size is not None:
            config = ModelConfig.from_dict(
                {**config.to_dict(), "text": {**config.to_dict()["text"], "vocab_size": size}}
            )
    if config is not None and resize_vocab:  # a grown config (load_from_checkpoint): load the table as stored
        from mmformer.io.pretrained import read_checkpoint

        stored = read_checkpoint(init_from).config.text.vocab_size
        vocab_size = max(vocab_size or 0, config.text.vocab_size)
        config = ModelConfig.from_dict({**config.to_dict(), "text": {**config.to_dict()["text"], "vocab_size": stored}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if strict else "default")
        try:
            model = from_pretrained(init_from, config=config, strict=strict)
        except ValueError as e:
            raise ValueError(f"init_from: {e}") from e
    model.train()
    table = model.config.text.vocab_size
    if vocab_size is None:  # the data module takes this model's own tokenizer (data.processor_from)
        vocab_size = getattr(getattr(model.processor, "tokenizer", None), "vocab_size", None)
    if vocab_size is not None and vocab_size > table:
        if not resize_vocab:
            raise ValueError(
                f"init_from: the tokenizer has {vocab_size} token ids but {init_from}'s token table has {table} rows "
                "(text.vocab_size); use the checkpoint's tokenizer, or set resize_vocab: true to grow the table for "
                "new tokens"
            )
        resize_token_embeddings(model, vocab_size)
    elif resize_vocab and (vocab_size is None or vocab_size == table):
        rank_zero_warn(f"resize_vocab: the tokenizer's {vocab_size} ids fit the token table of {table}; nothing grows")
    return model


# ---------------------------------------------------------------------------------------------------- freezing
def group_prefixes(model: MultimodalTransformer) -> dict[str, list[str]]:
    """Each route group's parameter-name prefixes (a shared stack belongs to every route that runs through it)."""
    routes = model.config.routes

    def stack(route: str) -> list[str]:
        return [f"stacks.{routes[route]}."] if route in routes else []

    return {
        "image": ["image_embed.", *stack("image"), "image_proj."],
        "audio": ["audio_embed.", *stack("audio"), "audio_proj.", "ctc_head."],
        "text": ["text_embed.", *stack("text"), "text_proj."],
        "decoder": ["text_embed.", *stack("decoder"), "lm_head."],
        "embedders": ["image_embed.", "audio_embed.", "text_embed."],
        "heads": ["image_proj.", "audio_proj.", "text_proj.", "logit_scale", "logit_bias", "lm_head.", "ctc_head."],
    }


def select(names: list[str], pattern: str, groups: dict[str, list[str]]) -> list[str]:
    """The parameter names a pattern selects: a route group, an exact name, a module prefix or a glob."""
    if pattern in groups:
        prefixes = groups[pattern]
        return [n for n in names if any(n == p or n.startswith(p) for p in prefixes)]
    return [n for n in names if n == pattern or n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern)]


def apply_freezing(
    model: nn.Module, trainable: list[str] | None, frozen: list[str] | None, *, adapted: bool = False
) -> None:
    """Set ``requires_grad`` by pattern: ``frozen`` first, then ``trainable`` (which wins); ``trainable`` alone
    freezes everything else first. A pattern that selects nothing is a ValueError naming it."""
    if not trainable and not frozen:
        return
    params = dict(model.named_parameters(remove_duplicate=False))  # tied aliases too (lm_head.weight)
    names = list(params)
    groups = group_prefixes(model)
    chosen = {}
    for key, patterns in (("frozen", frozen or []), ("trainable", trainable or [])):
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{key}: expected parameter-name patterns or route groups, got {pattern!r}")
            hits = select(names, pattern, groups)
            if not hits:
                raise ValueError(
                    f"{key}: {pattern!r} selects no parameter; expected a route group {list(GROUPS)}, a parameter "
                    f"name, a module prefix or a glob (names look like {names[0]!r} … {names[-1]!r})"
                )
            chosen.setdefault(key, []).extend(hits)
    if adapted and "trainable" in chosen:
        base = [n for n in chosen["trainable"] if not _is_adapter_name(n)]
        if base:
            raise ValueError(
                f"trainable: {base[:3]} … are base-model parameters; with LoRA the base stays frozen so that unloading "
                "the adapter gives it back exactly: list whole modules in lora.modules_to_save instead"
            )
    if trainable and not frozen:
        for p in params.values():
            p.requires_grad_(False)
    for key, value in (("frozen", False), ("trainable", True)):
        for name in chosen.get(key, []):
            params[name].requires_grad_(value)


def _is_adapter_name(name: str) -> bool:
    return any(part in name for part in (".lora_", ".token_adapter.", ".modules_to_save."))


def parameter_report(task: nn.Module) -> str:
    """One line: trainable vs frozen parameter counts, and where the trainable ones are."""
    trainable = frozen = 0
    where: dict[str, int] = {}
    for name, p in task.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            part = "lora" if ".lora_" in name else name.removeprefix("model.").split(".")[0]
            where[part] = where.get(part, 0) + p.numel()
        else:
            frozen += p.numel()
    total = trainable + frozen
    parts = ", ".join(f"{k} {human_count(v)}" for k, v in sorted(where.items(), key=lambda kv: -kv[1]))
    return (
        f"trainable {human_count(trainable)} of {human_count(total)} parameters ({100 * trainable / max(total, 1):.2f} "
        f"%), frozen {human_count(frozen)}" + (f"; trainable: {parts}" if parts else "")
    )


# ---------------------------------------------------------------------------------------------------- set-up
def prepare(
    model: MultimodalTransformer,
    *,
    lora: LoraSettings | None,
    prompt: PromptSettings | None,
    trainable: list[str] | None,
    frozen: list[str] | None,
) -> SoftPrompt | None:
    """Add the adapter and the prompt to a task's model, freeze what does not train; returns the prompt module
    (the task registers it, so it trains and travels in checkpoints)."""
    if lora is not None and prompt is not None:
        raise ValueError("lora and prompt: train one kind of adapter at a time")
    soft = None
    if lora is not None:
        add_lora(model, lora)  # peft freezes everything but the adapter
    elif prompt is not None:
        soft = make_prompt(model, prompt)
        for p in model.parameters():
            p.requires_grad_(False)
    apply_freezing(model, trainable, frozen, adapted=lora is not None)
    if lora is not None and not adapter_parameters(model):
        raise ValueError("lora: the adapter has no trainable parameters")
    if soft is None:  # a prompt trains its own vectors, outside the model
        check_something_trains(model, frozen)
    return soft


def check_something_trains(model: MultimodalTransformer, frozen: list[str] | None) -> None:
    """Refuse a model left with no trainable parameter (the optimizer's own error, "got an empty parameter list",
    names no option). ``frozen`` freezes whatever its patterns select, adapter layers included: a route group
    takes the stack the route runs through, and a shared stack is every route's, so ``frozen: [image]`` beside LoRA
    on a shared-stack model freezes the whole adapter."""
    if any(p.requires_grad for p in model.parameters()):
        return
    routes = model.config.routes
    names = [n for n, _ in model.named_parameters()]
    groups = group_prefixes(model)
    hit = {n for pattern in frozen or [] for n in select(names, pattern, groups)}
    stacks = sorted({s for s in routes.values() if any(n.startswith(f"stacks.{s}.") for n in hit)})
    runs = "; ".join(f"stacks.{s}, the stack of routes {[r for r, t in routes.items() if t == s]}" for s in stacks)
    raise ValueError(
        f"adapt.frozen: {list(frozen or [])} leaves no parameter to train"
        + (f" (it freezes {runs}, adapter layers included)" if runs else "")
        + "; a route group takes the whole stack its route runs through, and a shared stack is every route's. Leave "
        "the group out of frozen, or name narrower patterns (image_embed, image_proj, stacks.NAME.blocks.3); to keep "
        "LoRA off a route's own stack use lora.routes"
    )


def make_prompt(model: MultimodalTransformer, settings: PromptSettings) -> SoftPrompt:
    """The prompt module ``settings`` describe, checked against the model."""
    cls = KINDS[settings.kind]
    if settings.path is not None:
        prompt = load_prompt(settings.path, model, kind=settings.kind)
    elif settings.init is not None:
        if cls is not ContextPrompt:
            raise ValueError("prompt.init: word initialisation is for context prompts (kind: context)")
        tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("prompt.init: initialising from words needs the tokenizer of init_from's processor")
        prompt = ContextPrompt.from_words(model, tokenizer, settings.init)
    else:
        prompt = cls(settings.length, cls.model_width(model))
    prompt.check_model(model)
    return prompt.to(next(model.parameters()).device)


def prefix_embeds(prompt: SoftPrompt | None) -> torch.Tensor | None:
    """The decoder prefix vectors to pass to ``decode`` / ``generate``, if the task trains one."""
    return prompt.vectors if isinstance(prompt, DecoderPrefix) else None


# ---------------------------------------------------------------------------------------------------- CoOp
def class_targets(batch: dict[str, Any], classes: list[str], dataset_classes: list[str] | None) -> torch.Tensor:
    """(B,) class indices of a labelled batch: its texts are class names (a manifest), or its ``label`` indexes the
    data set's classes (an ImageFolder, whose folder names are the class names)."""
    from mmformer.tasks.metrics import normalize_text

    index = {normalize_text(c): i for i, c in enumerate(classes)}
    if batch.get("text") is not None:
        names = list(batch["text"])
    elif batch.get("label") is not None and dataset_classes is not None:
        names = [dataset_classes[int(i)] for i in batch["label"]]
    else:
        raise ValueError(
            f"batch: prompt training needs class labels: texts that are class names, or an ImageFolder's labels; got "
            f"keys {sorted(batch)}"
        )
    unknown = sorted({n for n in names if normalize_text(n) not in index})
    if unknown:
        raise ValueError(f"batch: labels {unknown[:5]} are not among zeroshot.classes {classes}")
    return torch.tensor([index[normalize_text(n)] for n in names], dtype=torch.long)


def context_prompt_losses(
    model: MultimodalTransformer,
    prompt: ContextPrompt,
    tokenizer: Tokenizer,
    classes: list[str],
    batch: dict[str, Any],
    dataset_classes: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CoOp's objective: cross-entropy of the zero-shot logits (:func:`~mmformer.zeroshot.zero_shot_logits`, as the
    classifier scores) over the zero-shot classes, the class embeddings built through the learned context (gradients
    reach only the prompt)."""
    from mmformer.zeroshot import build_class_embeddings, zero_shot_logits

    if not classes or tokenizer is None:
        raise ValueError("prompt (context): training needs zeroshot.classes and a tokenizer (init_from's processor)")
    targets = class_targets(batch, classes, dataset_classes)
    class_embeddings = build_class_embeddings(model, tokenizer, classes, prompt=prompt)  # (C, E)
    parts, feats = {}, {}
    encoders_train = any(p.requires_grad for p in model.parameters())  # e.g. trainable: [image] beside the prompt
    for modality in ("image", "audio"):
        with torch.set_grad_enabled(encoders_train):  # frozen encoders keep no activations
            features = _media_features(model, batch, modality)
        if features is None:
            continue
        feats[modality] = features
        logits = zero_shot_logits(model, features, class_embeddings)  # (B, C)
        parts[f"prompt_{modality}"] = F.cross_entropy(logits, targets.to(logits.device))
    if not parts:
        raise ValueError(f"batch: prompt training needs pixel_values or audio; got keys {sorted(batch)}")
    return parts, feats


def _media_features(model: MultimodalTransformer, batch: dict[str, Any], modality: str) -> torch.Tensor | None:
    """(B, E) embeddings of the batch's images, or of its audio (waveforms, or the log-mel a training loader with
    SpecAugment computed); None when the batch has none."""
    if modality == "image":
        return None if batch.get("pixel_values") is None else model.encode_image(batch["pixel_values"])
    if batch.get("audio_features") is not None:
        return model.encode_audio(audio_features=batch["audio_features"], feature_lengths=batch.get("feature_lengths"))
    if batch.get("audio") is not None:
        return model.encode_audio(batch["audio"], batch.get("audio_lengths"))
    return None


# ---------------------------------------------------------------------------------------------------- export
def checkpoint_record(task: Any) -> dict[str, Any]:
    """What ``mmformer export`` needs to turn an adaptation run's checkpoint into adapter or prompt files: the base
    it started from, and the adapter's or prompt's settings (plain types, for ``torch.load(weights_only=True)``)."""
    record: dict[str, Any] = {}
    if getattr(task, "init_from", None) is not None:
        record["init_from"] = base_name(task.init_from)
    adapting = task.hparams.get("adapt") or {}
    for key in ADAPTER_KEYS:
        if adapting.get(key):
            record[key] = dict(adapting[key])
    return record


def base_name(init_from: str | os.PathLike) -> str:
    """``init_from`` as a run records it and an adapter names its base (``base_model_name_or_path``): a local path
    made absolute — a relative one named the folder from where ``fit`` ran, which a load from anywhere else missed —
    and a Hub id or a library's model name as given."""
    from mmformer.io.hub import parse_name

    parsed = parse_name(init_from)
    return os.path.abspath(parsed.name) if parsed.kind == "path" else os.fspath(init_from)  # "~" expanded there


def export_checkpoint(path: str, out: str, *, merge: bool = False, overwrite: bool = False) -> str:
    """Write what a training run's checkpoint learned, in the pretrained format: a LoRA run's adapter folder (peft's
    layout; with ``merge``, the merged model instead), a prompt run's prompt file, or any other run's model
    (:func:`checkpoint_model`). Returns what was written."""
    from mmformer.adapt import adapter_files

    checkpoint, record = _read_run(path)
    if record.get("prompt"):
        return _export_prompt(checkpoint, record, path, out, merge=merge, overwrite=overwrite)
    if record.get("lora") and not merge:
        model, grown = _adapted_base(checkpoint, record, path)
        processor = model.processor if grown else None  # a grown vocabulary travels with the adapter
        adapter_files.save_adapter(model, out, base_model=base_name(record["init_from"]), processor=processor,
                                   overwrite=overwrite)  # fmt: skip
        return out
    _run_model(checkpoint, record, path, merge=merge).save_pretrained(out, overwrite=overwrite)
    return out


def checkpoint_model(path: str, *, merge: bool = False) -> MultimodalTransformer:
    """The one model a training run's checkpoint stands for, as ``mmformer export`` writes it (pretrained folder,
    ONNX, torch.export): the run's model, converted to the quantization its QAT trained for (as the task converts it
    when fit ends); with ``merge``, a LoRA run's base with the adapter merged in.

    Raises:
        ValueError: a LoRA run's checkpoint without ``merge`` or a prompt run's (:func:`mmformer.from_pretrained`
            refuses them, naming the export that serves them), ``merge`` for any other run.
    """
    checkpoint, record = _read_run(path)
    return _run_model(checkpoint, record, path, merge=merge)


def _read_run(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A training checkpoint (a torch file, or a distributed checkpoint folder) and its adaptation record (empty for
    none); anything else ``export --ckpt`` is given (a saved model folder, a safetensors file) is no run, and
    :func:`mmformer.from_pretrained` reads it."""
    from mmformer.io.training_checkpoints import (
        TORCH_SUFFIXES,
        adaptation_record,
        is_distributed,
        read_training_checkpoint,
    )

    if not is_distributed(Path(path)) and (Path(path).suffix not in TORCH_SUFFIXES or Path(path).is_dir()):
        return {}, {}
    checkpoint = read_training_checkpoint(path)
    return checkpoint, adaptation_record(checkpoint) or {}


def _run_model(checkpoint: dict[str, Any], record: dict[str, Any], path: str, *, merge: bool) -> MultimodalTransformer:
    """:func:`checkpoint_model` of a checkpoint already read (``record``: its adaptation record, empty for none)."""
    from mmformer.adapt import adapters
    from mmformer.io.auto import from_pretrained

    if merge:
        if not record.get("lora"):
            raise ValueError(f"merge: only a LoRA run's adapter merges into its base; {path} is no LoRA run's "
                             "checkpoint (leave out --merge)")  # fmt: skip
        model, _ = _adapted_base(checkpoint, record, path)
        return adapters.merge_and_unload(model)
    model = from_pretrained(path)  # a LoRA or prompt run's checkpoint is refused there, naming what serves it
    qat = (checkpoint.get("hyper_parameters") or {}).get("qat")
    if qat is not None:  # the checkpoints of a QAT run keep the float weights; fit ends by converting them
        from mmformer.compress.quantization import QATOptions, convert_qat

        convert_qat(model, QATOptions.build(qat))
    return model


def _adapted_base(checkpoint: dict[str, Any], record: dict[str, Any], path: str) -> tuple[MultimodalTransformer, bool]:
    """A LoRA run's base (``init_from``) with the run's adapter weights in peft's layers and the run's processor,
    and whether the run grew the base's token table."""
    from peft.functional import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from mmformer.io.auto import from_pretrained
    from mmformer.io.training_checkpoints import CHECKPOINT_PREFIX, checkpoint_processor

    base_path = record.get("init_from")
    if base_path is None:
        raise ValueError(f"{path}: a LoRA run's checkpoint must record init_from (the base the adapter belongs to)")
    base = from_pretrained(base_path)
    vocab = record.get("model_config", {}).get("text", {}).get("vocab_size")
    grown = isinstance(vocab, int) and vocab > base.config.text.vocab_size
    if grown:
        resize_token_embeddings(base, vocab)
    settings = LoraSettings(**{**record["lora"], "quantize": None})  # the adapter's shapes do not depend on it
    add_lora(base, settings)
    state = checkpoint.get("state_dict", {})
    model_state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    set_peft_model_state_dict(base, get_peft_model_state_dict(base, state_dict=model_state))
    base.processor = checkpoint_processor(checkpoint, Path(path), base.config) or base.processor
    return base, grown


def _export_prompt(
    checkpoint: dict[str, Any], record: dict[str, Any], path: str, out: str, *, merge: bool, overwrite: bool
) -> str:
    """A prompt run's prompt file (``out``, or ``out/`` :data:`~mmformer.adapt.prompts.PROMPT_FILE` for a folder,
    which ``--prompt`` and ``prompt.path`` accept as it is)."""
    kind = record["prompt"]["kind"]
    if merge:  # nothing to merge into weights: a prompt is extra inputs
        raise ValueError(f"merge: only a LoRA run's adapter merges into its base; {path} is a {kind} prompt run, "
                         "whose export is its prompt file (leave out --merge)")  # fmt: skip
    vectors = checkpoint.get("state_dict", {}).get("prompt.vectors")
    if vectors is None:
        raise ValueError(f"{path}: records a {kind} prompt but holds no prompt.vectors")
    prompt = KINDS[kind](*vectors.shape, init=vectors.float())
    target = Path(out) / PROMPT_FILE if Path(out).is_dir() or not out.endswith(".safetensors") else out
    if Path(target).exists() and not overwrite:
        raise FileExistsError(f"out: {target} exists (pass --overwrite)")
    prompt.save(target)
    return str(target)
