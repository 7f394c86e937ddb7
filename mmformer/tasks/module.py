"""``MultimodalTask``: the LightningModule that trains a :class:`~mmformer.MultimodalTransformer`.

Every batch (see :class:`mmformer.data.Collator`) carries text ``input_ids`` + ``attention_mask`` and images
``pixel_values`` and/or audio ``audio`` + ``audio_lengths`` (or log-mel ``audio_features`` + ``feature_lengths``,
from a training loader with SpecAugment: see :mod:`mmformer.data.augment`). One shared
:meth:`MultimodalTask._step` computes, for whatever the batch holds:

- ``contrastive_image`` / ``contrastive_audio``: CLIP (or SigLIP) loss between the pooled media and the text;
- ``caption`` / ``speech``: teacher-forced cross-entropy of the text decoder reading the image / audio tokens;
- ``ctc``: CTC of the optional CTC head over the audio tokens;
- ``moe_aux``: the mixture-of-experts load-balancing loss, averaged over every MoE layer call of the step;
- ``distill_*``: with a ``distill.teacher``, knowledge distillation from it (see :mod:`mmformer.tasks.distill`);
- ``lm`` / ``mlm``: on text-only batches (no image or audio), next-token cross-entropy of a decoder-only model and
  BERT's masked-LM loss (:mod:`mmformer.tasks.text_objectives`), with perplexity and masked-token accuracy;

and trains on their sum, weighted by ``objectives`` (:class:`~mmformer.tasks.settings.ObjectiveSettings`). Each
image or audio batch runs through its encoder once: the same token states feed the contrastive pooling and the
decoder's cross-attention.

Distributed training (DDP): the contrastive losses gather features from every rank with gradients, so their value
and DDP's averaged gradients equal one process on the global batch (see :mod:`mmformer.tasks.losses`). The
cross-entropy, CTC and MoE terms are per-rank means that DDP averages: exact when ranks hold equally many target
tokens, a token-weighting difference otherwise. A batch that leaves parts of the model unused (an image-only batch
and the audio encoder, a CLIP loss and ``logit_bias``, MoE experts no token chose) needs
``strategy: ddp_find_unused_parameters_true``. Non-finite checks cost one host sync per step (two without a
GradScaler) and are decided jointly by all ranks.

Shape legend: B batch, T text tokens, Np image tokens, N audio tokens, E embedding size, C zero-shot classes.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import nn

from mmformer.config import ModelConfig
from mmformer.data.loaders import resume_cut_epoch
from mmformer.io.weights import listed, same_shape
from mmformer.layers.documents import Documents
from mmformer.tasks import adapt as task_adapt
from mmformer.tasks import parallel, settings
from mmformer.tasks.distill import Distiller, part_weights
from mmformer.tasks.evaluation import STAGES, Evaluation
from mmformer.tasks.losses import (
    IGNORE_INDEX,
    MAX_LOGIT_SCALE,
    ContrastiveLoss,
    SigLipLoss,
    caption_loss,
    check_decoder_objectives,
    check_teacher_forcing,
    ctc_loss,
    cut_to_positions,
    document_targets,
    teacher_forcing,
)
from mmformer.tasks.nonfinite import NonFiniteGuard
from mmformer.tasks.schedule import counts_updates, resume_curves, schedule_length, take_saved_curves, warmup_cosine
from mmformer.tasks.settings import (
    AdaptSettings,
    DistillSettings,
    GenerationSettings,
    ObjectiveSettings,
    ScheduleSettings,
    ZeroShotSettings,
)
from mmformer.tasks.text_objectives import TextObjectives
from mmformer.tasks.vocabulary import check_vocabulary


def adamw(params: Iterable) -> torch.optim.Optimizer:
    """The default optimizer: AdamW, lr 1e-3, weight decay 0.05, betas (0.9, 0.98); the fused kernel where the
    device supports it, else the multi-tensor (foreach) one."""
    params = list(params)
    kwargs = {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.98)}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused=True is refused at construction on unsupported devices/dtypes
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Parameters kept out of weight decay: vectors (norm gains, biases, class token, logit scale and bias) and
    position tables."""
    return param.ndim < 2 or ".positions" in name or name.startswith("positions")


