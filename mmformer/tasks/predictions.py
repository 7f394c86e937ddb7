"""``mmformer predict``'s output files: what :meth:`MultimodalTask.predict_step` gives for each sample, written when
the epoch ends (Lightning's :class:`~lightning.pytorch.callbacks.BasePredictionWriter`).

- ``predictions.jsonl``: one JSON object per sample, in the data set's order: ``index`` (its row in the data set;
  an unreadable sample, skipped with a warning, has no line), and of ``source``, ``text``, ``caption``,
  ``transcript`` those the batch and the model give (a language model's text blocks: ``text``, ``log_prob`` — the
  mean log-probability of its next tokens — and ``perplexity``);
- ``embeddings.safetensors``: ``image_features`` / ``audio_features`` / ``text_features`` (N, E) float32, row i the
  i-th line of ``predictions.jsonl``.

With several processes each writes its own pair, ``predictions.rank{R}.jsonl`` / ``embeddings.rank{R}.safetensors``.
Both files are written atomically (a reader never sees half of one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mmformer.io.atomic import write_bytes_atomic, write_text_atomic

FEATURES = ("image_features", "audio_features", "text_features")
# batch key → row key
TEXTS = {"source": "source", "text": "text", "captions": "caption", "transcripts": "transcript", "log_prob": "log_prob",
         "perplexity": "perplexity"}  # fmt: skip


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``mmformer predict`` into ``output_dir`` (default: the trainer's
    ``default_root_dir``/predictions); ``mmformer predict`` adds one unless the config has a prediction writer."""

    def __init__(self, output_dir: str | os.PathLike | None = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        # batch_indices: per loader, per batch, the samples' rows; predictions: per batch, or per loader then batch
        if predictions and isinstance(predictions[0], list):  # several predict loaders
            predictions = sum(predictions, [])
        batch_indices = sum(batch_indices or [], [])
        rows: list[dict[str, Any]] = []
        features: dict[str, list[torch.Tensor]] = {}
        for batch, indices in zip(predictions, batch_indices or [None] * len(predictions), strict=True):
            n = next(len(v) for v in batch.values())
            for i in range(n):
                at = batch["kept"][i] if "kept" in batch else i  # the collator dropped unreadable samples
                row: dict[str, Any] = {"index": int(indices[at]) if indices is not None else len(rows)}
                row.update({TEXTS[k]: _plain(batch[k][i]) for k in TEXTS if batch.get(k) is not None})
                rows.append(row)
            for key in FEATURES:
                if key in batch:
                    features.setdefault(key, []).append(batch[key])
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        out.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        write_text_atomic(out / f"predictions{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if features:
            tensors = {k: torch.cat(v).contiguous() for k, v in features.items()}
            write_bytes_atomic(out / f"embeddings{suffix}.safetensors", safetensors.torch.save(tensors))


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value
