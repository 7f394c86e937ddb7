"""Knowledge distillation from a frozen teacher: the student learns the teacher's softened outputs next to the labels.

:class:`Distiller` holds the teacher (loaded through :func:`mmformer.from_pretrained`, so any source the loader
accepts works) and turns one batch into distillation loss parts, given what the student computed for it:

- ``distill_caption`` / ``distill_speech``: Hinton et al.'s KL between the temperature-softened token distributions
  of the teacher's and the student's decoder, scaled by T² (:func:`~mmformer.tasks.losses.distill_kl`);
- ``distill_contrastive_image`` / ``distill_contrastive_audio``: the same on the contrastive logits, the student's
  media–text similarity rows and columns against the teacher's
  (:func:`~mmformer.tasks.losses.contrastive_distill`);
- ``distill_feature_{image,audio,text}`` (only with a feature weight > 0): mean squared error between the student's
  pooled embeddings, through a learned linear projection where the joint embedding sizes differ, and the teacher's.

Each KL term is mixed with its label loss as Hinton et al.'s weighted average, ``(1 − α) · labels + α · teacher``
with α = ``distill.weight`` (:func:`part_weights`), so the balance between the task's terms stays as configured.

Usage: ``mmformer fit --config configs/digits.yaml --model.distill.teacher data/digits_model --data.tokenizer
data/digits_model/tokenizer.json --model.distill.temperature 1`` (the student must read the teacher's token ids); the
options are :class:`~mmformer.tasks.settings.DistillSettings`.

The teacher may have any width or depth; it must read the same token ids (the same vocabulary and special ids) and
the same inputs (image channels, audio sample rate). It runs in eval mode under ``torch.no_grad`` in the student's
step, and it is not a registered submodule: it never appears in the task's ``state_dict`` (so never in a
checkpoint), in the optimizer, in DDP's gradient buckets or in ``task.train()``. The projections are task
parameters (saved under ``distiller.``), not model parameters, so an exported student carries none of them.

Shape legend: B batch, T decoder positions, V vocabulary, E embedding size (the student's and the teacher's may
differ).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.config import MODALITIES, ModelConfig
from mmformer.model import MultimodalTransformer
from mmformer.tasks.losses import IGNORE_INDEX, contrastive_distill, distill_kl, teacher_forcing
from mmformer.tasks.settings import DistillSettings

DECODER_TASKS = {"image": "caption", "audio": "speech"}
MEDIA_KEYS = {"image": "pixel_values", "audio": "audio"}
FEATURE_FIELDS = ("n_mels", "n_fft", "hop_length", "sample_rate")  # what log-mel features depend on


def part_weights(weights: dict[str, float], settings: DistillSettings) -> dict[str, float]:
    """The task's loss weights with distillation: each distilled term becomes Hinton et al.'s weighted average
    ``(1 − α) · labels + α · teacher`` (α = ``settings.weight``) at the weight the task gave it, so that the balance
    between terms (and the ones not distilled, such as CTC) stays as configured; feature distillation is added with
    its own weight. A teacher for a run that trains none of those terms (only ``lm`` / ``mlm``, which it does not
    distil) is a ValueError: it was silently ignored."""
    distilled = [*DECODER_TASKS.values(), *(f"contrastive_{m}" for m in MEDIA_KEYS)]
    if not any(weights.get(part, 0.0) > 0 for part in distilled) and not settings.feature_weight:
        trained = sorted(k for k, v in weights.items() if v > 0 and not k.startswith("prompt_"))
        raise ValueError(
            "distill.teacher: distillation covers the contrastive, caption and speech objectives (and features with "
            f"distill.feature_weight); this run trains {trained}, which it does not distil (objectives.lm / mlm)"
        )
    out = dict(weights)
    for part in distilled:
        out[part] = weights[part] * (1.0 - settings.weight)
        out[f"distill_{part}"] = weights[part] * settings.weight
    out.update({f"distill_feature_{m}": float(settings.feature_weight) for m in MODALITIES})
    return out


def check_teacher(teacher: ModelConfig, student: ModelConfig) -> None:
    """Raise ValueError unless the teacher reads the student's token ids and inputs."""
    t, s = teacher.text, student.text
    if t.vocab_size != s.vocab_size:
        raise ValueError(
            f"teacher: its vocabulary has {t.vocab_size} tokens, the student's {s.vocab_size}; distillation compares "
            "token distributions, so both must use the same tokenizer (give the student the teacher's, e.g. "
            "data.tokenizer: TEACHER_DIR/tokenizer.json)"
        )
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(t, name) != getattr(s, name):
            raise ValueError(
                f"teacher: its text.{name} is {getattr(t, name)}, the student's {getattr(s, name)}; both must use "
                "the same tokenizer"
            )
    both = [m for m in ("image", "audio") if m in teacher.routes and m in student.routes]
    if "image" in both and teacher.image.channels != student.image.channels:
        raise ValueError(
            f"teacher: it reads {teacher.image.channels}-channel images, the student {student.image.channels}"
        )
    if "audio" in both and teacher.audio.sample_rate != student.audio.sample_rate:
        raise ValueError(
            f"teacher: it hears audio at {teacher.audio.sample_rate} Hz, the student at {student.audio.sample_rate} Hz"
        )


