"""The options of :class:`~mmformer.tasks.MultimodalTask`, grouped by concern: one dataclass per group, each field
written once, validated in ``__post_init__`` (errors name the key as a YAML user writes it, ``objectives.ctc``), plain
types only, so that a checkpoint stores each group as a dict and ``torch.load(weights_only=True)`` reads it back.

In a ``mmformer fit`` config they are nested keys under ``model:``::

    model:
      objectives: {contrastive: 1.0, caption: 1.0, speech: 0.0, ctc: 0.3}   # loss weights and loss kinds
      schedule: {warmup_steps: 50, max_steps: null, min_lr_ratio: 0.0}        # warmup + cosine learning rate
      zeroshot: {classes: [zero, one], templates: ["a photo of a {}."]}       # zero-shot evaluation (and CoOp)
      generation: {evaluate: true, max_new_tokens: 16}                        # captions / transcripts at evaluation
      adapt: {init_from: data/digits_model, frozen: [image], lora: {r: 8}}    # start weights, what trains
      distill: {teacher: data/digits_model, temperature: 1.0, weight: 0.5}    # knowledge distillation

The flat keys of earlier releases (``caption_weight``, ``zeroshot_classes``, ``init_from``, ...) keep working:
:data:`RENAMED` maps each to its new place, and :func:`moved` is the one function that reads them (for the task's
constructor, an old checkpoint's hyper-parameters, and the CLI's configuration), with a ``FutureWarning`` naming the
new key.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn

from mmformer.adapt.adapters import LoraSettings
from mmformer.tasks.adapt import PromptSettings, settings
from mmformer.tasks.schedule import WarmupCosine
from mmformer.values import is_int
from mmformer.zeroshot import check_classnames, check_templates

CONTRASTIVE_LOSSES = ("clip", "siglip")
PACKED_ATTENTION = ("none", "document")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return is_int(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: expected one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ObjectiveSettings:
    """The losses the task trains on and their weights (a weight of 0 switches a loss off)."""

    contrastive: float = 1.0  # each contrastive loss (image–text and audio–text)
    caption: float = 1.0  # the captioning cross-entropy (decoder reading image tokens)
    speech: float = 1.0  # the speech-to-text cross-entropy (decoder reading audio tokens)
    ctc: float = 0.0  # CTC over the audio tokens (needs model.ctc_head: true)
    lm: float = 0.0  # next-token loss on text-only batches (needs a decoder route)
    mlm: float = 0.0  # BERT's masked-LM loss on text-only batches (needs model.mlm_head and text.mask_id)
    moe_aux: float = 0.01  # the mixture-of-experts load-balancing loss (1.0 when perfectly balanced)
    contrastive_loss: Literal["clip", "siglip"] = "clip"  # softmax InfoNCE, or SigLIP's sigmoid (logit_bias_init)
    mlm_probability: float = 0.15  # the share of tokens masked for mlm (BERT: 0.15)
    # on packed text blocks: "none" lets attention cross documents (nanoGPT), "document" keeps each to itself
    packed_attention: Literal["none", "document"] = "none"

    WEIGHTS = ("contrastive", "caption", "speech", "ctc", "lm", "mlm", "moe_aux")

    def __post_init__(self) -> None:
        for name in self.WEIGHTS:
            value = getattr(self, name)
            if not _number(value) or not value >= 0:
                raise ValueError(f"objectives.{name}: expected a number >= 0, got {value!r}")
        _choice("objectives.contrastive_loss", self.contrastive_loss, CONTRASTIVE_LOSSES)
        _choice("objectives.packed_attention", self.packed_attention, PACKED_ATTENTION)
        if not _number(self.mlm_probability) or not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"objectives.mlm_probability: expected a number in (0, 1), got {self.mlm_probability!r}")

    def part_weights(self) -> dict[str, float]:
        """The weight of each loss part the task logs (``contrastive`` weighs both media's contrastive parts)."""
        weights = {name: float(getattr(self, name)) for name in self.WEIGHTS if name != "contrastive"}
        return {"contrastive_image": float(self.contrastive), "contrastive_audio": float(self.contrastive), **weights}


@dataclass(frozen=True)
class ScheduleSettings:
    """The learning rate: linear warmup, then cosine decay (:class:`~mmformer.tasks.schedule.WarmupCosine`)."""

    warmup_steps: int = 100  # linear warmup steps
    max_steps: int | None = None  # length of the cosine decay; None: the trainer's optimizer steps (schedule_length)
    min_lr_ratio: float = 0.0  # the rate at the end of the decay, as a fraction of the base rate

    def __post_init__(self) -> None:
        if self.max_steps is not None and (not _count(self.max_steps) or self.max_steps < 1):
            raise ValueError(f"schedule.max_steps: expected an int >= 1 or None, got {self.max_steps!r}")
        try:
            WarmupCosine(self.warmup_steps, self.max_steps or 1, self.min_lr_ratio)
        except (TypeError, ValueError) as e:
            raise ValueError(f"schedule.{e}") from e


@dataclass(frozen=True)
class ZeroShotSettings:
    """Zero-shot classification at evaluation (and the classes a context prompt trains on)."""

    classes: list[str] | None = None  # evaluation samples whose text is one of these are classified zero-shot
    # prompts with {} for the class name; class embeddings average over them, as ZeroShotClassifier builds them
    templates: list[str] = field(default_factory=lambda: ["{}"])
    batch_size: int = 64  # prompts encoded per forward pass when building the class embeddings

    def __post_init__(self) -> None:
        try:
            classes = check_classnames(self.classes) if self.classes else []
        except (TypeError, ValueError) as e:
            raise ValueError(f"zeroshot.{str(e).replace('classnames', 'classes', 1)}") from e
        try:
            templates = check_templates(self.templates)
        except (TypeError, ValueError) as e:
            raise ValueError(f"zeroshot.{e}") from e
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "templates", templates)
        if not _count(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"zeroshot.batch_size: expected an int >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """Text generated by the task itself: captions / transcripts at evaluation (BLEU, CER, WER) and prediction."""

    evaluate: bool = True  # generate during validation and test
    max_new_tokens: int = 16  # tokens generated per sample at evaluation and prediction

    def __post_init__(self) -> None:
        if not isinstance(self.evaluate, bool):
            raise ValueError(f"generation.evaluate: expected true or false, got {self.evaluate!r}")
        if not _count(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")


@dataclass(frozen=True)
class AdaptSettings:
    """Where the weights start and what trains (see :mod:`mmformer.tasks.adapt`)."""

    init_from: str | None = None  # anything mmformer.from_pretrained reads; its config and processor come along
    init_strict: bool = True  # refuse missing / unexpected keys of init_from (False: initialise missing ones)
    resize_vocab: bool = False  # grow init_from's token table to a larger tokenizer (new rows start at zero)
    trainable: list[str] | None = None  # parameter-name patterns or route groups that train (alone: the rest freezes)
    frozen: list[str] | None = None  # parameter-name patterns or route groups that do not train
    lora: LoraSettings | None = None  # a LoRA / DoRA / QLoRA adapter (peft) on the frozen base
    prompt: PromptSettings | None = None  # a soft prompt (CoOp context, decoder prefix) on the frozen model

    def __post_init__(self) -> None:
        if self.init_from is not None and not isinstance(self.init_from, (str, os.PathLike)):
            raise ValueError(f"adapt.init_from: expected a path or a model name, got {self.init_from!r}")
        for name in ("init_strict", "resize_vocab"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"adapt.{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("trainable", "frozen"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not isinstance(value, (list, tuple))):
                raise ValueError(f"adapt.{name}: expected a list of patterns or route groups, got {value!r}")
        object.__setattr__(self, "lora", settings(self.lora, LoraSettings, "adapt.lora"))
        object.__setattr__(self, "prompt", settings(self.prompt, PromptSettings, "adapt.prompt"))
        if self.lora is not None and self.prompt is not None:
            raise ValueError("adapt.lora and adapt.prompt: train one kind of adapter at a time")


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation from a frozen teacher (see :mod:`mmformer.tasks.distill`); off without a teacher."""

    # a path or name mmformer.from_pretrained accepts (from Python, a loaded MultimodalTransformer too); it must
    # share the student's tokenizer, and is never saved with the student
    teacher: str | None = None
    # T of the softened distributions. 1 by default: with a vocabulary of hundreds of tokens a confident teacher's
    # T = 2 distribution spreads most of its mass over tokens that never occur (digits teacher: entropy 0.11 nats at
    # T = 1, 2.3 at T = 2)
    temperature: float = 1.0
    # α, the teacher's share of each distilled term: (1 − α) · label loss + α · T²-scaled KL, at the term's weight
    weight: float = 0.5
    feature_weight: float = 0.0  # weight of the embedding (feature) distillation; 0 switches it off

    def __post_init__(self) -> None:
        if self.teacher is not None and not isinstance(self.teacher, (str, os.PathLike, nn.Module)):
            raise ValueError(f"distill.teacher: expected a path or name of a pretrained model, got {self.teacher!r}")
        if not _number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"distill.temperature: expected a number > 0, got {self.temperature!r}")
        if not _number(self.weight) or not 0 <= self.weight <= 1:
            raise ValueError(f"distill.weight: expected a number in [0, 1] (the teacher's share), got {self.weight!r}")
        if not _number(self.feature_weight) or not self.feature_weight >= 0:
            raise ValueError(f"distill.feature_weight: expected a number >= 0, got {self.feature_weight!r}")


