"""Batching samples (plain dicts) into model inputs.

A sample is ``{"image": (C, H, W), "audio": (S,), "text": str, "label": int | None, "source": str}`` with any of the
first four absent, or a block of packed text ``{"input_ids": (L,), "document_ids": (L,), "source": str}`` (see
:mod:`mmformer.data.text`). Bad samples arrive as ``None`` (see :mod:`mmformer.data.skipping`) and are dropped here.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

MEDIA_AND_TEXT = ("image", "audio", "text")  # every sample of a batch carries the same of these


def pad_audio(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad waveforms (..., S_i) with zeros to the longest → ``(B, ..., S_max)`` and lengths ``(B,)`` long."""
    lengths = torch.tensor([w.shape[-1] for w in waves], dtype=torch.long)
    out = waves[0].new_zeros((len(waves), *waves[0].shape[:-1], int(lengths.max())))  # (B, ..., S_max)
    for i, w in enumerate(waves):
        out[i, ..., : w.shape[-1]] = w
    return out, lengths


def tokenize_counting_cuts(
    tokenizer: Tokenizer, texts: list[str], max_length: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``tokenizer(texts, max_length=max_length)`` and the indices of the texts it cut (their tokens past
    ``max_length`` are lost: a caller warns about them).

    Tokenizes once with one position more than allowed, so that texts that fit cost nothing extra: their ids and
    padding are the same as with ``max_length``; only when one is too long is the batch tokenized again.
    """
    out = tokenizer(texts, max_length=max_length + 1)
    cut = [i for i, n in enumerate(out["attention_mask"].sum(dim=1).tolist()) if n > max_length]
    return (tokenizer(texts, max_length=max_length) if cut else out), cut


class Collator:
    """``DataLoader`` ``collate_fn``: drops ``None`` samples, stacks images, pads audio, tokenizes text.

    Output keys, each present when the samples carry that field:
    ``pixel_values`` (B, C, H, W); ``audio`` (B, S) + ``audio_lengths`` (B,); ``input_ids`` (B, T) +
    ``attention_mask`` (B, T) bool (True = real token) + ``text`` list[str]; ``label`` (B,) long (when every sample
    has one: a label is optional, None where the data has none); and always
    ``source`` list[str]; ``kept`` list[int] when some samples were dropped: the positions, in the loader's batch, of
    the rows that remain (the prediction writer pairs rows with the loader's indices through it). Packed text blocks
    give ``input_ids``, ``attention_mask`` and ``document_ids`` (B, L),
    right-padded where a block is shorter. Returns ``None`` when every sample of the batch was bad.

    With ``packing``, texts are not padded: ``input_ids`` (1, N) holds the B tokenized texts back to back and
    ``text_lengths`` (B,) their token counts, instead of ``attention_mask`` (a packed batch, see
    :class:`mmformer.layers.Documents`; the training task packs the audio tokens likewise).

    Args:
        tokenizer: tokenizes ``text``; without one, texts are passed through as strings only.
        text_max_length: truncate texts to this many tokens (default: the tokenizer's ``max_length``). The first
            batch with texts cut warns (naming how many and the limit), once per collator (per loader worker): a
            model whose text table was shorter than its captions trained on their first words only, silently.
        packing: pack the texts (above) rather than pad them.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, text_max_length: int | None = None, packing: bool = False):
        self.tokenizer = tokenizer
        self.text_max_length = text_max_length
        self.packing = packing
        self._cut_warned = False

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [i for i, s in enumerate(samples) if s is not None]
        if not kept:
            return None
        batch = self._collate([samples[i] for i in kept])
        if len(kept) < len(samples):  # the loader's rows these are: the prediction writer's indices skip the dropped
            batch["kept"] = kept
        return batch

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if "input_ids" in samples[0]:
            return self._blocks(samples)
        present = [f for f in MEDIA_AND_TEXT if f in samples[0]]
        for s in samples[1:]:
            if [f for f in MEDIA_AND_TEXT if f in s] != present:
                raise ValueError(
                    f"samples of one batch must carry the same fields: {samples[0].get('source')} has {present}, "
                    f"{s.get('source')} has {[f for f in MEDIA_AND_TEXT if f in s]}"
                )
        batch: dict[str, Any] = {"source": [s.get("source", "") for s in samples]}
        if "image" in present:
            batch["pixel_values"] = torch.stack([s["image"] for s in samples])  # (B, C, H, W)
        if "audio" in present:
            batch["audio"], batch["audio_lengths"] = pad_audio([s["audio"] for s in samples])
        if "text" in present:
            batch["text"] = [s["text"] for s in samples]
            if self.tokenizer is not None:
                tokens = self._tokenize(batch["text"])
                batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
                if self.packing:  # (1, N) back to back; the mask's row sums are the documents' lengths
                    mask = batch.pop("attention_mask")
                    batch["input_ids"], batch["text_lengths"] = batch["input_ids"][mask][None], mask.sum(dim=1)
        labels = [s.get("label") for s in samples]
        if all(label is not None for label in labels):  # optional: a batch with an unlabelled sample has no label
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The texts' ids and mask, warning the first time some are cut (then no longer checked: no extra cost)."""
        max_length = self.text_max_length or self.tokenizer.max_length
        if self._cut_warned:
            return self.tokenizer(texts, max_length=max_length)
        tokens, cut = tokenize_counting_cuts(self.tokenizer, texts, max_length)
        if cut:
            self._cut_warned = True
            warnings.warn(
                f"{len(cut)} of {len(texts)} texts of a batch are longer than text_max_length={max_length} tokens "
                f"and are cut to it (e.g. {texts[cut[0]][:40]!r}): the model trains on their first {max_length} "
                "tokens only; raise data.text_max_length (and model.model.text.max_length, its limit) to keep them. "
                "Warned once: later batches are not checked",
                stacklevel=2,
            )
        return tokens

    def _blocks(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Packed text blocks (already token ids) → ``input_ids``, ``attention_mask``, ``document_ids`` (B, L)."""
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=pad)
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        mask = torch.arange(ids.shape[1]) < lengths[:, None]
        documents = pad_sequence([s["document_ids"] for s in samples], batch_first=True, padding_value=-1)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "document_ids": documents,
            "source": [s.get("source", "") for s in samples],
        }
