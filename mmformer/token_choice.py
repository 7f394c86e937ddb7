"""Choosing the next token: logit filters (:class:`Temperature`, :class:`TopK`, :class:`TopP`), adjustments that read
the tokens so far (:class:`RepetitionPenalty`), the stop-string check (:class:`StopStrings`) and the choosers
(:class:`Greedy`, :class:`Sampler`), built from a :class:`~mmformer.generation.DecodingOptions` by
:func:`token_chooser` and :func:`score_processors`.

Shape legend: N decoded rows, L tokens so far, P prompt tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mmformer.generation import DecodingOptions


class Temperature:
    """Divide logits by the temperature (> 1 flattens, < 1 sharpens the distribution)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    """Keep the k largest logits of each row."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]  # (N, 1)
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP:
    """Nucleus filter: keep the most likely tokens whose cumulative probability reaches p (at least one)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the more likely ones already reach p; the most likely one always stays
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= self.p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))


class RepetitionPenalty:
    """CTRL's repetition penalty, as Hugging Face applies it: the score of every token already in the row (the
    prompt's real tokens included, its padding not) is divided by the penalty when positive and multiplied by it when
    negative. Unlike the filters above it reads the tokens so far; searches apply it first (to logits, or to
    log-probabilities in beam search, as Hugging Face does).

    Args:
        penalty: > 1 discourages repeats.
        padding: (N, P) True at the prompt's padding, whose ids do not count.
    """

    def __init__(self, penalty: float, padding: torch.Tensor | None = None):
        self.penalty, self.padding = penalty, padding

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Scores (N, V) of the next token of rows ``tokens`` (N, L)."""
        N, V = scores.shape
        if self.padding is not None:  # padding ids go to an extra column, dropped below
            tokens = tokens.masked_fill(F.pad(self.padding, (0, tokens.shape[1] - self.padding.shape[1])), V)
        seen = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device).scatter_(1, tokens, True)[:, :V]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


class StopStrings:
    """Which rows' generated text contains a stop string: the text of the last tokens of each row after the prompt
    (enough of them for the longest string, plus two), decoded by the tokenizer at every step.

    Args:
        tokenizer: anything with ``decode(ids) -> str`` (a :class:`~mmformer.tokenizer.Tokenizer`).
        strings: the stop strings.
        n_prompt: prompt columns, never searched.
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str], n_prompt: int):
        self.tokenizer, self.strings, self.n_prompt = tokenizer, tuple(strings), n_prompt
        self.window = max(len(x) for x in self.strings) + 2

    def __call__(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (N, L) → (N,) bool, True where the generated text holds a stop string (only ``active`` rows are
        decoded; the others are False)."""
        start = max(self.n_prompt, tokens.shape[1] - self.window)
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool)
        rows = range(tokens.shape[0]) if active is None else active.nonzero().flatten().tolist()
        tails = tokens[:, start:].tolist()
        for i in rows:
            text = self.tokenizer.decode(tails[i])
            hit[i] = any(x in text for x in self.strings)
        return hit.to(tokens.device)

    def cut(self, text: str) -> str:
        """``text`` up to its first stop string (excluded)."""
        ends = [text.find(x) for x in self.strings if x in text]
        return text[: min(ends)] if ends else text


class Greedy:
    """The most likely token."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


class Sampler:
    """A token drawn from the filtered distribution; ``generator`` makes the draws reproducible."""

    def __init__(self, filters: Sequence, generator: torch.Generator | None = None):
        self.filters = list(filters)
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        for f in self.filters:
            logits = f(logits)
        probs = logits.softmax(dim=-1)  # (N, V)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


def score_processors(options: DecodingOptions, prompt_mask: torch.Tensor | None = None) -> list[RepetitionPenalty]:
    """The adjustments that read the tokens so far, in the order Hugging Face applies them; ``prompt_mask`` (N, P)
    marks the prompts' real tokens."""
    if options.repetition_penalty == 1.0:
        return []
    return [RepetitionPenalty(options.repetition_penalty, None if prompt_mask is None else ~prompt_mask)]


def token_chooser(options: DecodingOptions, generator: torch.Generator | None = None) -> Greedy | Sampler:
    if not options.sample:
        return Greedy()
    filters: list = []
    if options.temperature != 1.0:
        filters.append(Temperature(options.temperature))
    if options.top_k is not None:
        filters.append(TopK(options.top_k))
    if options.top_p is not None and options.top_p < 1.0:
        filters.append(TopP(options.top_p))
    return Sampler(filters, generator)