class Distiller(nn.Module):
    """A frozen teacher and the distillation losses of a student's batch.

    Args:
        settings: the teacher (a path or name :func:`mmformer.from_pretrained` accepts, or a loaded
            :class:`~mmformer.MultimodalTransformer`), the temperature T of the softened distributions, and the
            feature weight (> 0 adds the feature-distillation parts and their projections).
        student: the student's model config (checked against the teacher's).
    """

    def __init__(self, settings: DistillSettings, student: ModelConfig):
        super().__init__()
        teacher = settings.teacher
        if isinstance(teacher, (str, os.PathLike)):
            from mmformer.io.auto import from_pretrained

            teacher = from_pretrained(teacher)
        if not isinstance(teacher, MultimodalTransformer):
            raise TypeError(
                f"distill.teacher: expected a path to a pretrained model or a MultimodalTransformer, got "
                f"{type(teacher).__name__}"
            )
        check_teacher(teacher.config, student)
        lacking = [r for r in ("text", "decoder") if r in student.routes and r not in teacher.config.routes]
        if lacking:
            warnings.warn(
                f"teacher: it has no {' or '.join(lacking)} route, so the student learns those parts from the labels "
                "only",
                stacklevel=2,
            )
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)  # a tuple, so that it is no submodule: not saved, not optimised, not trained
        self.temperature = float(settings.temperature)
        self.student_audio = student.audio
        self.projections = nn.ModuleDict()
        if settings.feature_weight > 0:
            for modality in MODALITIES:
                if modality in student.routes and modality in teacher.config.routes:
                    s_dim = student.embed_dim or student.width(modality)
                    t_dim = teacher.config.embed_dim or teacher.config.width(modality)
                    self.projections[modality] = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim)

    @property
    def teacher(self) -> MultimodalTransformer:
        return self._teacher[0]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ValueError when the student's tokenizer is not the teacher's (same size, other tokens)."""
        theirs = getattr(getattr(self.teacher, "processor", None), "tokenizer", None)
        if tokenizer is None or theirs is None:
            return
        if tokenizer.backend.get_vocab() != theirs.backend.get_vocab():
            raise ValueError(
                "teacher: its tokenizer maps tokens to other ids than the student's (data) tokenizer; distillation "
                "compares token distributions, so give the student the teacher's tokenizer (data.tokenizer: "
                "TEACHER_DIR/tokenizer.json)"
            )

    def _check_features(self, teacher: MultimodalTransformer) -> None:
        """The teacher reads the student's log-mel features only if it computes them the same way."""
        differ = {f: (getattr(teacher.config.audio, f), getattr(self.student_audio, f)) for f in FEATURE_FIELDS}
        differ = {f: v for f, v in differ.items() if v[0] != v[1]}
        if differ:
            raise ValueError(
                "teacher: the batch holds the student's log-mel features (audio_features, from SpecAugment), but the "
                f"teacher computes its features otherwise {differ} (teacher, student); train without SpecAugment or "
                "with a teacher of the same audio front end"
            )

    def _placed(self, device: torch.device) -> MultimodalTransformer:
        teacher = self.teacher
        if teacher.logit_scale.device != device:  # unregistered, so Lightning does not move it with the task
            teacher.to(device)
        return teacher

    def forward(
        self,
        batch: dict[str, Any],
        features: dict[str, torch.Tensor],
        logits: dict[str, torch.Tensor],
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Distillation parts of one batch.

        Args:
            batch: the training batch (``input_ids``, ``attention_mask``, ``pixel_values`` and/or ``audio`` or
                ``audio_features``).
            features: the student's L2-normalised embeddings, {"image"/"audio"/"text": (B, E)} (contrastive).
            logits: the student's teacher-forced decoder logits, {"caption"/"speech": (B, T, V)}.
            logit_scale: the student's exponentiated logit scale.
        """
        if batch.get("text_lengths") is not None:
            raise ValueError(
                "teacher: distillation reads padded batches; this one is packed (data packing), which it does not "
                "support yet: train the student with packing off"
            )
        teacher = self._placed(logit_scale.device)
        routes = teacher.config.routes
        features_in = batch.get("audio_features") is not None  # log-mel from a SpecAugment training loader
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        parts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            t_feats: dict[str, torch.Tensor] = {}
            if "text" in routes and ("text" in features):
                t_feats["text"] = teacher.encode_text(ids, mask)
            for modality, key in MEDIA_KEYS.items():
                task = DECODER_TASKS[modality]
                if modality not in routes or (batch.get(key) is None and not (modality == "audio" and features_in)):
                    continue
                if modality == "image":
                    tokens, token_mask = teacher.encode_image_tokens(batch[key])
                elif features_in:
                    self._check_features(teacher)
                    tokens, token_mask = teacher.encode_audio_tokens(
                        audio_features=batch["audio_features"], feature_lengths=batch.get("feature_lengths")
                    )
                else:
                    tokens, token_mask = teacher.encode_audio_tokens(batch[key], batch.get("audio_lengths"))
                if modality in features:
                    pool = teacher.pool_image(tokens) if modality == "image" else teacher.pool_audio(tokens, token_mask)
                    t_feats[modality] = pool
                if task in logits and "decoder" in routes:
                    dec_ids, dec_mask, targets = teacher_forcing(ids, mask)
                    t_logits = teacher.decode(dec_ids, tokens, token_mask, dec_mask)  # (B, T-1, V)
                    parts[f"distill_{task}"] = distill_kl(
                        logits[task], t_logits, self.temperature, targets != IGNORE_INDEX
                    )
            t_scale = teacher.logit_scale.exp()
        for modality in MEDIA_KEYS:
            if modality in features and modality in t_feats and "text" in t_feats:
                student = (features[modality], features["text"], logit_scale)
                parts[f"distill_contrastive_{modality}"] = contrastive_distill(
                    student, (t_feats[modality], t_feats["text"], t_scale), self.temperature
                )
        for modality, projection in self.projections.items():
            if modality in features and modality in t_feats:
                with torch.autocast(logit_scale.device.type, enabled=False):
                    projected = projection(features[modality].float())
                    parts[f"distill_feature_{modality}"] = F.mse_loss(projected, t_feats[modality].float())
        return parts
