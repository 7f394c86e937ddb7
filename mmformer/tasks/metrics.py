"""Evaluation metrics of the training task, on torchmetrics (which also synchronises them across ranks).

- retrieval recall@k in both directions over the features of a whole epoch (:class:`RetrievalRecall`), by the COCO
  protocol: the rows of one item (an image with several captions) are one query and one candidate;
- zero-shot top-1 accuracy (``MulticlassAccuracy``);
- generated text against references: BLEU and exact match against all of an item's references, CER and WER
  (:class:`TextMetrics`);
- the text-only objectives: the language model's perplexity and the masked-LM's accuracy on its masked tokens;
- the loss parts of an epoch, each averaged over what it averages (:class:`LossMeans`).

Texts are compared after :func:`normalize_text` (lower case, whitespace runs collapsed), because the tokenizers
lowercase and detokenised text loses the original spacing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.text import bleu_score
from torchmetrics.text import CharErrorRate, Perplexity, WordErrorRate
from torchmetrics.utilities import dim_zero_cat

TOP_K = (1, 5)


def normalize_text(text: str) -> str:
    """Lower case with single spaces: the form predictions and references are compared in."""
    return " ".join(text.lower().split())


MISSING = -1  # the key or item id of a row that has none: the row matches only itself


def _hashes(strings: Sequence[str], device: torch.device | None) -> torch.Tensor:
    """A stable 63-bit hash of each string (equal across processes, unlike ``hash``) → (B,) long, never negative."""
    keys = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1 for s in strings]
    return torch.tensor(keys, dtype=torch.long, device=device)


def text_keys(texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """The key of each normalised text → (B,) long: retrieval counts a text equal to one of an item's own texts as
    a match (digits repeats strings, and equal texts have equal features, so which of them ranks first is chance)."""
    return _hashes([normalize_text(t) for t in texts], device)


def item_ids(sources: Sequence[str | None], device: torch.device | None = None) -> torch.Tensor:
    """The id of the item each row shows, from its ``source`` (the file it was read from) → (B,) long; rows with the
    same source are one item (COCO: one row per caption of an image), a row without one (``""``) is its own."""
    ids = _hashes([s or "" for s in sources], device)
    return ids.masked_fill(torch.tensor([not s for s in sources], dtype=torch.bool, device=ids.device), MISSING)


def _own_where_missing(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with each MISSING replaced by an id of its own row (negative, so unlike every hash)."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    return torch.where(ids < 0, -1 - rows, ids)


class RetrievalRecall(Metric):
    """Recall@k of retrieving ``b`` from ``a`` and ``a`` from ``b`` over every pair seen this epoch, by the COCO
    protocol (as open_clip's and CLIP benchmark's evaluations).

    Rows of ``a`` with the same item id are one item (an image with one row per caption): it is one query and one
    candidate, with all those rows' texts as its own. Item → text is a hit at k when one of the k most similar texts
    is one of the item's (by text key: an equal string counts too); text → item when one of the k most similar items
    has that text. Features are kept for the whole epoch (and gathered across ranks) so that every query ranks
    against every candidate.

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
        self.add_state("items", default=[], dist_reduce_fx="cat")

    def update(self, a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor, items: torch.Tensor | None = None) -> None:
        """Paired (B, E) features (row i of ``a`` goes with row i of ``b``), the (B,) text keys of ``b``
        (:func:`text_keys`; MISSING: no text to compare) and the (B,) item ids of ``a`` (:func:`item_ids`; None or
        MISSING: each row its own item)."""
        if items is None:
            items = torch.full_like(keys, MISSING)
        if a.shape != b.shape or a.ndim != 2 or keys.shape != a.shape[:1] or items.shape != keys.shape:
            raise ValueError(
                f"a, b, keys, items: expected (B, E), (B, E), (B,), (B,), got "
                f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(keys.shape)}, {tuple(items.shape)}"
            )
        self.a.append(a.detach().float())
        self.b.append(b.detach().float())
        self.keys.append(keys.to(a.device))
        self.items.append(items.to(a.device))

    def compute(self) -> dict[str, torch.Tensor]:
        a, b = dim_zero_cat(self.a), dim_zero_cat(self.b)
        keys, items = _own_where_missing(dim_zero_cat(self.keys)), _own_where_missing(dim_zero_cat(self.items))
        n = keys.shape[0]
        _, item_of_row = torch.unique(items, return_inverse=True)  # (N,) in [0, M)
        _, text_of_row = torch.unique(keys, return_inverse=True)  # (N,) in [0, K)
        n_items, n_texts = (int(ids.max()) + 1 if n else 0 for ids in (item_of_row, text_of_row))
        rows = torch.arange(n, device=keys.device)
        first = torch.full((n_items,), n, device=keys.device).scatter_reduce(0, item_of_row, rows, "amin")  # (M,)
        pairs = torch.unique(item_of_row * n_texts + text_of_row)  # the (item, text) pairs some row holds
        items_a, item_index = a[first], torch.arange(n_items, device=keys.device)  # (M, E), (M,)
        out = {}
        name_a, name_b = self.names
        for name, hits in (
            (f"{name_a}2{name_b}", self._hits(items_a, b, item_index, text_of_row, (n_texts, 1), pairs)),
            (f"{name_b}2{name_a}", self._hits(b, items_a, text_of_row, item_index, (1, n_texts), pairs)),
        ):  # hits: (queries, len(top_k))
            for j, k in enumerate(self.top_k):
                out[f"{name}_r{k}"] = hits[:, j].float().mean()
        return out

    def _hits(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        query_ids: torch.Tensor,
        candidate_ids: torch.Tensor,
        scales: tuple[int, int],
        pairs: torch.Tensor,
    ) -> torch.Tensor:
        """(Q, len(top_k)) bool: whether query q's k most similar candidates hold a relevant one, i.e. one whose
        (item, text) pair code ``query_id * scales[0] + candidate_id * scales[1]`` is in ``pairs``."""
        k_max = min(max(self.top_k), candidates.shape[0])
        rows = [torch.zeros(0, len(self.top_k), dtype=torch.bool, device=queries.device)]
        for start in range(0, queries.shape[0], self.chunk):
            sim = queries[start : start + self.chunk] @ candidates.T  # (chunk, C)
            best = candidate_ids[sim.topk(k_max, dim=1).indices]  # (chunk, k_max) ids of the best candidates
            codes = query_ids[start : start + self.chunk, None] * scales[0] + best * scales[1]
            correct = torch.isin(codes, pairs)
            rows.append(torch.stack([correct[:, :k].any(dim=1) for k in self.top_k], dim=1))
        return torch.cat(rows)


