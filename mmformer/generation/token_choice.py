"""Choosing the next token from the processed scores (:class:`Greedy`, :class:`Sampler`, picked from a
:class:`~mmformer.generation.options.DecodingOptions` by :func:`token_chooser`), the text generated tokens add after
their prompt (:func:`text_after`), and the stop-string check (:class:`StopStrings`). Every adjustment of the scores
before the choice is a score processor (:mod:`mmformer.generation.score_processing`).

Shape legend: N decoded rows, L tokens so far, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy
import torch

from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.generation.options import DecodingOptions


CONTEXT = 4  # tokens before a continuation whose text it is decoded after (a character's first bytes: up to 3)


def text_context(tokenizer: Any, before: Sequence[int], skip_special_tokens: bool = True) -> list[int]:
    """The last :data:`CONTEXT` ids of ``before`` that give text of their own: what :func:`text_after` decodes a
    continuation after. Ids without text (special tokens, padding) are left out: they add nothing to the text, and
    mmformer's tokenizer ends its text at an end-of-text (a prompt's would end the continuation's too)."""
    context: list[int] = []
    for i in reversed(before):
        if len(context) == CONTEXT:
            break
        if tokenizer.decode([i], skip_special_tokens=skip_special_tokens):
            context.insert(0, i)
    return context


def text_after(tokenizer: Any, context: Sequence[int], ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text ``ids`` add after the ids ``context`` (:func:`text_context`): the text of both, past the part it shares
    with the context's own text, as Hugging Face's text-generation pipeline cuts the decoded prompt off the decoded
    sequence. Decoding ``ids`` alone loses what the decoder writes from what comes before: a SentencePiece
    (Metaspace) decoder strips the space of its first piece (" there" → "there"), and a character whose first bytes
    came before reads as replacement characters."""
    if not context:
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    head = tokenizer.decode(list(context), skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode([*context, *ids], skip_special_tokens=skip_special_tokens)
    return full[len(os.path.commonprefix([head, full])) :]


class StopStrings:
    """Which rows' generated text contains a stop string: at every step, the text of each row's last tokens after the
    prompt, decoded after the tokens before them (:func:`text_after`). The window holds as many tokens as the longest
    string has UTF-8 bytes, plus two: each generated token adds at least one byte to the text, so a string that the
    last token completes lies within it (a "€" is three byte-level tokens; sized in characters, it was missed).

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=True) -> str`` (a
            :class:`~mmformer.preprocess.tokenizer.Tokenizer`, a Hugging Face tokenizer).
        strings: the stop strings.
        n_prompt: prompt columns, never searched (they are the first window's context).
    """

    def __init__(self, tokenizer: Any, strings: Sequence[str], n_prompt: int):
        self.tokenizer, self.strings, self.n_prompt = tokenizer, tuple(strings), n_prompt
        self.window = max(len(x.encode("utf-8")) for x in self.strings) + 2

    def __call__(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (N, L) → (N,) bool, True where the generated text holds a stop string (only ``active`` rows are
        decoded; the others are False)."""
        start = max(self.n_prompt, tokens.shape[1] - self.window)
        # the context is found among the tokens just before the window: a prompt's padding comes before its real
        # tokens, and a row ends at the first special token it generates
        lookback = max(0, start - 4 * CONTEXT)
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool)
        rows = range(tokens.shape[0]) if active is None else active.nonzero().flatten().tolist()
        near = tokens[:, lookback:].tolist()
        for i in rows:
            context = text_context(self.tokenizer, near[i][: start - lookback])
            text = text_after(self.tokenizer, context, near[i][start - lookback :])
            hit[i] = any(x in text for x in self.strings)
        return hit.to(tokens.device)

    def cut(self, text: str) -> str:
        """``text`` up to its first stop string (excluded)."""
        ends = [text.find(x) for x in self.strings if x in text]
        return text[: min(ends)] if ends else text


def most_likely(scores: torch.Tensor) -> torch.Tensor:
    """Scores (..., V) → the id of each row's highest (...), the first of ties (a NaN's position where a row has
    one): ``argmax``'s answer. Float scores on CPU go through NumPy's ``argmax`` (vectorized: 4 µs a row at Whisper's
    51,865 tokens, against 30–34 µs for torch's ``max(dim).indices`` and 67–73 µs for its ``argmax``; Intel Xeon,
    2 threads), others through ``max(dim).indices``; equal ids checked with ties, NaN and -inf rows."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and scores.ndim:
        return torch.from_numpy(numpy.asarray(scores.detach().numpy().argmax(axis=-1)))
    return scores.max(dim=-1).indices


class Greedy:
    """The most likely token."""

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Processed scores (N, V) → ids (N,)."""
        return most_likely(scores)


Generators = torch.Generator | Sequence[torch.Generator] | None


class Sampler:
    """A token drawn from the softmax of the processed scores (the sampling filters are score processors:
    :mod:`mmformer.generation.score_processing`). ``generator`` makes the draws reproducible: one for every row, or
    one per row (:func:`row_generators`), so that a row draws the same tokens whatever it is decoded with."""

    def __init__(self, generator: Generators = None):
        self.generator = generator

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Processed logits (N, V) → ids (N,)."""
        probs = scores.softmax(dim=-1)  # (N, V)
        if isinstance(self.generator, torch.Generator) or self.generator is None:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, self.generator)]).squeeze(1)


def row_generators(seed: int, rows: int, device: torch.device | str = "cpu", first: int = 0) -> list[torch.Generator]:
    """Generators for rows ``first .. first + rows - 1`` of a list of prompts: row r's is seeded from ``(seed, r)``
    (NumPy's ``SeedSequence``, whose streams are independent: a row's is not another seed's next row's), so that a
    prompt samples the same text whatever the batch it is decoded in (the ``complete`` command's ``--seed``, with any
    ``--batch-size`` or ``--stream``). Hugging Face samples every row from the one global generator instead."""
    if not is_int(seed):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    entropy = seed % 2**64  # torch.manual_seed's range, negative seeds included
    states = [numpy.random.SeedSequence(entropy, spawn_key=(first + r,)).generate_state(1, numpy.uint64)[0]
              for r in range(rows)]  # fmt: skip
    return [torch.Generator(device=device).manual_seed(int(s)) for s in states]


def token_chooser(options: DecodingOptions, generator: Generators = None, rows: int | None = None) -> Greedy | Sampler:
    """Sampling (``options.sample``) or the most likely token; ``generator``: one, or one per row of the ``rows``."""
    if generator is None or isinstance(generator, torch.Generator):
        return Sampler(generator) if options.sample else Greedy()
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"generator: expected a torch.Generator or a list of one per prompt, got {generator!r}")
    if rows is not None and len(generator) != rows:
        raise ValueError(f"generator: expected one torch.Generator per prompt ({rows}), got {len(generator)}")
    return Sampler(generator) if options.sample else Greedy()
