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
from mmformer.tasks.metrics import TaskMetrics, normalize_text, text_keys
from mmformer.tasks.settings import GenerationSettings, ZeroShotSettings
from mmformer.zeroshot import build_class_embeddings, zero_shot_logits

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

STAGES = ("val", "test")
DECODED = (("image", "pixel_values"), ("audio", "audio"))  # the media a decoder captions / transcribes, and their key


class Evaluation(nn.Module):
    """The task's metrics per stage (``metrics["val"]``, ``metrics["test"]``), the zero-shot class embeddings of the
    running evaluation epoch, and the texts the task generates.

    Args:
        config: the model's configuration (embedding size, vocabulary).
        zeroshot: the classes and prompt templates of zero-shot accuracy.
        generation: whether evaluation generates captions / transcripts, and how many tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        zeroshot: ZeroShotSettings,
        generation: GenerationSettings,
        decoded: tuple[str, ...] = ("caption", "speech"),
    ):
        super().__init__()
        self.zeroshot, self.generation = zeroshot, generation
        self.decoded = decoded  # the groups whose texts are generated and scored: the objectives the run trains
        embed_dim = config.embed_dim or config.text_width()
        classes = len(zeroshot.classes)
        self.metrics = nn.ModuleDict({s: TaskMetrics(embed_dim, classes, config.text.vocab_size) for s in STAGES})
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
        rank: int = 0,
    ) -> None:
        """Update ``stage``'s metrics with one batch and its contrastive features ({"image"/"audio"/"text": (B, E)})."""
        metrics = self.metrics[stage]
        device = model.logit_scale.device
        texts = batch.get("text")
        keys = text_keys(texts, device) if texts is not None else None
        if keys is None and "text" in features:
            keys = torch.arange(features["text"].shape[0], device=device)  # no strings: pair i matches only i
            keys += rank << 40
        for modality in ("image", "audio"):
            if modality not in features:
                continue
            if "text" in features:  # a prompt-training step encodes no captions
                getattr(metrics, f"retrieval_{modality}").update(features[modality], features["text"], keys)
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
                        getattr(metrics, group).update(predictions, references)
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
        for key in ("source", "text"):
            if batch.get(key) is not None:
                out[key] = batch[key]
        return out
