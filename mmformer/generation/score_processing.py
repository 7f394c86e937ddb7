"""Score processors: every adjustment of the next token's scores before a token is chosen, behind one protocol.

A :class:`ScoreProcessor` is called as ``processor(scores, tokens, step)``:

- ``scores`` (N, V): float scores of the next token — logits in greedy decoding and sampling, log-probabilities in
  beam search (where Hugging Face applies its logits processors); each processor says which it needs;
- ``tokens`` (N, L): the whole decoder sequence so far, prompt included (left padding included, as given);
- ``step``: tokens generated so far (0 for the first new token).

It returns the (N, V) scores and may modify ``scores`` in place. A processor whose only effect is to forbid tokens
(their scores set to -inf, or every token but one forced: :class:`MinNewTokens`, :class:`ForcedEos`,
:class:`SuppressTokens`) says so with the class attribute ``masks = True``: the token it forbids is forbidden whatever
the scores, so greedy decoding may apply it to approximate scores (:func:`masks_only`; the LM head's screen,
:mod:`mmformer.generation.lm_head`). :func:`build_score_processors` builds the list once
per ``generate`` call from the :class:`~mmformer.generation.options.DecodingOptions` and the checkpoint's rules, in
Hugging
Face's order (repetition penalty, length rules, suppressed tokens, then the sampling filters); the searches of
:mod:`mmformer.generation.search` apply it with :func:`apply_processors` in one place per step. A new rule is one
class here
(or anywhere: the protocol is structural, e.g. Whisper's timestamp rules) added to the list.

Shape legend: N decoded rows, L tokens so far, P prompt tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mmformer.generation.options import DecodingOptions
    from mmformer.model import MultimodalTransformer


class ScoreProcessor(Protocol):
    """The one signature of a score adjustment (see the module's docstring)."""

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor: ...


def masks_only(processors: Sequence[ScoreProcessor]) -> bool:
    """Whether every processor only forbids tokens (``masks = True``; see the module's docstring)."""
    return all(getattr(process, "masks", False) for process in processors)


def apply_processors(
    processors: Sequence[ScoreProcessor], scores: torch.Tensor, tokens: torch.Tensor, step: int
) -> torch.Tensor:
    """``scores`` (N, V) through every processor in order, for rows ``tokens`` (N, L) after ``step`` new tokens."""
    for process in processors:
        scores = process(scores, tokens, step)
    return scores


# ---------------------------------------------------------------------- rules that read the tokens so far
class RepetitionPenalty:
    """CTRL's repetition penalty, as Hugging Face applies it (to logits, or to log-probabilities in beam search): the
    score of every token already in the row (the prompt's real tokens included, its padding not) is divided by the
    penalty when positive and multiplied by it when negative.

    Args:
        penalty: > 1 discourages repeats.
        padding: (N, P) True at the prompt's padding, whose ids do not count.
    """

    def __init__(self, penalty: float, padding: torch.Tensor | None = None):
        self.penalty, self.padding = penalty, padding

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        N, V = scores.shape
        if self.padding is not None:  # padding ids go to an extra column, dropped below
            tokens = tokens.masked_fill(F.pad(self.padding, (0, tokens.shape[1] - self.padding.shape[1])), V)
        seen = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device).scatter_(1, tokens, True)[:, :V]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


# ---------------------------------------------------------------------- length rules and a checkpoint's rules
def end_ids(eos_id: int | Sequence[int]) -> tuple[int, ...]:
    """The ids that end a row: one end-of-text id, or several (Llama 3's ``eos_token_id: [128001, 128009]``)."""
    return (int(eos_id),) if isinstance(eos_id, int) else tuple(dict.fromkeys(int(i) for i in eos_id))


