"""What a checkpoint's decoder reads (:func:`text_to_text`: a text encoder of its own, T5) and its decoder prompt:
``[bos]``, or Whisper's ``[start, language, task, no-timestamps]`` with the
language detected from the audio as Whisper does. (The checkpoint's rules on the scores — ``suppress_tokens``,
``begin_suppress_tokens`` — are score processors: :mod:`mmformer.generation.score_processing`.)

Shape legend: B batch, V vocabulary, S memory tokens, D width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmformer.config import ModelConfig
    from mmformer.generation.options import DecodingOptions
    from mmformer.model import MultimodalTransformer


# ---------------------------------------------------------------------- what the decoder reads
def reads_memory(config: ModelConfig) -> bool:
    """Whether the model's decoder reads an encoder's states: its stack has a cross-attention sublayer. A decoder
    without one is a decoder-only language model: its decode drops any memory it is given, so it can neither caption,
    transcribe nor train the caption / speech objectives (it would learn the texts alone)."""
    decoder = config.routes.get("decoder")
    return decoder is not None and config.stacks[decoder].cross_attention


def text_to_text(model: MultimodalTransformer) -> bool:
    """Whether the decoder reads a text encoder of its own (T5): a cross-attending decoder stack beside a separate
    text stack, and no image or audio tower."""
    routes = model.config.routes
    return (
        reads_memory(model.config)
        and routes.get("text", routes["decoder"]) != routes["decoder"]
        and "image" not in routes
        and "audio" not in routes
    )


# ---------------------------------------------------------------------- the default prompt
def language_id(model: MultimodalTransformer, language: str) -> int:
    """The token of a language code ("en", or "<|en|>") of the checkpoint's generation config; ValueError naming
    ``language`` where it has none (the server checks a request with it before any work)."""
    gen = model.config.generation
    code = language.strip().lower().removeprefix("<|").removesuffix("|>")
    if gen is None or not gen.language_ids:
        raise ValueError(f"language: this model has no language tokens (a model trained here, or an English-only "
                         f"Whisper checkpoint): leave it out; got {language!r}")  # fmt: skip
    if code not in gen.language_ids:
        raise ValueError(
            f"language: expected one of this checkpoint's codes {sorted(gen.language_ids)}, got {language!r}"
        )
    return gen.language_ids[code]


def task_id(model: MultimodalTransformer, task: str) -> int:
    """The token of a task ("transcribe", "translate") of the checkpoint's generation config; ValueError naming
    ``task`` where it has none."""
    gen = model.config.generation
    tasks = {} if gen is None else gen.task_ids
    if task not in tasks:
        raise ValueError(f"task: expected one of this checkpoint's tasks {sorted(tasks)}, got {task!r}")
    return tasks[task]


def check_language_task(
    model: MultimodalTransformer, language: str | None, task: str | None, prompt_given: bool = False
) -> None:
    """A chosen ``language`` / ``task`` (None: not chosen) checked against the checkpoint, whether or not a prompt
    will read them: a ValueError naming the one it lacks; and refused with a prompt of the caller's
    (``prompt_given``), which replaces the default prompt they choose tokens of: they would be ignored."""
    if language is None and task is None:
        return
    if model.config.generation is None:
        raise ValueError(f"language / task: this model has no such tokens; got language={language!r}, task={task!r}")
    if language is not None:
        language_id(model, language)
    if task is not None:
        task_id(model, task)
    if prompt_given:
        raise ValueError(
            f"language={language!r}, task={task!r}: they choose tokens of the default decoder prompt, which "
            "prompt_ids= replaces (they would be ignored); put their tokens in prompt_ids, or leave prompt_ids out"
        )


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
    check_language_task(model, language, task)
    if gen is not None:
        language = language if language is not None else gen.language
        if language is not None:
            columns.append(torch.full((B,), language_id(model, language), dtype=torch.long, device=device))
        elif gen.language_ids:
            columns.append(detect_language(model, memory, memory_mask))
        task = task if task is not None else gen.task or ("transcribe" if gen.task_ids else None)
        if task is not None:
            columns.append(torch.full((B,), task_id(model, task), dtype=torch.long, device=device))
        if gen.no_timestamps_id is not None:
            columns.append(torch.full((B,), gen.no_timestamps_id, dtype=torch.long, device=device))
    return torch.stack(columns, dim=1)
