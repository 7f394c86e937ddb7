"""A checkpoint's decoding rules and the options' length rules, outside the search loops of
:mod:`mmformer.generation`: tokens never generated (Whisper's ``suppress_tokens`` / ``begin_suppress_tokens``), a
minimum number of new tokens, a forced final end-of-text, and the default decoder prompt — ``[bos]``, or Whisper's
``[start, language, task, no-timestamps]`` with the language detected from the audio as Whisper does.

Shape legend: B batch, N decoded rows, V vocabulary, S memory tokens, D width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmformer.generation import DecodingOptions
    from mmformer.model import MultimodalTransformer


class SuppressTokens:
    """These ids are never generated (Whisper's ``suppress_tokens``), or with ``first_only`` not as the first new
    token (``begin_suppress_tokens``)."""

    def __init__(self, ids: Sequence[int], *, first_only: bool = False):
        self.ids, self.first_only = sorted(set(ids)), first_only

    def __call__(self, logits: torch.Tensor, generated: int, remaining: int) -> torch.Tensor:
        if self.first_only and generated > 0:
            return logits
        logits[:, self.ids] = float("-inf")
        return logits


class MinNewTokens:
    """End-of-text is not generated before ``n`` new tokens (Hugging Face's ``min_new_tokens``)."""

    def __init__(self, n: int, eos_id: int):
        self.n, self.eos_id = n, eos_id

    def __call__(self, logits: torch.Tensor, generated: int, remaining: int) -> torch.Tensor:
        if generated < self.n:
            logits[:, self.eos_id] = float("-inf")
        return logits


class ForcedEos:
    """The last token the length limit allows is end-of-text (Hugging Face's ``forced_eos_token_id``; open_clip's
    CoCa ``generate``)."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def __call__(self, logits: torch.Tensor, generated: int, remaining: int) -> torch.Tensor:
        if remaining == 1:
            forced = torch.full_like(logits, float("-inf"))
            forced[:, self.eos_id] = 0.0
            return forced
        return logits


class LogitRules:
    """Rules applied to each step's scores before a token is chosen: to the logits for greedy decoding and
    sampling, to the log-probabilities in beam search (where Hugging Face applies its logits processors).

    Each rule is called as ``rule(scores (N, V), generated, remaining)``: new tokens so far, and positions left
    before the length limit (this one included).
    """

    def __init__(self, rules: Sequence[Callable[[torch.Tensor, int, int], torch.Tensor]] = ()):
        self.rules = list(rules)

    def __call__(self, scores: torch.Tensor, generated: int, remaining: int) -> torch.Tensor:
        for rule in self.rules:
            scores = rule(scores, generated, remaining)
        return scores


def logit_rules(model: MultimodalTransformer, options: DecodingOptions) -> LogitRules:
    """The checkpoint's rules (``config.generation``: suppressed tokens) and the options' (minimum length, a forced
    end-of-text)."""
    rules: list = []
    gen, eos = model.config.generation, model.config.text.eos_id
    if gen is not None and gen.suppress_tokens:
        rules.append(SuppressTokens(gen.suppress_tokens))
    if gen is not None and gen.begin_suppress_tokens:
        rules.append(SuppressTokens(gen.begin_suppress_tokens, first_only=True))
    if options.min_new_tokens:
        rules.append(MinNewTokens(options.min_new_tokens, eos))
    if options.forced_eos:
        rules.append(ForcedEos(eos))
    return LogitRules(rules)


# ---------------------------------------------------------------------- the default prompt
def _language_id(model: MultimodalTransformer, language: str) -> int:
    """The token of a language code ("en", or "<|en|>") of the checkpoint's generation config."""
    gen = model.config.generation
    code = language.strip().lower().removeprefix("<|").removesuffix("|>")
    if gen is None or not gen.language_ids:
        raise ValueError(f"language: this model has no language tokens (an English-only checkpoint?); got {language!r}")
    if code not in gen.language_ids:
        raise ValueError(
            f"language: expected one of this checkpoint's codes {sorted(gen.language_ids)}, got {language!r}"
        )
    return gen.language_ids[code]


def detect_language(
    model: MultimodalTransformer, memory: torch.Tensor, memory_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B,) language tokens: per row, the language token the decoder finds most likely after ``bos``, as Whisper
    (and Hugging Face's ``detect_language``) does."""
    candidates = torch.tensor(sorted(model.config.generation.language_ids.values()), device=memory.device)
    start = torch.full((memory.shape[0], 1), model.config.text.bos_id, dtype=torch.long, device=memory.device)
    logits = model.decode(start, memory, memory_mask)[:, -1]  # (B, V)
    return candidates[logits[:, candidates].argmax(dim=-1)]


def prompt_length(model: MultimodalTransformer) -> int:
    """Tokens of the default decoder prompt: ``bos``, then the checkpoint's language, task and no-timestamps tokens."""
    gen = model.config.generation
    if gen is None:
        return 1
    return 1 + bool(gen.language_ids) + bool(gen.task_ids) + (gen.no_timestamps_id is not None)


def default_prompt(
    model: MultimodalTransformer, options: DecodingOptions, memory: torch.Tensor, memory_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, P) default decoder prompt: ``[bos]``, or Whisper's ``[start, language, task, no-timestamps]`` from the
    checkpoint's generation config, the language detected per row unless chosen."""
    B, device, gen = memory.shape[0], memory.device, model.config.generation
    columns = [torch.full((B,), model.config.text.bos_id, dtype=torch.long, device=device)]
    language, task = options.language, options.task
    if gen is None and (language is not None or task is not None):
        raise ValueError(f"language / task: this model has no such tokens; got language={language!r}, task={task!r}")
    if gen is not None:
        language = language if language is not None else gen.language
        if language is not None:
            columns.append(torch.full((B,), _language_id(model, language), dtype=torch.long, device=device))
        elif gen.language_ids:
            columns.append(detect_language(model, memory, memory_mask))
        task = task if task is not None else gen.task or ("transcribe" if gen.task_ids else None)
        if task is not None and task not in gen.task_ids:
            raise ValueError(f"task: expected one of this checkpoint's tasks {sorted(gen.task_ids)}, got {task!r}")
        if task is not None:
            columns.append(torch.full((B,), gen.task_ids[task], dtype=torch.long, device=device))
        if gen.no_timestamps_id is not None:
            columns.append(torch.full((B,), gen.no_timestamps_id, dtype=torch.long, device=device))
    return torch.stack(columns, dim=1)