class TextMetrics(nn.Module):
    """BLEU (4-gram, torchmetrics) and exact match of generated texts per item, character and word error rates per
    row.

    The rows of one item (an image with one row per caption, as COCO's) are generated alike: BLEU scores the item's
    prediction against all its references, as COCO's caption evaluation does, and exact match counts it when it
    equals one of them. The rows are gathered from every rank when the epoch's values are computed.
    """

    def __init__(self):
        super().__init__()
        self.cer = CharErrorRate()
        self.wer = WordErrorRate()
        self._rows: list[tuple[str | None, str, str]] = []  # (item, prediction, reference), normalised

    def update(
        self, predictions: Sequence[str], references: Sequence[str], items: Sequence[str | None] | None = None
    ) -> None:
        """Predictions and references of a batch's rows; ``items``: the item each row shows (its ``source``: rows
        with the same one pool their references; None or ``""``: the row alone)."""
        items = [None] * len(predictions) if items is None else list(items)
        if not len(predictions) == len(references) == len(items):
            raise ValueError(
                f"predictions, references and items: expected equal lengths, got {len(predictions)}, "
                f"{len(references)} and {len(items)}"
            )
        preds = [normalize_text(p) for p in predictions]
        refs = [normalize_text(r) for r in references]
        self.cer.update(preds, refs)
        self.wer.update(preds, refs)
        self._rows.extend(zip(items, preds, refs))

    def compute(self) -> dict[str, torch.Tensor]:
        grouped: dict[object, tuple[str, list[str]]] = {}
        for i, (item, prediction, reference) in enumerate(_gathered(self._rows)):
            grouped.setdefault(item or ("row", i), (prediction, []))[1].append(reference)
        predictions = [p for p, _ in grouped.values()]
        references = [refs for _, refs in grouped.values()]
        exact = sum(p in refs for p, refs in zip(predictions, references)) / max(len(predictions), 1)
        device = self.cer.device
        return {
            "bleu": bleu_score(predictions, references).to(device),
            "cer": self.cer.compute(),
            "wer": self.wer.compute(),
            "exact": torch.tensor(exact, device=device),
        }

    def reset(self) -> None:
        self.cer.reset()
        self.wer.reset()
        self._rows = []


