"""The text-only objectives of the training task: causal language modelling (``lm``) and masked language modelling
(``mlm``), on batches of token ids with no image or audio.

- ``lm``: next-token cross-entropy of the decoder over every real token (as nanoGPT and Hugging Face's causal LMs).
- ``mlm``: BERT's masking (:func:`mask_tokens`: 15 % of the real, non-special tokens; of those 80 % become the mask
  token, 10 % a random token, 10 % stay) and the cross-entropy of the masked-LM head on the chosen ones.

Packed documents. Language-model data is usually packed: documents are concatenated and cut into blocks (see
:mod:`mmformer.data.text`), and each block carries ``document_ids`` (B, T). With ``packed_attention="none"`` a block is
one sequence, as in nanoGPT and Hugging Face's ``group_texts``: attention crosses document boundaries. With
``"document"`` no token attends across a boundary, positions restart at each document and no prediction crosses one:
the blocks run as a padding-free packed batch (:class:`~mmformer.layers.documents.Documents` from the document ids;
the model's ``documents=`` path), whose attention stays inside each document without any (T, T) mask.
The tests check it against each document unpacked into a right-padded row of its own.

Shape legend: B batch, T tokens, V vocabulary, D documents in a batch, L longest document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmformer.layers.documents import Documents
from mmformer.tasks.losses import IGNORE_INDEX, caption_loss

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer
    from mmformer.tasks.metrics import TaskMetrics

PACKED_ATTENTION = ("none", "document")


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int | None] = (),
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, as Hugging Face's ``DataCollatorForLanguageModeling`` draws it.

    Each real token that is not special is chosen with ``probability``; a chosen token becomes ``mask_id`` with
    probability 0.8, a uniformly random token with 0.1, and stays itself with 0.1.

    Returns:
        The model's input ids (B, T) and the labels (B, T): the original id where a token was chosen,
        ``IGNORE_INDEX`` elsewhere.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for special in special_ids:
        if special is not None:
            real = real & (input_ids != special)

    def draw(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < p

    chosen = draw(probability) & real
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    masked = chosen & draw(0.8)
    random = chosen & ~masked & draw(0.5)  # half of the remaining 20 %
    inputs = input_ids.masked_fill(masked, mask_id)
    noise = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    return torch.where(random, noise, inputs), labels


class TextObjectives:
    """The ``lm`` and ``mlm`` losses of a text-only batch (``input_ids``, ``attention_mask``, optionally
    ``document_ids``), and their metrics (perplexity, masked-token accuracy).

    Args:
        lm: compute the language-modelling loss (the model needs a decoder route).
        mlm: compute the masked-LM loss (the model needs ``mlm_head`` and ``text.mask_id``).
        mlm_probability: the share of tokens chosen for masking.
        packed_attention: ``none`` (attention crosses the documents of a packed block) or ``document`` (it does not,
            and positions restart per document).
    """

    def __init__(self, lm: bool, mlm: bool, mlm_probability: float = 0.15, packed_attention: str = "none"):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability: expected a number in (0, 1), got {mlm_probability!r}")
        if packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention: expected one of {list(PACKED_ATTENTION)}, got {packed_attention!r}")
        self.lm, self.mlm = lm, mlm
        self.mlm_probability, self.packed_attention = mlm_probability, packed_attention

    def check(self, model: MultimodalTransformer, prompt: Any = None) -> None:
        """Refuse a model (or a learned ``prompt``) that the enabled objectives cannot train, naming what is missing."""
        routes, text = model.config.routes, model.config.text
        if self.lm and getattr(prompt, "kind", None) == "decoder_prefix":  # lm's decode reads no prefix: no gradient
            raise ValueError(
                "adapt.prompt.kind: decoder_prefix trains with the caption / speech objectives; objectives.lm does not "
                "read the prefix (set objectives.lm: 0, or adapt with lora)"
            )
        if self.lm and "decoder" not in routes:
            raise ValueError(f"objectives.lm > 0 needs a model with a decoder route; its routes are {sorted(routes)}")
        if self.mlm and (model.mlm_head is None or text.mask_id is None):
            raise ValueError(
                "objectives.mlm > 0 needs model.mlm_head: true and model.text.mask_id (the [MASK] token id; with a "
                f"tokenizer trained by mmformer, <unk> = 3 serves), got mlm_head={model.config.mlm_head}, "
                f"mask_id={text.mask_id}"
            )

    def _documents(self, batch: dict[str, Any]) -> Documents | None:
        """The packed documents of a batch of blocks when documents must not see each other, else None. Padding
        (the last, shorter block; ``document_ids`` -1) becomes documents of its own, which nothing reads."""
        ids = batch.get("document_ids")
        if ids is None or self.packed_attention != "document":
            return None
        mask = batch.get("attention_mask")
        if mask is not None:  # each row's padding its own document, apart from the row's last one
            ids = ids.masked_fill(~mask.bool(), -1)
        return Documents.from_ids(ids)

    def losses(
        self, model: MultimodalTransformer, batch: dict[str, Any], metrics: TaskMetrics | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"lm": ..., "mlm": ...}`` of a text-only batch (the enabled ones); ``metrics`` (an evaluation stage's)
        are updated with the logits."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        documents = self._documents(batch)
        packed = {"attention_mask": mask} if documents is None else {"documents": documents}  # (no mask when packed)
        parts: dict[str, torch.Tensor] = {}
        if self.lm:
            logits = model.decode(ids, **packed)  # (B, T, V)
            targets = ids[:, 1:]
            if mask is not None:
                targets = targets.masked_fill(~mask[:, 1:].bool(), IGNORE_INDEX)
            if documents is not None:  # nothing predicts across a boundary
                boundary = batch["document_ids"][:, 1:] != batch["document_ids"][:, :-1]
                targets = targets.masked_fill(boundary, IGNORE_INDEX)
            parts["lm"] = caption_loss(logits[:, :-1], targets)
            if metrics is not None:
                metrics.update_lm(logits[:, :-1], targets)
        if self.mlm:
            text = model.config.text
            generator = None
            if not model.training:  # the same masks at every evaluation, so that its figures compare
                generator = torch.Generator(ids.device).manual_seed(0)
            inputs, labels = mask_tokens(
                ids,
                mask,
                mask_id=text.mask_id,
                vocab_size=text.vocab_size,
                special_ids=(text.pad_id, text.bos_id, text.eos_id),
                probability=self.mlm_probability,
                generator=generator,
            )
            logits = model.mlm_logits(inputs, **packed)
            parts["mlm"] = caption_loss(logits, labels)
            if metrics is not None:
                metrics.update_mlm(logits, labels)
        return parts

    def block_scores(self, model: MultimodalTransformer, batch: dict[str, Any], tokenizer: Any) -> dict[str, list]:
        """Per text block (``mmformer predict`` of a language model): ``log_prob``, the mean log-probability of its next
        tokens, and ``perplexity``, its exp(-log_prob), each the ``lm`` objective of the block alone (the targets and
        attention the model trained with, as lm-eval's rolling log-likelihood scores a text), and ``text``, the block
        as the model read it (its document separators included)."""
        rows = range(batch["input_ids"].shape[0])
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        log_probs = []
        for i in rows:
            block = {k: v[i : i + 1] for k, v in tensors.items()}  # (1, L) each
            log_probs.append(-float(self.losses(model, block)["lm"]))
        model.pop_aux_loss()  # a mixture of experts' load-balancing terms: nothing trains on them here
        out: dict[str, list] = {"log_prob": log_probs, "perplexity": [math.exp(-x) for x in log_probs]}
        if tokenizer is not None:
            ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
            out["text"] = [tokenizer.decode(ids[i][mask[i]], skip_special_tokens=False) for i in rows]
        return out