GROUPS: dict[str, type] = {
    "objectives": ObjectiveSettings,
    "schedule": ScheduleSettings,
    "zeroshot": ZeroShotSettings,
    "generation": GenerationSettings,
    "adapt": AdaptSettings,
    "distill": DistillSettings,
}

# the flat keys of earlier releases → (group, field)
RENAMED: dict[str, tuple[str, str]] = {
    **{f"{name}_weight": ("objectives", name) for name in ObjectiveSettings.WEIGHTS},
    "contrastive_loss": ("objectives", "contrastive_loss"),
    "mlm_probability": ("objectives", "mlm_probability"),
    "packed_attention": ("objectives", "packed_attention"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "max_steps": ("schedule", "max_steps"),
    "min_lr_ratio": ("schedule", "min_lr_ratio"),
    "zeroshot_classes": ("zeroshot", "classes"),
    "zeroshot_templates": ("zeroshot", "templates"),
    "zeroshot_batch_size": ("zeroshot", "batch_size"),
    "val_generate": ("generation", "evaluate"),
    "generate_max_new_tokens": ("generation", "max_new_tokens"),
    **{name: ("adapt", name) for name in ("init_from", "init_strict", "resize_vocab", "trainable", "frozen")},
    "lora": ("adapt", "lora"),
    "prompt": ("adapt", "prompt"),
    "teacher": ("distill", "teacher"),
    "distill_temperature": ("distill", "temperature"),
    "distill_weight": ("distill", "weight"),
    "distill_feature_weight": ("distill", "feature_weight"),
}


def moved(old: Mapping[str, Any], *, where: str = "MultimodalTask", stacklevel: int = 3) -> dict[str, dict[str, Any]]:
    """The flat keys of earlier releases as ``{group: {field: value}}``, with one ``FutureWarning`` that names each
    key's new place. Raises TypeError for a key that never was an option (naming it)."""
    unknown = sorted(set(old) - set(RENAMED))
    if unknown:
        raise TypeError(
            f"{where}: unexpected options {unknown}; expected the option groups {list(GROUPS)}, the task's other "
            f"arguments (model, optimizer, qat, nonfinite, compile, vocab_size), or an old flat key {sorted(RENAMED)}"
        )
    out: dict[str, dict[str, Any]] = {}
    for key, value in old.items():
        group, name = RENAMED[key]
        out.setdefault(group, {})[name] = value
    if old:
        renames = ", ".join(f"{key} → {'.'.join(RENAMED[key])}" for key in old)
        warnings.warn(
            f"{where}: deprecated flat options, now grouped: {renames} (in YAML under model:, e.g. "
            f"model.{'.'.join(RENAMED[next(iter(old))])}); the old keys still work for now",
            FutureWarning,
            stacklevel=stacklevel,
        )
    return out


def build(name: str, value: Any, updates: Mapping[str, Any] | None = None) -> Any:
    """Group ``name`` from its dataclass, its dict (YAML, a checkpoint) or None (the defaults), with ``updates``
    (old flat keys) applied on top."""
    cls = GROUPS[name]
    value = cls() if value is None else settings(value, cls, name)
    return dataclasses.replace(value, **updates) if updates else value


def to_dict(value: Any) -> dict[str, Any]:
    """A group as plain types for a checkpoint's hyper-parameters; a distillation teacher is not stored (it is not
    the student's, and a loaded one is not plain)."""
    out = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if f.name == "teacher":
            continue
        out[f.name] = item.to_dict() if hasattr(item, "to_dict") else item
    return out
