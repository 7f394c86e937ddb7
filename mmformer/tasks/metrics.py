"""Evaluation metrics of the training task, on torchmetrics (which also synchronises them across ranks).

- retrieval recall@k in both directions over the features of a whole epoch (:class:`RetrievalRecall`);
- zero-shot top-1 accuracy (``MulticlassAccuracy``);
- generated text against references: BLEU, CER, WER and exact match (:class:`TextMetrics`);
- the text-only objectives: the language model's perplexity and the masked-LM's accuracy on its masked tokens.

Texts are compared after :func:`normalize_text` (lower case, whitespace runs collapsed), because the tokenizers
lowercase and detokenised text loses the original spacing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import BLEUScore, CharErrorRate, Perplexity, WordErrorRate
from torchmetrics.utilities import dim_zero_cat

TOP_K = (1, 5)


def normalize_text(text: str) -> str:
    """Lower case with single spaces: the form predictions and references are compared in."""
    return " ".join(text.lower().split())


def text_keys(texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """A stable 63-bit hash of each normalised text (equal across processes, unlike ``hash``) → (B,) long.

    Retrieval counts any item with the same text as a correct match (COCO has several images per caption, digits
    repeats strings).
    """
    keys = [
        int.from_bytes(hashlib.blake2b(normalize_text(t).encode(), digest_size=8).digest(), "little") >> 1
        for t in texts
    ]
    return torch.tensor(keys, dtype=torch.long, device=device)


class RetrievalRecall(Metric):
    """Recall@k of retrieving ``b`` from ``a`` and ``a`` from ``b`` over every pair seen this epoch.

    Query i is a hit at k when one of its k most similar candidates carries the same text key as i. Features are
    kept for the whole epoch (and gathered across ranks) so that every query ranks against every candidate.

    Args:
        a, b: short names used in the result keys, e.g. ``"i"``, ``"t"`` → ``i2t_r1``, ``t2i_r5``.
        top_k: the recall cut-offs.
        chunk: query rows scored at once, to bound the memory of the similarity matrix.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, a: str, b: str, top_k: Sequence[int] = TOP_K, chunk: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.names = (a, b)
        self.top_k = tuple(top_k)
        self.chunk = chunk
        self.add_state("a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")

    def update(self, a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor) -> None:
        """Paired (B, E) features (row i of ``a`` goes with row i of ``b``) and their (B,) text keys."""
        if a.shape != b.shape or a.ndim != 2 or keys.shape != a.shape[:1]:
            raise ValueError(
                f"a, b, keys: expected (B, E), (B, E), (B,), got "
                f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(keys.shape)}"
            )
        self.a.append(a.detach().float())
        self.b.append(b.detach().float())
        self.keys.append(keys.to(a.device))

    def compute(self) -> dict[str, torch.Tensor]:
        a, b, keys = dim_zero_cat(self.a), dim_zero_cat(self.b), dim_zero_cat(self.keys)
        out = {}
        for (q, c), (name_q, name_c) in (((a, b), self.names), ((b, a), self.names[::-1])):
            hits = self._hits(q, c, keys)  # (N, len(top_k))
            for j, k in enumerate(self.top_k):
                out[f"{name_q}2{name_c}_r{k}"] = hits[:, j].float().mean()
        return out

    def _hits(self, queries: torch.Tensor, candidates: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        k_max = min(max(self.top_k), candidates.shape[0])
        rows = []
        for start in range(0, queries.shape[0], self.chunk):
            sim = queries[start : start + self.chunk] @ candidates.T  # (chunk, N)
            ranked = keys[sim.topk(k_max, dim=1).indices]  # (chunk, k_max) keys of the best candidates
            correct = ranked == keys[start : start + self.chunk, None]
            rows.append(torch.stack([correct[:, :k].any(dim=1) for k in self.top_k], dim=1))
        return torch.cat(rows)


class TextMetrics(nn.Module):
    """BLEU (4-gram, torchmetrics), character and word error rates and exact match of generated texts."""

    def __init__(self):
        super().__init__()
        self.bleu = BLEUScore()
        self.cer = CharErrorRate()
        self.wer = WordErrorRate()
        self.exact = MeanMetric()

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references: expected equal lengths, got {len(predictions)} and {len(references)}"
            )
        preds = [normalize_text(p) for p in predictions]
        refs = [normalize_text(r) for r in references]
        self.bleu.update(preds, [[r] for r in refs])
        self.cer.update(preds, refs)
        self.wer.update(preds, refs)
        self.exact.update(
            torch.tensor([float(p == r) for p, r in zip(preds, refs)], device=self.exact.mean_value.device)
        )

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "bleu": self.bleu.compute(),
            "cer": self.cer.compute(),
            "wer": self.wer.compute(),
            "exact": self.exact.compute(),
        }

    def reset(self) -> None:
        for m in (self.bleu, self.cer, self.wer, self.exact):
            m.reset()