class MultimodalTask(L.LightningModule):
    """Contrastive learning, captioning and speech-to-text on one model, as a LightningModule.

    The options come in groups (:mod:`mmformer.tasks.settings`), each a dataclass or its dict (YAML, a checkpoint's
    hyper-parameters); the flat keys of earlier releases (``caption_weight=``, ``zeroshot_classes=``, ...) are still
    accepted as keyword arguments, with a ``FutureWarning`` naming the new key.

    Args:
        model: the model configuration (``MultimodalTransformer(model)`` is built here); a dict is accepted too.
            With ``adapt.init_from`` it may be left out: the checkpoint's own config is used.
        objectives: the losses and their weights: :class:`~mmformer.tasks.settings.ObjectiveSettings`.
        schedule: warmup and cosine decay of the learning rate: :class:`~mmformer.tasks.settings.ScheduleSettings`.
        optimizer: builds the optimizer from parameter groups; weight decay applies only to matrices (see
            :func:`no_weight_decay`). Default :func:`adamw`.
        zeroshot: zero-shot classification at evaluation: :class:`~mmformer.tasks.settings.ZeroShotSettings`.
        generation: captions / transcripts at evaluation and prediction:
            :class:`~mmformer.tasks.settings.GenerationSettings`.
        adapt: the weights to start from, what trains, a LoRA adapter or a soft prompt:
            :class:`~mmformer.tasks.settings.AdaptSettings` (see :mod:`mmformer.tasks.adapt`).
        distill: knowledge distillation from a frozen teacher: :class:`~mmformer.tasks.settings.DistillSettings`.
        qat: quantization-aware training, e.g. ``{method: dynamic}`` (or ``int8-weight``, ``int4-weight`` with
            ``group_size``): torchao fake-quantizes the linear layers while training and the model is converted to
            that quantization when fit ends (see :mod:`mmformer.compress.quantization`).
        nonfinite: a NaN/Inf loss or gradient ``skip`` s the step with a warning or ``stop`` s training with
            :class:`NonFiniteLossError`; weights are never updated with non-finite values either way.
        compile: ``torch.compile`` every transformer block (in place, so checkpoints keep their keys).
        vocab_size: the tokenizer's vocabulary size (the CLI links it from the data module); it sets
            ``model.text.vocab_size`` of a fresh model and must fit ``adapt.init_from``'s token table.
        **renamed: the flat options of earlier releases (:data:`mmformer.tasks.settings.RENAMED`).
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        objectives: ObjectiveSettings = ObjectiveSettings(),
        schedule: ScheduleSettings = ScheduleSettings(),
        optimizer: OptimizerCallable = adamw,
        zeroshot: ZeroShotSettings = ZeroShotSettings(),
        generation: GenerationSettings = GenerationSettings(),
        adapt: AdaptSettings = AdaptSettings(),
        distill: DistillSettings = DistillSettings(),
        qat: dict[str, Any] | None = None,
        nonfinite: Literal["skip", "stop"] = "stop",
        compile: bool = False,
        vocab_size: int | None = None,
        **renamed: Any,
    ):
        super().__init__()
        old = settings.moved(renamed)
        given = {"objectives": objectives, "schedule": schedule, "zeroshot": zeroshot, "generation": generation,
                 "adapt": adapt, "distill": distill}  # fmt: skip
        groups = {name: settings.build(name, value, old.get(name)) for name, value in given.items()}
        self.objectives: ObjectiveSettings = groups["objectives"]
        self.schedule: ScheduleSettings = groups["schedule"]
        self.zeroshot: ZeroShotSettings = groups["zeroshot"]
        self.generation: GenerationSettings = groups["generation"]
        adapting: AdaptSettings = groups["adapt"]
        distilling: DistillSettings = groups["distill"]
        if isinstance(model, dict):
            model = ModelConfig.from_dict(model)
        if not isinstance(model, ModelConfig) and not (model is None and adapting.init_from is not None):
            raise TypeError(f"model: expected a mmformer.ModelConfig (or its dict), got {type(model).__name__}")
        guard = NonFiniteGuard(nonfinite)  # checks the policy before the model is built
        self.model = task_adapt.initial_model(
            model,
            init_from=adapting.init_from,
            strict=adapting.init_strict,
            vocab_size=vocab_size,
            resize_vocab=adapting.resize_vocab,
        )
        model = self.model.config
        if self.objectives.ctc > 0 and not model.ctc_head:
            raise ValueError(f"objectives.ctc={self.objectives.ctc} needs a CTC head: set model.ctc_head: true")
        if self.objectives.caption > 0 or self.objectives.speech > 0:
            check_teacher_forcing(model)
            check_decoder_objectives(model, self.objectives)

        # Only plain types go into the checkpoint (torch.load(weights_only=True)): the model config as a dict under
        # "model" (so load_from_checkpoint rebuilds it), each group as a dict; a Python optimizer callable is not
        # stored, nor is the teacher (not the student's: a checkpoint neither stores it nor needs it to load).
        hparams = {"model": model.to_dict(), **{name: settings.to_dict(value) for name, value in groups.items()},
                   "optimizer": optimizer, "qat": qat, "nonfinite": nonfinite, "compile": compile,
                   "vocab_size": vocab_size}  # fmt: skip
        if isinstance(optimizer, (dict, str)):  # LightningCLI's plain config of it (an older checkpoint's hparams)
            optimizer = _optimizer_from_config(optimizer)
        else:
            hparams.pop("optimizer")
        self.save_hyperparameters(hparams)

        self.init_from = adapting.init_from
        self.prompt = task_adapt.prepare(
            self.model, lora=adapting.lora, prompt=adapting.prompt, trainable=adapting.trainable, frozen=adapting.frozen
        )
        routes = model.routes
        self.weights = self.objectives.part_weights()
        # a context prompt's classification loss (the only one while it trains)
        self.weights.update(prompt_image=1.0, prompt_audio=1.0)
        self.text_objectives = TextObjectives(
            self.objectives.lm > 0,
            self.objectives.mlm > 0,
            self.objectives.mlm_probability,
            self.objectives.packed_attention,
        )
        self.text_objectives.check(self.model, self.prompt)
        self._text_batches: int | None = 0  # text-only training batches seen; None once their absence was told
        self.distiller = None
        if distilling.teacher is not None:
            self.distiller = Distiller(distilling, model)
            self.weights = part_weights(self.weights, distilling)
        if "text" not in routes and self.objectives.contrastive > 0:
            rank_zero_warn(
                f"objectives.contrastive={self.objectives.contrastive} is unused: the model has no text route"
            )
        if "decoder" not in routes and (self.objectives.caption > 0 or self.objectives.speech > 0):
            rank_zero_warn("objectives.caption and objectives.speech are unused: the model has no decoder route")
        if self.objectives.contrastive_loss == "siglip" and self.model.logit_bias is None:
            rank_zero_warn(
                "objectives.contrastive_loss='siglip' without a logit bias; SigLIP starts it at -10 "
                "(model.logit_bias_init)"
            )
        self.contrastive = ContrastiveLoss() if self.objectives.contrastive_loss == "clip" else SigLipLoss()
        self.optimizer = optimizer
        self.nonfinite = guard
        self.tokenizer = None  # set it to evaluate/predict text without a data module that has one

        # captions / transcripts are generated and scored for the objectives this run trains: a contrastive-only run
        # (caption and speech weights 0) decoded every validation batch into CERs of an untrained decoder
        decoded = tuple(g for g in ("caption", "speech") if getattr(self.objectives, g) > 0)
        self.evaluation = Evaluation(model, self.zeroshot, self.generation, decoded, self.weights)
        self.qat = None
        if qat is not None:
            from mmformer.compress.quantization import QATOptions, prepare_qat

            if adapting.lora is not None or adapting.prompt is not None:
                raise ValueError(
                    "qat: quantization-aware training of a LoRA adapter or a prompt is not supported; train the "
                    "adapter, merge it (mmformer merge), then quantize or fine-tune with qat"
                )
            self.qat = QATOptions.build(qat)
            prepare_qat(self.model, self.qat)
        if compile:
            for stack in self.model.stacks.values():
                for block in stack.blocks:
                    block.compile()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> MultimodalTask:
        """Lightning's loader, rebuilding the task with its own constructor, which reads both layouts of the
        hyper-parameters: the option groups, and the flat keys of checkpoints written before them (whose recorded
        CLI instantiator, a parser of the current signature, would refuse those keys)."""
        kwargs.setdefault("_instantiator", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_model(self) -> None:
        """Under ``--trainer.strategy fsdp``: FSDP2 over the model, one unit per block (see
        :mod:`mmformer.tasks.parallel`)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, parallel.FSDP2Strategy):
            parallel.shard(self.model, self.device_mesh["data_parallel"], strategy)

    # ------------------------------------------------------------------ losses
    def _has(self, route: str) -> bool:
        return route in self.model.config.routes

    def _losses(
        self, batch: dict[str, Any], stage: str = "train", n_targets: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Loss parts and contrastive features ({"image"/"audio"/"text": (B, E)}) of one batch; ``n_targets``, if
        given, receives the number of target tokens each captioning / speech part averages over."""
        m = self.model
        if isinstance(self.prompt, task_adapt.ContextPrompt):
            dataset = getattr(getattr(self._trainer, "datamodule", None), "datasets", {}).get("train")
            return task_adapt.context_prompt_losses(
                m, self.prompt, self._find_tokenizer(), self.zeroshot.classes, batch, getattr(dataset, "classes", None)
            )
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        # audio arrives as waveforms, or as log-mel features the training loader computed (SpecAugment)
        media = [k for k in ("pixel_values", "audio", "audio_features") if batch.get(k) is not None]
        if ids is not None and not media and (self.text_objectives.lm or self.text_objectives.mlm):
            if stage == "train" and self._text_batches is not None:
                self._text_batches += 1
            return self._text_losses(batch, stage), {}
        if ids is None or not media:
            raise ValueError(
                "batch: expected input_ids + attention_mask and at least one of pixel_values, audio, audio_features; "
                f"got keys {sorted(batch)}"
            )
        for key, route in (("pixel_values", "image"), ("audio", "audio"), ("audio_features", "audio")):
            if key in media and not self._has(route):
                raise ValueError(
                    f"batch: has {key} but the model has no {route} route (routes {sorted(m.config.routes)})"
                )
        parts: dict[str, torch.Tensor] = {}
        feats: dict[str, torch.Tensor] = {}
        logits_of: dict[str, torch.Tensor] = {}  # decoder logits by task, for distillation
        contrastive = self.weights["contrastive_image"] > 0 and self._has("text")
        decoder = self._has("decoder")
        docs = self._documents(batch)  # a packed batch: ids (1, N) of these documents, audio packed likewise
        m.pop_aux_loss()  # drop what earlier forwards left (e.g. gradient checkpointing recomputing in backward)
        if contrastive:
            feats["text"] = m.encode_text(ids, mask, documents=docs)
        scale = m.logit_scale.exp()
        audio_key = "audio_features" if "audio_features" in media else "audio"
        for modality, key, task in (("image", "pixel_values", "caption"), ("audio", audio_key, "speech")):
            if key not in media:
                continue
            memory_docs = None
            if modality == "image":
                tokens, token_mask = m.encode_image_tokens(batch[key])  # (B, Np, D), None
            else:  # waveforms, or log-mel features computed (and augmented) in the loader
                audio = (
                    dict(audio_features=batch[key], feature_lengths=batch.get("feature_lengths"))
                    if key == "audio_features"
                    else dict(audio=batch[key], audio_lengths=batch.get("audio_lengths"))
                )
                if docs is not None:
                    tokens, memory_docs = m.encode_audio_documents(**audio)  # (1, M, D), padding-free
                    token_mask = None
                else:
                    tokens, token_mask = m.encode_audio_tokens(**audio)  # (B, N, D)
            # per-sample rows for pooling and CTC: a packed memory is regrouped (B, N, D) with its mask
            rows, row_mask = (
                (tokens, token_mask) if memory_docs is None else (memory_docs.pad(tokens), memory_docs.mask)
            )
            if contrastive:
                pool = m.pool_image(tokens) if modality == "image" else m.pool_audio(rows, row_mask)
                feats[modality] = pool
                parts[f"contrastive_{modality}"] = self.contrastive(pool, feats["text"], scale, m.logit_bias)
            if decoder and self.weights[task] > 0:
                prefix = task_adapt.prefix_embeds(self.prompt)  # a learned decoder prefix, if one trains
                if docs is not None:  # teacher forcing without padding: the targets mark each document's end
                    logits = m.decode(
                        ids, tokens, token_mask, prefix_embeds=prefix, documents=docs, memory_documents=memory_docs
                    )
                    targets = document_targets(ids, docs)
                    parts[task] = caption_loss(logits, targets)  # (1, N, V)
                else:
                    dec_ids, dec_mask = ids, mask
                    if prefix is not None:  # its vectors take the first text positions
                        text = m.config.text
                        dec_ids, dec_mask = cut_to_positions(ids, mask, text.max_tokens - prefix.shape[-2], text.eos_id)
                    dec_ids, dec_mask, targets = teacher_forcing(dec_ids, dec_mask)
                    logits = m.decode(dec_ids, tokens, token_mask, dec_mask, prefix_embeds=prefix)  # (B, T-1, V)
                    parts[task] = caption_loss(logits, targets)
                    logits_of[task] = logits
                if n_targets is not None:
                    n_targets[task] = (targets != IGNORE_INDEX).sum()
            if modality == "audio" and self.weights["ctc"] > 0:
                text = m.config.text
                text_ids, text_mask = (ids, mask) if docs is None else (docs.pad(ids, fill=text.pad_id), docs.mask)
                parts["ctc"] = ctc_loss(
                    m.ctc_head(rows),
                    row_mask,
                    text_ids,
                    text_mask,
                    blank=text.pad_id,
                    special_ids=(text.bos_id, text.eos_id),
                )
        if self.distiller is not None:
            parts.update(self.distiller(batch, feats, logits_of, scale))
        self._add_moe_aux(parts)
        if not parts:
            raise ValueError(
                f"batch: nothing to train on with keys {sorted(batch)} and weights {self.weights} for a model with "
                f"routes {sorted(m.config.routes)}"
            )
        return parts, feats

    def _text_losses(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """The ``lm`` / ``mlm`` parts of a text-only batch (and the MoE term); evaluation updates their metrics."""
        self.model.pop_aux_loss()
        parts = self.text_objectives.losses(self.model, batch, self.metrics[stage] if stage in STAGES else None)
        self._add_moe_aux(parts)
        return parts

    def _add_moe_aux(self, parts: dict[str, torch.Tensor]) -> None:
        """Add the MoE load-balancing term (the mean over every MoE layer call of this step's forward passes) when
        it is weighted."""
        aux = self.model.pop_aux_loss()
        if aux is not None and self.weights["moe_aux"] > 0:
            parts["moe_aux"] = aux

    @staticmethod
    def _documents(batch: dict[str, Any]) -> Documents | None:
        """The documents of a packed batch (``text_lengths``, see :class:`~mmformer.data.Collator`); None if padded."""
        lengths = batch.get("text_lengths")
        return None if lengths is None else Documents(lengths)

    def _step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """Weighted loss of one batch, with every part logged under ``{stage}/``: each training step's, and at
        evaluation the epoch's (:class:`~mmformer.tasks.metrics.LossMeans`, logged when the epoch ends)."""
        n_targets: dict[str, torch.Tensor] = {}
        parts, feats = self._losses(batch, stage, n_targets)
        loss = sum(self.weights[name] * value for name, value in parts.items())
        sizes = (batch.get(k) for k in ("text_lengths", "input_ids", "pixel_values", "audio", "label"))
        batch_size = len(next(v for v in sizes if v is not None))  # packed texts: their lengths; image-only: pixels
        if stage != "train":  # token means weighted by their tokens, the others by samples
            self.metrics[stage].update_losses(parts, {name: n_targets.get(name, batch_size) for name in parts})
            return loss, parts, feats
        log = {"batch_size": batch_size, "on_step": True, "on_epoch": False}
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), **log)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), **log)
        return loss, parts, feats

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts, _ = self._step(batch, "train")
        self.nonfinite.check_loss(self.trainer, loss, parts, batch, batch_idx)
        return loss

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """One schedule step per optimizer step: for a batch the loader yields as None (every sample in it unreadable,
        skipped) no optimizer steps, and Lightning would still step the schedule, so that warmup and decay ran ahead
        of the updates (the scheduler's step count is the trainer's global step, restored with it on resume). A
        subclass's epoch-interval or metric-driven scheduler (``ReduceLROnPlateau``) steps as Lightning steps it."""
        if not counts_updates(scheduler, self.trainer.lr_scheduler_configs):
            super().lr_scheduler_step(scheduler, metric)
        elif scheduler.last_epoch < self.trainer.global_step:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.before_optimizer_step(self.trainer, optimizer, self.parameters())

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, and also for an optimizer that unscales inside its step (a fused AdamW, the default)
        under mixed precision, which Lightning's plugin refuses outright: its gradients are not scaled under bf16
        (no GradScaler), and under fp16 the GradScaler unscales them here, before the clip; the fused step then takes
        them as they are (torch's GradScaler supports ``unscale_`` before a fused step, and still skips it on inf)."""
        plugin = self.trainer.precision_plugin
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not (gradient_clip_val and fused and isinstance(plugin, MixedPrecision)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if plugin.scaler is not None:
            plugin.scaler.unscale_(optimizer)
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        Precision().clip_gradients(optimizer, gradient_clip_val, algorithm)  # the plain clip, of unscaled gradients

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model.logit_scale.requires_grad:  # a frozen one stays bit-identical
            with torch.no_grad():  # as open_clip: keep the temperature where the softmax still trains
                self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def on_train_epoch_end(self) -> None:
        self._warn_text_objectives_unused()

    def on_train_end(self) -> None:
        self._warn_text_objectives_unused()

    def _warn_text_objectives_unused(self) -> None:
        """Warn, once, when ``lm`` / ``mlm`` are weighted but no training batch so far (an epoch, or a run that ended
        first) was text-only: they train on text without image or audio, and on paired data were never used."""
        used = [f"objectives.{n}={getattr(self.objectives, n)}" for n in ("lm", "mlm") if getattr(self.objectives, n)]
        if not used or self._text_batches != 0:
            return
        self._text_batches = None
        rank_zero_warn(
            f"{' and '.join(used)} trained nothing: no training batch was text-only. These objectives train on "
            "batches of text without image or audio (data.format: text, or manifest rows without media); batches "
            "of image / audio with text train the contrastive, caption, speech and ctc objectives instead"
        )

    def on_train_start(self) -> None:
        saved = vars(self).pop("_saved_curves", None)
        if saved is not None:  # resumed: the configured learning-rate curve, at the restored step
            schedulers = self.lr_schedulers()
            resume_curves(schedulers if isinstance(schedulers, list) else [schedulers], saved)

    def setup(self, stage: str) -> None:
        check_vocabulary(self.model.config, self._find_tokenizer(), pretrained=self.init_from is not None)

    def on_fit_start(self) -> None:
        rank_zero_info(f"mmformer: {task_adapt.parameter_report(self)}")
        if self.distiller is not None:
            self.distiller.check_tokenizer(self._find_tokenizer())

    def on_fit_end(self) -> None:
        if self.qat is not None:  # fake quantization → the real thing (checkpoints keep the float weights)
            from mmformer.compress.quantization import convert_qat

            convert_qat(self.model, self.qat)

    def configure_optimizers(self) -> dict[str, Any]:
        # only trainable parameters reach the optimizer: frozen ones get neither updates nor optimizer state
        decay, no_decay = [], []
        for name, param in self.named_parameters():  # the model's, and a prompt's
            name = name.removeprefix("model.")
            if param.requires_grad:
                (no_decay if no_weight_decay(name, param) else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer([g for g in groups if g["params"]])
        total = schedule_length(self.schedule.max_steps, self._trainer)
        scheduler = warmup_cosine(optimizer, self.schedule.warmup_steps, total, self.schedule.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _find_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            tokenizer = getattr(getattr(datamodule, "processor", None), "tokenizer", None)
        if tokenizer is None:  # the processor init_from came with
            tokenizer = getattr(getattr(self.model, "processor", None), "tokenizer", None)
        return tokenizer

    @property
    def metrics(self) -> nn.ModuleDict:
        """The evaluation metrics per stage (``"val"``, ``"test"``)."""
        return self.evaluation.metrics

    def _eval_step(self, batch: dict[str, Any] | None, stage: str) -> torch.Tensor | None:
        """A batch's loss, with the stage's metrics updated; nothing for a batch of only unreadable samples (the
        collator gives None, and the data set warned about each one), as Lightning skips such a training batch."""
        if batch is None:
            return None
        loss, _, feats = self._step(batch, stage)
        self.evaluation.update(self.model, batch, feats, stage, self._find_tokenizer(), self.prompt)
        return loss

    def _start_eval(self) -> None:
        self.evaluation.start(self.model, self._find_tokenizer(), self.prompt)

    def _end_eval(self, stage: str) -> None:
        for name, value in self.evaluation.end(stage, self.device).items():
            self.log(f"{stage}/{name}", value, prog_bar=True, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict[str, Any] | None, batch_idx: int) -> dict[str, Any]:
        """Embeddings, captions / transcripts and the batch's ``source`` / ``text`` (see :meth:`Evaluation.predict`);
        for the text blocks of a language model, each block's text and its score (:meth:`TextObjectives.block_scores`).
        A batch of only unreadable samples (None from the collator, which warned about each) predicts no rows."""
        if batch is None:
            return {"source": []}
        tokenizer = self._find_tokenizer()
        out = self.evaluation.predict(self.model, batch, self._documents(batch), tokenizer, self.prompt)
        if batch.get("document_ids") is not None and self.text_objectives.lm:
            out.update(self.text_objectives.block_scores(self.model, batch, tokenizer))
        return out

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run follows its configured learning-rate curve (see
        :func:`~mmformer.tasks.schedule.take_saved_curves`); it builds the model its checkpoint holds (else one error
        naming the differing tensors), and reads its texts with the tokenizer the checkpoint was trained with: one
        learned again from changed training texts keeps the vocabulary size but not the ids, and the weights would
        read every text as other tokens, silently."""
        self._saved_curves = take_saved_curves(checkpoint)  # the configured schedule applies (on_train_start)
        resume_cut_epoch(checkpoint)  # a run that ended at max_steps mid-epoch continues that epoch
        state, own = checkpoint.get("state_dict") or {}, self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sorted(state.items())
                 if k in own and isinstance(v, torch.Tensor) and not same_shape(own[k].shape, v.shape)]  # fmt: skip
        if wrong:  # Lightning's strict load would end in a traceback listing every tensor
            raise ValueError(
                f"ckpt_path: the checkpoint's weights do not fit the model this configuration builds ({len(wrong)} "
                f"tensors differ in shape, checkpoint vs config: {listed(wrong)}); resume with the model "
                "configuration the run was trained with"
            )
        saved, current = (checkpoint.get("mmformer") or {}).get("tokenizer_json"), self._find_tokenizer()
        if saved is None or current is None:
            return
        if _token_table(saved) != _token_table(_tokenizer_json(current)):
            raise ValueError(
                "tokenizer: the data module's tokenizer maps texts to other ids than the one this checkpoint was "
                "trained with (learned again from training texts that changed since); resume with that one: "
                "`mmformer export --ckpt CKPT --out DIR`, then --data.tokenizer DIR/tokenizer.json"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what ``mmformer export`` needs to write a complete pretrained directory from the checkpoint alone:
        the model config, and the data module's tokenizer (as tokenizer.json text) and preprocessor settings."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        processor = getattr(datamodule, "processor", None)
        tokenizer = self._find_tokenizer()
        checkpoint["mmformer"] = {
            "model_config": self.model.config.to_dict(),
            "tokenizer_json": _tokenizer_json(tokenizer),
            "preprocessor_config": processor.to_dict() if hasattr(processor, "to_dict") else None,
            **task_adapt.checkpoint_record(self),
        }


def _optimizer_from_config(config: str | dict[str, Any]) -> OptimizerCallable:
    """The optimizer callable of a plain config (a function's import path, or ``{class_path, init_args}``), resolved
    as LightningCLI resolves ``model.optimizer``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--optimizer", type=OptimizerCallable)
    try:
        return parser.instantiate(parser.parse_object({"optimizer": config})).optimizer
    except Exception as e:  # jsonargparse reports a bad value as its own ArgumentError
        raise ValueError(f"optimizer: expected an optimizer class path or config, got {config!r} ({e})") from e


def _token_table(tokenizer_json: str | None) -> Any:
    """What gives texts their ids in a tokenizer.json (its model's vocabulary and merges; not the padding and
    truncation settings, which a run may change)."""
    if tokenizer_json is None:
        return None
    model = json.loads(tokenizer_json).get("model") or {}
    return model.get("vocab"), model.get("merges")


def _tokenizer_json(tokenizer: Any) -> str | None:
    """The tokenizer.json that ``Tokenizer.save`` writes (with its padding and truncation settings), as text."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "save"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            tokenizer.save(path)
            return path.read_text(encoding="utf-8")
    backend = getattr(tokenizer, "backend", None)
    return backend.to_str() if hasattr(backend, "to_str") else None
