"""What :class:`~mmformer.tasks.MultimodalTask` measures at validation and test, and what it predicts.

:class:`Evaluation` holds one :class:`~mmformer.tasks.metrics.TaskMetrics` per stage and updates it from a batch and
the contrastive features the task's step computed for it: retrieval recall (media ↔ text), zero-shot accuracy (the
class embeddings and the logit of :mod:`mmformer.zeroshot`, as :class:`~mmformer.ZeroShotClassifier` scores), and
BLEU / CER / WER of greedy captions and transcripts (:func:`mmformer.generation.decoding.generate`). It knows nothing of
Lightning: the task passes the model, the tokenizer and its prompt, and logs what :meth:`Evaluation.end` returns.

Shape legend: B batch, E embedding size, C zero-shot classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.adapt.prompts import ContextPrompt, SoftPrompt
from mmformer.config import ModelConfig
from mmformer.generation.decoding import generate
from mmformer.layers.documents import Documents
from mmformer.model import MultimodalTransformer
from mmformer.tasks.adapt import prefix_embeds
from mmformer.tasks.metrics import MISSING, TaskMetrics, item_ids, normalize_text, text_keys
from mmformer.tasks.settings import GenerationSettings, ZeroShotSettings
from mmformer.zeroshot import build_class_embeddings, zero_shot_logits

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

STAGES = ("val", "test")
DECODED = (("image", "pixel_values"), ("audio", "audio"))  # the media a decoder captions / transcribes, and their key


def items_of(batch: dict[str, Any], modality: str) -> list[str] | None:
    """Which item each row of ``batch`` shows in ``modality``, by the rows' ``source``, for the metrics that pool
    the rows of one item (several captions of an image): a sample's source names its first medium (its image when it
    has one, see :class:`mmformer.data.base.Record`), so it tells images apart, and recordings only in a batch
    without images. None: each row is an item of its own."""
    first = next((m for m, key in DECODED if batch.get(key) is not None), None)
    return batch.get("source") if modality == first else None


class Evaluation(nn.Module):
    """The task's metrics per stage (``metrics["val"]``, ``metrics["test"]``), the zero-shot class embeddings of the
    running evaluation epoch, and the texts the task generates.

    Args:
        config: the model's configuration (embedding size, vocabulary).
        zeroshot: the classes and prompt templates of zero-shot accuracy.
        generation: whether evaluation generates captions / transcripts, and how many tokens.
        decoded: the groups whose texts are generated and scored: the objectives the run trains.
        loss_weights: every loss part's weight, for the epoch's loss values
            (:class:`~mmformer.tasks.metrics.LossMeans`).
    """

    def __init__(
        self,
        config: ModelConfig,
        zeroshot: ZeroShotSettings,
        generation: GenerationSettings,
        decoded: tuple[str, ...] = ("caption", "speech"),
        loss_weights: dict[str, float] | None = None,
    ):
        super().__init__()
        self.zeroshot, self.generation = zeroshot, generation
        self.decoded = decoded
        embed_dim = config.embed_dim or config.text_width()
        classes = len(zeroshot.classes)
        self.metrics = nn.ModuleDict(
            {s: TaskMetrics(embed_dim, classes, config.text.vocab_size, loss_weights) for s in STAGES}
        )
        self.class_embeddings: torch.Tensor | None = None  # (C, E), during an evaluation epoch

    def build_class_embeddings(
        self, model: MultimodalTransformer, tokenizer: Tokenizer | None, prompt: SoftPrompt | None
    ) -> torch.Tensor | None:
        """(C, E) class embeddings, built by :func:`mmformer.zeroshot.build_class_embeddings` as the classifier's
        (through a context prompt if one trains); None without classes, a tokenizer or a text route."""
        if not self.zeroshot.classes or tokenizer is None or "text" not in model.config.routes:
            return None
        context = prompt if isinstance(prompt, ContextPrompt) else None
        templates = ("{}",) if context is not None else self.zeroshot.templates
        with torch.no_grad():
            embeddings = build_class_embeddings(
                model, tokenizer, self.zeroshot.classes, templates, batch_size=self.zeroshot.batch_size, prompt=context
            )
        return embeddings.clone()  # a normal tensor, usable outside inference mode

    def start(self, model: MultimodalTransformer, tokenizer: Tokenizer | None, prompt: SoftPrompt | None) -> None:
        """Begin an evaluation epoch: the class embeddings of the model as it is now."""
        self.class_embeddings = self.build_class_embeddings(model, tokenizer, prompt)

    def update(
        self,
        model: MultimodalTransformer,
        batch: dict[str, Any],
        features: dict[str, torch.Tensor],
        stage: str,
        tokenizer: Tokenizer | None,
        prompt: SoftPrompt | None,
    ) -> None:
        """Update ``stage``'s metrics with one batch and its contrastive features ({"image"/"audio"/"text": (B, E)})."""
        metrics = self.metrics[stage]
        device = model.logit_scale.device
        texts = batch.get("text")
        if "text" in features:  # without strings a pair matches only itself (and the other rows of its item)
            n = features["text"].shape[0]
            keys = text_keys(texts, device) if texts is not None else torch.full((n,), MISSING, device=device)
        for modality in ("image", "audio"):
            if modality not in features:
                continue
            if "text" in features:  # a prompt-training step encodes no captions
                sources = items_of(batch, modality)
                items = item_ids(sources, device) if sources is not None else None
                getattr(metrics, f"retrieval_{modality}").update(features[modality], features["text"], keys, items)
                metrics.mark(f"retrieval_{modality}")
            if self.class_embeddings is not None and texts is not None:
                index = {normalize_text(c): i for i, c in enumerate(self.zeroshot.classes)}
                rows = [i for i, t in enumerate(texts) if normalize_text(t) in index]
                if rows:
                    logits = zero_shot_logits(model, features[modality][rows], self.class_embeddings)  # (b, C)
                    target = torch.tensor([index[normalize_text(texts[i])] for i in rows], device=device)
                    getattr(metrics, f"zeroshot_{modality}").update(logits, target)
                    metrics.mark(f"zeroshot_{modality}")
        if self.generation.evaluate:
            for (modality, key), group in zip(DECODED, ("caption", "speech")):
                if batch.get(key) is not None and group in self.decoded:
                    predictions = self.generate(model, batch, modality, tokenizer, prompt)
                    if predictions is not None:
                        references = (
                            list(texts) if texts is not None else tokenizer.batch_decode(batch["input_ids"].cpu())
                        )
                        getattr(metrics, group).update(predictions, references, items_of(batch, modality))
                        metrics.mark(group)

    def end(self, stage: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The epoch's values of ``stage`` (the groups some rank updated), and the metrics reset."""
        self.class_embeddings = None
        return self.metrics[stage].compute_and_reset(device)

    def generate(
        self,
        model: MultimodalTransformer,
        batch: dict[str, Any],
        modality: str,
        tokenizer: Tokenizer | None,
        prompt: SoftPrompt | None,
    ) -> list[str] | None:
        """Greedy captions or transcripts of the batch's images or audio; None when generation is unavailable."""
        if "decoder" not in model.config.routes or tokenizer is None:
            return None
        media = (
            {"image": batch["pixel_values"]}
            if modality == "image"
            else {"audio": batch["audio"], "audio_lengths": batch.get("audio_lengths")}
        )
        ids = generate(
            model, **media, prefix_embeds=prefix_embeds(prompt), max_new_tokens=self.generation.max_new_tokens
        )
        return tokenizer.batch_decode(ids[:, 1:].cpu())  # without the bos prompt

    def predict(
        self,
        model: MultimodalTransformer,
        batch: dict[str, Any],
        documents: Documents | None,
        tokenizer: Tokenizer | None,
        prompt: SoftPrompt | None,
    ) -> dict[str, Any]:
        """Embeddings (float32, CPU) of every modality the batch holds, plus captions / transcripts when the model
        has a decoder and a tokenizer is available, and the batch's ``source`` / ``text`` as given."""
        out: dict[str, Any] = {}
        if batch.get("pixel_values") is not None:
            out["image_features"] = model.encode_image(batch["pixel_values"]).float().cpu()
        if batch.get("audio") is not None:
            out["audio_features"] = model.encode_audio(batch["audio"], batch.get("audio_lengths")).float().cpu()
        if batch.get("input_ids") is not None and "text" in model.config.routes:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            out["text_features"] = model.encode_text(ids, mask, documents=documents).float().cpu()
        for (modality, key), name in zip(DECODED, ("captions", "transcripts")):
            if batch.get(key) is not None:
                texts = self.generate(model, batch, modality, tokenizer, prompt)
                if texts is not None:
                    out[name] = texts
        for key in ("source", "text", "kept"):  # kept: which of the loader's rows these are (see Collator)
            if batch.get(key) is not None:
                out[key] = batch[key]
        return out