def model_end_ids(model: MultimodalTransformer) -> tuple[int, ...]:
    """Every id that ends a row of ``model``'s generation: its end-of-text (``config.text.eos_id``) first, then the
    other end ids its checkpoint lists (``TextConfig.extra_eos_ids``, set by the Hugging Face converters from
    ``eos_token_id: [...]`` in config.json / generation_config.json)."""
    return end_ids([model.config.text.eos_id, *model.config.text.extra_eos_ids])


class MinNewTokens:
    """End-of-text is not generated before ``n`` new tokens (Hugging Face's ``min_new_tokens``); logits or
    log-probabilities."""

    masks = True  # it only forbids tokens

    def __init__(self, n: int, eos_id: int | Sequence[int]):
        self.n, self.eos_ids = n, [eos_id] if isinstance(eos_id, int) else list(eos_id)

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if step < self.n:
            scores[:, self.eos_ids] = float("-inf")
        return scores


class ForcedEos:
    """The last token the length limit allows is end-of-text (Hugging Face's ``forced_eos_token_id``; open_clip's
    CoCa ``generate``); logits or log-probabilities.

    Args:
        eos_id: end-of-text.
        max_length: the most token columns a row may reach, prompt included (the search's limit).
    """

    masks = True  # it only forbids tokens

    def __init__(self, eos_id: int, max_length: int):
        self.eos_id, self.max_length = eos_id, max_length

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if tokens.shape[1] + 1 >= self.max_length:  # the next token is the last one
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.eos_id] = 0.0
            return forced
        return scores


class SuppressTokens:
    """These ids are never generated (Whisper's ``suppress_tokens``), or with ``first_only`` not as the first new
    token (``begin_suppress_tokens``); logits or log-probabilities."""

    masks = True  # it only forbids tokens

    def __init__(self, ids: Sequence[int], *, first_only: bool = False):
        self.ids, self.first_only = sorted(set(ids)), first_only

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if self.first_only and step > 0:
            return scores
        scores[:, self.ids] = float("-inf")
        return scores


# ---------------------------------------------------------------------- sampling filters (logits)
class Temperature:
    """Divide logits by the temperature (> 1 flattens, < 1 sharpens the distribution)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k largest logits of each row."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]  # (N, 1)
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    """Nucleus filter on logits: keep the most likely tokens whose cumulative probability reaches p (at least one)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the more likely ones already reach p; the most likely one always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------------- building the list
def build_score_processors(
    model: MultimodalTransformer,
    options: DecodingOptions,
    *,
    max_length: int,
    prompt_mask: torch.Tensor | None = None,
) -> list[ScoreProcessor]:
    """The processors of one ``generate`` call, in Hugging Face's order: the repetition penalty, the length rules
    (``min_new_tokens``, ``forced_eos``), the checkpoint's suppressed tokens (``config.generation``), then — when
    sampling — temperature, top-k and top-p.

    Args:
        model: its config gives end-of-text and the checkpoint's rules.
        options: the decoding options.
        max_length: the most token columns a row may reach, prompt included (for ``forced_eos``).
        prompt_mask: (N, P) True at the prompts' real tokens (left padding does not count as a repeat).
    """
    processors: list[ScoreProcessor] = []
    gen, eos = model.config.generation, model.config.text.eos_id
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(options.repetition_penalty, None if prompt_mask is None else ~prompt_mask))
    if options.min_new_tokens:
        processors.append(MinNewTokens(options.min_new_tokens, model_end_ids(model)))
    if options.forced_eos:
        processors.append(ForcedEos(eos, max_length))
    if gen is not None and gen.suppress_tokens:
        processors.append(SuppressTokens(gen.suppress_tokens))
    if gen is not None and gen.begin_suppress_tokens:
        processors.append(SuppressTokens(gen.begin_suppress_tokens, first_only=True))
    if options.sample:
        if options.temperature != 1.0:
            processors.append(Temperature(options.temperature))
        if options.top_k is not None:
            processors.append(TopK(options.top_k))
        if options.top_p is not None and options.top_p < 1.0:
            processors.append(TopP(options.top_p))
    return processors