class TaskMetrics(nn.Module):
    """Every evaluation metric of one stage (validation or test); each group is reported only if it was updated on
    some rank during the epoch (decided with one all-reduce, so that every rank synchronises the same metrics).

    Args:
        embed_dim: size of the contrastive features.
        n_classes: number of zero-shot classes (0: no zero-shot accuracy).
        vocab_size: the vocabulary the masked-LM accuracy ranges over.
    """

    GROUPS = (
        "retrieval_image",
        "retrieval_audio",
        "zeroshot_image",
        "zeroshot_audio",
        "caption",
        "speech",
        "lm",
        "mlm",
    )

    def __init__(self, embed_dim: int, n_classes: int = 0, vocab_size: int = 2):
        super().__init__()
        self.embed_dim = embed_dim
        self.retrieval_image = RetrievalRecall("i", "t")
        self.retrieval_audio = RetrievalRecall("a", "t")
        self.zeroshot_image = MulticlassAccuracy(num_classes=max(n_classes, 2), average="micro")
        self.zeroshot_audio = MulticlassAccuracy(num_classes=max(n_classes, 2), average="micro")
        self.caption = TextMetrics()
        self.speech = TextMetrics()
        self.lm = Perplexity(ignore_index=-100)
        self.mlm = MulticlassAccuracy(num_classes=max(vocab_size, 2), average="micro", ignore_index=-100)
        self._updated: set[str] = set()

    def mark(self, group: str) -> None:
        """Record that ``group`` received data this epoch."""
        self._updated.add(group)

    def update_lm(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Next-token logits (B, T, V) and targets (B, T) (-100 where ignored) for the perplexity."""
        self.lm.update(logits.detach().float(), targets)
        self.mark("lm")

    def update_mlm(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Masked-LM logits (B, T, V) and labels (B, T) (-100 where not masked) for the accuracy."""
        self.mlm.update(logits.detach().flatten(0, 1), labels.flatten())
        self.mark("mlm")

    def compute_and_reset(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Flat results such as ``i2t_r1``, ``zeroshot_image_acc``, ``caption_bleu``, ``speech_wer``."""
        flags = torch.tensor([g in self._updated for g in self.GROUPS], dtype=torch.float32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        out: dict[str, torch.Tensor] = {}
        for group, flag in zip(self.GROUPS, flags.tolist()):
            metric = getattr(self, group)
            if flag and group.startswith("retrieval") and group not in self._updated:
                # another rank saw pairs: join the gather with none (an empty list state cannot be synchronised)
                empty = torch.zeros(0, self.embed_dim, device=device)
                metric.update(empty, empty, torch.zeros(0, dtype=torch.long, device=device))
            if flag:
                if group.startswith("retrieval"):
                    out.update(metric.compute())
                elif group.startswith("zeroshot"):
                    out[f"{group}_acc"] = metric.compute()
                elif group == "lm":
                    out["lm_perplexity"] = metric.compute()
                elif group == "mlm":
                    out["mlm_accuracy"] = metric.compute()
                else:
                    keys = ("bleu", "cer", "exact") if group == "caption" else ("wer", "cer")
                    values = metric.compute()
                    out.update({f"{group}_{k}": values[k] for k in keys})
            metric.reset()
        self._updated.clear()
        return out