def _gathered(rows: list) -> list:
    """This rank's rows, or with several processes every rank's (each rank gets all of them, in rank order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part or []]


class LossMeans(Metric):
    """The mean of each loss part over an evaluation epoch, each weighted by what it averages (the target tokens of a
    cross-entropy, the samples of the others), and ``loss``: the parts' weighted sum. So the epoch's values do not
    depend on how it was cut into batches (a batch's token mean, averaged over batches by samples, did).

    Args:
        weights: every part's weight in the loss (the task's), by name.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, weights: Mapping[str, float], **kwargs):
        super().__init__(**kwargs)
        self.names = sorted(weights)
        self.weights = [float(weights[n]) for n in self.names]
        self.add_state("sums", default=torch.zeros(len(self.names)), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(len(self.names)), dist_reduce_fx="sum")

    def update(self, parts: Mapping[str, torch.Tensor], units: Mapping[str, torch.Tensor | float]) -> None:
        """One batch's parts (each a mean) and the number of units each averages."""
        for name, value in parts.items():
            i = self.names.index(name)
            self.sums[i] += value.detach().float() * units[name]
            self.counts[i] += units[name]

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.sums / self.counts.clamp_min(1)
        seen = (self.counts > 0).tolist()
        out = {name: means[i] for i, name in enumerate(self.names) if seen[i]}
        out["loss"] = sum((w * means[i] for i, w in enumerate(self.weights) if seen[i]), torch.zeros_like(self.sums[0]))
        return out


class TaskMetrics(nn.Module):
    """Every evaluation metric of one stage (validation or test); each group is reported only if it was updated on
    some rank during the epoch (decided with one all-reduce, so that every rank synchronises the same metrics).

    Args:
        embed_dim: size of the contrastive features.
        n_classes: number of zero-shot classes (0: no zero-shot accuracy).
        vocab_size: the vocabulary the masked-LM accuracy ranges over.
        loss_weights: every loss part's weight (the task's), for the epoch's loss values (:class:`LossMeans`).
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
        "losses",
    )

    def __init__(
        self, embed_dim: int, n_classes: int = 0, vocab_size: int = 2, loss_weights: Mapping[str, float] | None = None
    ):
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
        self.losses = LossMeans(loss_weights or {})
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

    def update_losses(self, parts: Mapping[str, torch.Tensor], units: Mapping[str, torch.Tensor | float]) -> None:
        """A batch's loss parts and the units each averages (see :class:`LossMeans`)."""
        self.losses.update(parts, units)
        self.mark("losses")

    def compute_and_reset(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Flat results such as ``i2t_r1``, ``zeroshot_image_acc``, ``caption_bleu``, ``speech_wer``, and the loss
        parts by name with their weighted sum ``loss``."""
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
                if group.startswith("retrieval") or group == "losses":
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
