"""``MultimodalTask``: the LightningModule that trains a :class:`~mmformer.MultimodalTransformer`.

Every batch (see :class:`mmformer.data.Collator`) carries text ``input_ids`` + ``attention_mask`` and images
``pixel_values`` and/or audio ``audio`` + ``audio_lengths`` (or log-mel ``audio_features`` + ``feature_lengths``,
from a training loader with SpecAugment: see :mod:`mmformer.data.augment`). One shared
:meth:`MultimodalTask._step` computes, for whatever the batch holds:

- ``contrastive_image`` / ``contrastive_audio``: CLIP (or SigLIP) loss between the pooled media and the text;
- ``caption`` / ``speech``: teacher-forced cross-entropy of the text decoder reading the image / audio tokens;
- ``ctc``: CTC of the optional CTC head over the audio tokens;
- ``moe_aux``: the mixture-of-experts load-balancing loss, averaged over every MoE layer call of the step;
- ``distill_*``: with a ``teacher``, knowledge distillation from it (see :mod:`mmformer.tasks.distill`);
- ``lm`` / ``mlm``: on text-only batches (no image or audio), next-token cross-entropy of a decoder-only model and
  BERT's masked-LM loss (:mod:`mmformer.tasks.text_objectives`), with perplexity and masked-token accuracy;

and trains on their weighted sum. Each image or audio batch runs through its encoder once: the same token states
feed the contrastive pooling and the decoder's cross-attention.

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

import math
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from mmformer.adapters import LoraSettings
from mmformer.config import ModelConfig
from mmformer.generation import generate
from mmformer.layers.documents import Documents
from mmformer.tasks import adapt, parallel
from mmformer.tasks.distill import Distiller, part_weights
from mmformer.tasks.losses import (
    MAX_LOGIT_SCALE,
    ContrastiveLoss,
    SigLipLoss,
    caption_loss,
    ctc_loss,
    document_targets,
    teacher_forcing,
)
from mmformer.tasks.metrics import TaskMetrics, normalize_text, text_keys
from mmformer.tasks.schedule import WarmupCosine
from mmformer.tasks.text_objectives import TextObjectives
from mmformer.zeroshot import build_class_embeddings, check_templates

STAGES = ("val", "test")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN/Inf loss or gradient and ``nonfinite='stop'`` was configured."""


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

    Args:
        model: the model configuration (``MultimodalTransformer(model)`` is built here); a dict is accepted too.
            With ``init_from`` it may be left out: the checkpoint's own config is used.
        contrastive_weight: weight of each contrastive loss (image–text and audio–text).
        caption_weight: weight of the captioning cross-entropy.
        speech_weight: weight of the speech-to-text cross-entropy.
        ctc_weight: weight of the CTC loss (needs ``model.ctc_head: true``).
        lm_weight: weight of the language-modelling loss on text-only batches (needs a decoder route).
        mlm_weight: weight of the masked-LM loss on text-only batches (needs ``model.mlm_head`` and a ``mask_id``).
        mlm_probability: the share of tokens masked for ``mlm`` (BERT: 0.15).
        packed_attention: on packed text blocks (``data.pack_documents``), ``none`` lets attention cross document
            boundaries (nanoGPT, Hugging Face's ``group_texts``); ``document`` keeps each document to itself, with
            positions restarting per document.
        moe_aux_weight: weight of the mixture-of-experts load-balancing loss (1.0 when perfectly balanced).
        contrastive_loss: ``clip`` (softmax InfoNCE) or ``siglip`` (sigmoid; give the model a ``logit_bias_init``).
        optimizer: builds the optimizer from parameter groups; weight decay applies only to matrices (see
            :func:`no_weight_decay`). Default :func:`adamw`.
        warmup_steps: linear warmup steps of the learning rate.
        max_steps: length of the cosine decay; None uses ``trainer.estimated_stepping_batches``.
        min_lr_ratio: the learning rate at the end of the decay, as a fraction of the base rate.
        zeroshot_classes: class names; evaluation samples whose text is one of them are classified zero-shot.
        zeroshot_templates: prompts with ``{}`` for the class name; class embeddings average over them (the same
            function as :class:`~mmformer.ZeroShotClassifier` builds them).
        zeroshot_batch_size: prompts encoded per forward pass when building the class embeddings.
        val_generate: generate captions / transcripts during validation and test for BLEU / CER / WER.
        generate_max_new_tokens: tokens generated per sample at evaluation and prediction.
        nonfinite: a NaN/Inf loss or gradient ``skip`` s the step with a warning or ``stop`` s training with
            :class:`NonFiniteLossError`; weights are never updated with non-finite values either way.
        compile: ``torch.compile`` every transformer block (in place, so checkpoints keep their keys).
        vocab_size: the tokenizer's vocabulary size (the CLI links it from the data module); it sets
            ``model.text.vocab_size`` of a fresh model and must fit ``init_from``'s token table.
        init_from: start from these weights (anything :func:`mmformer.from_pretrained` reads), loaded before
            training; ``fit --ckpt_path`` resumes on top. See :mod:`mmformer.tasks.adapt` for this and the rest.
        init_strict: refuse missing / unexpected keys of ``init_from`` (False: initialise the missing ones).
        resize_vocab: grow ``init_from``'s token table to a larger tokenizer (new token rows start at zero).
        trainable: parameter-name patterns or route groups that train (alone: everything else is frozen).
        frozen: parameter-name patterns or route groups that do not train.
        lora: train a LoRA adapter (peft) on the frozen base: :class:`~mmformer.adapters.LoraSettings`.
        prompt: train a soft prompt on the frozen model: :class:`~mmformer.tasks.adapt.PromptSettings`.
        teacher: distil from this model (a path or name :func:`mmformer.from_pretrained` accepts, or a loaded
            model): frozen, never saved with the student; it must share the student's tokenizer.
        distill_temperature: T of the teacher's and the student's softened distributions. 1 by default: with a
            vocabulary of hundreds of tokens a confident teacher's T = 2 distribution spreads most of its mass over
            tokens that never occur (on the digits teacher: entropy 0.11 nats at T = 1, 2.3 at T = 2).
        distill_weight: α, the teacher's share of each distilled term (decoder tokens, contrastive logits):
            ``(1 − α) · label loss + α · T²-scaled KL to the teacher``, at the weight the term has without a teacher.
        distill_feature_weight: weight of the embedding (feature) distillation; 0 switches it off.
        qat: quantization-aware training, e.g. ``{method: dynamic}`` (or ``int8-weight``, ``int4-weight`` with
            ``group_size``): torchao fake-quantizes the linear layers while training and the model is converted to
            that quantization when fit ends (see :mod:`mmformer.quantization`).
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        contrastive_weight: float = 1.0,
        caption_weight: float = 1.0,
        speech_weight: float = 1.0,
        ctc_weight: float = 0.0,
        lm_weight: float = 0.0,
        mlm_weight: float = 0.0,
        mlm_probability: float = 0.15,
        packed_attention: Literal["none", "document"] = "none",
        moe_aux_weight: float = 0.01,
        contrastive_loss: Literal["clip", "siglip"] = "clip",
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        zeroshot_classes: list[str] | None = None,
        zeroshot_templates: Sequence[str] = ("{}",),
        zeroshot_batch_size: int = 64,
        val_generate: bool = True,
        generate_max_new_tokens: int = 16,
        nonfinite: Literal["skip", "stop"] = "stop",
        compile: bool = False,
        vocab_size: int | None = None,
        init_from: str | None = None,
        init_strict: bool = True,
        resize_vocab: bool = False,
        trainable: list[str] | None = None,
        frozen: list[str] | None = None,
        lora: LoraSettings | None = None,
        prompt: adapt.PromptSettings | None = None,
        teacher: str | None = None,
        distill_temperature: float = 1.0,
        distill_weight: float = 0.5,
        distill_feature_weight: float = 0.0,
        qat: dict[str, Any] | None = None,
    ):
        super().__init__()
        if isinstance(model, dict):
            model = ModelConfig.from_dict(model)
        if not isinstance(model, ModelConfig) and not (model is None and init_from is not None):
            raise TypeError(f"model: expected a mmformer.ModelConfig (or its dict), got {type(model).__name__}")
        lora = adapt.settings(lora, LoraSettings, "lora")
        prompt = adapt.settings(prompt, adapt.PromptSettings, "prompt")
        weights = {
            "contrastive_weight": contrastive_weight,
            "caption_weight": caption_weight,
            "speech_weight": speech_weight,
            "ctc_weight": ctc_weight,
            "lm_weight": lm_weight,
            "mlm_weight": mlm_weight,
            "moe_aux_weight": moe_aux_weight,
            "distill_weight": distill_weight,
            "distill_feature_weight": distill_feature_weight,
        }
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        for name, value, choices in (
            ("contrastive_loss", contrastive_loss, ("clip", "siglip")),
            ("nonfinite", nonfinite, ("skip", "stop")),
        ):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
        if distill_weight > 1:
            raise ValueError(
                f"distill_weight: expected a number in [0, 1] (the teacher's share), got {distill_weight!r}"
            )
        if generate_max_new_tokens < 1:
            raise ValueError(f"generate_max_new_tokens: expected an int >= 1, got {generate_max_new_tokens!r}")
        try:
            zeroshot_templates = check_templates(list(zeroshot_templates))
        except (TypeError, ValueError) as e:
            raise ValueError(f"zeroshot_templates: {e}") from e
        if isinstance(zeroshot_batch_size, bool) or not isinstance(zeroshot_batch_size, int) or zeroshot_batch_size < 1:
            raise ValueError(f"zeroshot_batch_size: expected an int >= 1, got {zeroshot_batch_size!r}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps: expected an int >= 1 or None, got {max_steps!r}")
        WarmupCosine(warmup_steps, max_steps or 1, min_lr_ratio)  # validates the schedule arguments early
        self.model = adapt.initial_model(
            model, init_from=init_from, strict=init_strict, vocab_size=vocab_size, resize_vocab=resize_vocab
        )
        model = self.model.config
        if ctc_weight > 0 and not model.ctc_head:
            raise ValueError(f"ctc_weight={ctc_weight} needs a CTC head: set model.ctc_head: true")

        # Only plain types go into the checkpoint (torch.load(weights_only=True)): the model config as a dict under
        # "model" (so load_from_checkpoint rebuilds it); a Python optimizer callable is not stored.
        # The teacher is not the student's: a checkpoint neither stores it nor needs it to load.
        self.save_hyperparameters(ignore=["model", "lora", "prompt", "teacher"])
        self.hparams["model"] = model.to_dict()
        self.hparams["zeroshot_templates"] = zeroshot_templates
        self.hparams["lora"] = lora.to_dict() if lora is not None else None
        self.hparams["prompt"] = prompt.to_dict() if prompt is not None else None
        if not isinstance(self.hparams.get("optimizer"), (dict, str, type(None))):
            self.hparams.pop("optimizer")

        self.init_from = init_from
        self.prompt = adapt.prepare(self.model, lora=lora, prompt=prompt, trainable=trainable, frozen=frozen)
        routes = model.routes
        self.weights = {
            "contrastive_image": float(contrastive_weight),
            "contrastive_audio": float(contrastive_weight),
            "caption": float(caption_weight),
            "speech": float(speech_weight),
            "ctc": float(ctc_weight),
            "lm": float(lm_weight),
            "mlm": float(mlm_weight),
            "moe_aux": float(moe_aux_weight),
            "prompt_image": 1.0,  # a context prompt's classification loss (the only one while it trains)
            "prompt_audio": 1.0,
        }
        self.text_objectives = TextObjectives(lm_weight > 0, mlm_weight > 0, mlm_probability, packed_attention)
        self.text_objectives.check(self.model)
        self.distiller = None
        if teacher is not None:
            self.distiller = Distiller(
                teacher, model, temperature=distill_temperature, feature_weight=distill_feature_weight
            )
            self.weights = part_weights(self.weights, distill_weight, distill_feature_weight)
        if "text" not in routes and contrastive_weight > 0:
            rank_zero_warn(f"contrastive_weight={contrastive_weight} is unused: the model has no text route")
        if "decoder" not in routes and (caption_weight > 0 or speech_weight > 0):
            rank_zero_warn("caption_weight and speech_weight are unused: the model has no decoder route")
        if contrastive_loss == "siglip" and self.model.logit_bias is None:
            rank_zero_warn(
                "contrastive_loss='siglip' without a logit bias; SigLIP starts it at -10 (model.logit_bias_init)"
            )
        self.contrastive = ContrastiveLoss() if contrastive_loss == "clip" else SigLipLoss()
        self.optimizer = optimizer
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.zeroshot_classes = list(zeroshot_classes or [])
        self.zeroshot_templates = zeroshot_templates
        self.zeroshot_batch_size = zeroshot_batch_size
        self.val_generate = val_generate
        self.generate_max_new_tokens = generate_max_new_tokens
        self.nonfinite = nonfinite
        self.tokenizer = None  # set it to evaluate/predict text without a data module that has one

        embed_dim = model.embed_dim or model.text_width()
        self.metrics = nn.ModuleDict(
            {s: TaskMetrics(embed_dim, len(self.zeroshot_classes), model.text.vocab_size) for s in STAGES}
        )
        self._class_embeddings: torch.Tensor | None = None
        self._skipped_steps = 0
        self._skip_step = False
        self.qat = None
        if qat is not None:
            from mmformer.quantization import QATOptions, prepare_qat

            if lora is not None or prompt is not None:
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
        self, batch: dict[str, Any], stage: str = "train"
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Loss parts and contrastive features ({"image"/"audio"/"text": (B, E)}) of one batch."""
        m = self.model
        if isinstance(self.prompt, adapt.ContextPrompt):
            dataset = getattr(getattr(self._trainer, "datamodule", None), "datasets", {}).get("train")
            return adapt.context_prompt_losses(
                m, self.prompt, self._find_tokenizer(), self.zeroshot_classes, batch, getattr(dataset, "classes", None)
            )
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        # audio arrives as waveforms, or as log-mel features the training loader computed (SpecAugment)
        media = [k for k in ("pixel_values", "audio", "audio_features") if batch.get(k) is not None]
        if ids is not None and not media and (self.text_objectives.lm or self.text_objectives.mlm):
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
                prefix = adapt.prefix_embeds(self.prompt)  # a learned decoder prefix, if one trains
                if docs is not None:  # teacher forcing without padding: the targets mark each document's end
                    logits = m.decode(
                        ids, tokens, token_mask, prefix_embeds=prefix, documents=docs, memory_documents=memory_docs
                    )
                    parts[task] = caption_loss(logits, document_targets(ids, docs))  # (1, N, V)
                else:
                    dec_ids, dec_mask, targets = teacher_forcing(ids, mask)
                    logits = m.decode(dec_ids, tokens, token_mask, dec_mask, prefix_embeds=prefix)  # (B, T-1, V)
                    parts[task] = caption_loss(logits, targets)
                    logits_of[task] = logits
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
        """Weighted loss of one batch, with every part logged under ``{stage}/``."""
        parts, feats = self._losses(batch, stage)
        loss = sum(self.weights[name] * value for name, value in parts.items())
        lengths = batch.get("text_lengths")
        batch_size = batch["input_ids"].shape[0] if lengths is None else len(lengths)
        train = stage == "train"
        log = {"batch_size": batch_size, "on_step": train, "on_epoch": not train, "sync_dist": not train}
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value.detach(), **log)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **log)
        if train:
            self.log("train/logit_scale", self.model.logit_scale.detach().exp(), **log)
        return loss, parts, feats

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts, _ = self._step(batch, "train")
        local = not bool(torch.isfinite(loss.detach()))
        # Every rank takes the same decision, so that DDP's collectives stay in step.
        if self.trainer.strategy.reduce_boolean_decision(local, all=False):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            self._nonfinite(f"loss ({values})" if local else "loss on another rank", batch, batch_idx)
            # skip: backward still runs (Lightning forbids skipping it under DDP, where every rank must join the
            # gradient all-reduce); on_before_optimizer_step then drops the gradients, so nothing is updated.
            self._skip_step = True
        return loss

    def _nonfinite(self, what: str, batch: dict[str, Any], batch_idx: int) -> None:
        """Raise (``nonfinite='stop'``) or warn (``'skip'``), naming the step, the batch and its first samples."""
        sources = batch.get("source") or []
        rank = f"rank {self.global_rank}, " if self.trainer.world_size > 1 else ""
        where = (
            f"global step {self.global_step} ({rank}epoch {self.current_epoch}, batch {batch_idx}"
            + (f", samples {list(sources[:4])}{' …' if len(sources) > 4 else ''}" if sources else "")
            + ")"
        )
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at {where}; weights were not updated. Lower the learning rate, check the data, "
                "or pass nonfinite='skip' to skip such steps"
            )
        self._skipped_steps += 1
        warnings.warn(
            f"skipping the step at {where}: non-finite {what} ({self._skipped_steps} skipped so far)", stacklevel=2
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        skip, self._skip_step = self._skip_step, False
        # A finite loss can still give NaN/Inf gradients. With fp16's GradScaler, inf gradients are the scaler's
        # business (it skips the step and lowers the scale), so that check runs only without one.
        if not skip and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            local = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if self.trainer.strategy.reduce_boolean_decision(local, all=False):
                self._nonfinite("gradient", {}, self.trainer.fit_loop.epoch_loop.batch_idx)
                skip = True
        if skip:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
            if scaler is not None and getattr(raw, "_step_supports_amp_scaling", False):
                # A fused optimizer unscales inside its step, so the GradScaler has not looked at the gradients
                # yet: make them non-finite and the scaler skips the step itself (and lowers its scale).
                for param in self.parameters():
                    if param.grad is not None:
                        param.grad.fill_(float("nan"))
            else:
                optimizer.zero_grad(set_to_none=True)  # no gradient, no update: optimizers skip such parameters

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model.logit_scale.requires_grad:  # a frozen one stays bit-identical
            with torch.no_grad():  # as open_clip: keep the temperature where the softmax still trains
                self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def on_fit_start(self) -> None:
        rank_zero_info(f"mmformer: {adapt.parameter_report(self)}")
        if self.distiller is not None:
            self.distiller.check_tokenizer(self._find_tokenizer())

    def on_fit_end(self) -> None:
        if self.qat is not None:  # fake quantization → the real thing (checkpoints keep the float weights)
            from mmformer.quantization import convert_qat

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
        total = self.max_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "max_steps: the trainer runs without an end (max_steps=-1, max_epochs=-1), so the cosine schedule "
                "needs an explicit max_steps"
            )
        schedule = WarmupCosine(self.warmup_steps, int(total), self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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

    def _zeroshot_embeddings(self) -> torch.Tensor | None:
        """(C, E) class embeddings, built by :func:`mmformer.zeroshot.build_class_embeddings` as the classifier's."""
        tokenizer = self._find_tokenizer()
        if not self.zeroshot_classes or tokenizer is None or not self._has("text"):
            return None
        context = self.prompt if isinstance(self.prompt, adapt.ContextPrompt) else None
        templates = ("{}",) if context is not None else self.zeroshot_templates
        with torch.no_grad():
            embeddings = build_class_embeddings(
                self.model,
                tokenizer,
                self.zeroshot_classes,
                templates,
                batch_size=self.zeroshot_batch_size,
                prompt=context,
            )
        return embeddings.clone()  # a normal tensor, usable outside inference mode

    def _generate(self, batch: dict[str, Any], modality: str) -> list[str] | None:
        """Greedy transcripts or captions of the batch's audio or images; None when generation is unavailable."""
        tokenizer = self._find_tokenizer()
        if not self._has("decoder") or tokenizer is None:
            return None
        prefix = adapt.prefix_embeds(self.prompt)
        if modality == "image":
            ids = generate(
                self.model,
                image=batch["pixel_values"],
                prefix_embeds=prefix,
                max_new_tokens=self.generate_max_new_tokens,
            )
        else:
            ids = generate(
                self.model,
                audio=batch["audio"],
                audio_lengths=batch.get("audio_lengths"),
                prefix_embeds=prefix,
                max_new_tokens=self.generate_max_new_tokens,
            )
        return tokenizer.batch_decode(ids[:, 1:].cpu())  # without the bos prompt

    def _references(self, batch: dict[str, Any]) -> list[str]:
        if batch.get("text") is not None:
            return list(batch["text"])
        return self._find_tokenizer().batch_decode(batch["input_ids"].cpu())

    def _eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss, _, feats = self._step(batch, stage)
        metrics = self.metrics[stage]
        texts = batch.get("text")
        keys = text_keys(texts, self.device) if texts is not None else None
        if keys is None and "text" in feats:
            keys = torch.arange(feats["text"].shape[0], device=self.device)  # no strings: pair i matches only i
            keys += self.global_rank << 40
        for modality in ("image", "audio"):
            if modality not in feats:
                continue
            if "text" in feats:  # a prompt-training step encodes no captions
                getattr(metrics, f"retrieval_{modality}").update(feats[modality], feats["text"], keys)
                metrics.mark(f"retrieval_{modality}")
            if self._class_embeddings is not None and texts is not None:
                index = {normalize_text(c): i for i, c in enumerate(self.zeroshot_classes)}
                rows = [i for i, t in enumerate(texts) if normalize_text(t) in index]
                if rows:
                    logits = feats[modality][rows].float() @ self._class_embeddings.T  # (b, C)
                    target = torch.tensor([index[normalize_text(texts[i])] for i in rows], device=self.device)
                    getattr(metrics, f"zeroshot_{modality}").update(logits, target)
                    metrics.mark(f"zeroshot_{modality}")
        if self.val_generate:
            for modality, key, group in (("image", "pixel_values", "caption"), ("audio", "audio", "speech")):
                if batch.get(key) is not None:
                    predictions = self._generate(batch, modality)
                    if predictions is not None:
                        getattr(metrics, group).update(predictions, self._references(batch))
                        metrics.mark(group)
        return loss

    def _start_eval(self) -> None:
        self._class_embeddings = self._zeroshot_embeddings()

    def _end_eval(self, stage: str) -> None:
        for name, value in self.metrics[stage].compute_and_reset(self.device).items():
            self.log(f"{stage}/{name}", value, prog_bar=True, sync_dist=True)
        self._class_embeddings = None

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Embeddings (float32, CPU) of every modality the batch holds, plus captions / transcripts when the model
        has a decoder and a tokenizer is available, and the batch's ``source`` / ``text`` as given."""
        m = self.model
        out: dict[str, Any] = {}
        if batch.get("pixel_values") is not None:
            out["image_features"] = m.encode_image(batch["pixel_values"]).float().cpu()
        if batch.get("audio") is not None:
            out["audio_features"] = m.encode_audio(batch["audio"], batch.get("audio_lengths")).float().cpu()
        if batch.get("input_ids") is not None and self._has("text"):
            ids, mask, docs = batch["input_ids"], batch.get("attention_mask"), self._documents(batch)
            out["text_features"] = m.encode_text(ids, mask, documents=docs).float().cpu()
        for modality, key, name in (("image", "pixel_values", "captions"), ("audio", "audio", "transcripts")):
            if batch.get(key) is not None:
                texts = self._generate(batch, modality)
                if texts is not None:
                    out[name] = texts
        for key in ("source", "text"):
            if batch.get(key) is not None:
                out[key] = batch[key]
        return out

    # ------------------------------------------------------------------ checkpoints
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
            **adapt.checkpoint_record(self),
        }


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
