"""Text completion by a decoder-only language model: prompts as text (tokenized, left-padded, decoded together) in,
continuations as text out. The decoding itself is :func:`mmformer.generation.decoding.generate`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from mmformer.generation.decoding import generate, processor_with_tokenizer, ragged
from mmformer.generation.decoding_rules import reads_memory, text_to_text
from mmformer.generation.options import DecodingOptions
from mmformer.generation.score_processing import model_end_ids
from mmformer.generation.token_choice import StopStrings, text_after, text_context
from mmformer.io.weights import model_device

if TYPE_CHECKING:
    from mmformer.generation.streaming import TextStreamer
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.processor import Processor


def prompt_ids(tokenizer: Any, text: str, name: str) -> list[int]:
    """The ids a completion of ``text`` continues: its tokens without a trailing end-of-text (a template's would end
    the prompt before it is continued); ValueError naming ``name`` for text with no tokens (or not valid Unicode)."""
    ids = tokenizer.encode(text, name=name)
    if tokenizer.eos_id is not None and ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    if not ids:
        raise ValueError(f"{name}: {text!r:.80} has no tokens to continue (the tokenizer adds no bos)")
    return ids


def _prompt_rows(tokenizer: Any, prompts: Any) -> tuple[list[list[int]] | torch.Tensor, bool]:
    """(id rows or a (B, P) tensor, whether they came from text) of ``complete``'s prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        return (prompts[None] if prompts.ndim == 1 else prompts), False
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        got = "an empty list" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
        raise ValueError(f"prompts: expected a str, a list of str or prompt ids, got {got}")
    if all(isinstance(p, str) for p in prompts):
        return [prompt_ids(tokenizer, p, f"prompts[{i}]") for i, p in enumerate(prompts)], True
    if all(isinstance(p, (list, tuple, torch.Tensor)) for p in prompts):
        return [list(map(int, p)) for p in prompts], False
    raise TypeError(f"prompts: expected a str, a list of str or lists of ids, got items of type "
                    f"{sorted({type(p).__name__ for p in prompts})}")  # fmt: skip


def _real_prompts(rows: list[list[int]] | torch.Tensor, mask: Any) -> list[list[int]]:
    """Each prompt's ids without its padding (``mask``: a (B, P) tensor's, True = real token)."""
    if isinstance(rows, list):
        return rows
    if mask is None:
        return rows.tolist()
    return [row[m].tolist() for row, m in zip(rows, torch.as_tensor(mask, device=rows.device).bool())]


def continues_prompts(model: MultimodalTransformer) -> bool:
    """Whether the model is a language model that continues a bare prompt: a decoder that reads no encoder — none
    with cross-attention, or one whose only other tower is the text stack it shares (a model trained here with the
    ``lm`` objective). A captioner or speech model (image or audio routes) and a text-to-text model (T5: its own
    encoder stack) decode from an encoder's states."""
    cfg, routes = model.config, model.config.routes
    if model.lm_head is None or "decoder" not in routes:
        return False
    if not reads_memory(cfg):
        return True
    return "image" not in routes and "audio" not in routes and not text_to_text(model)


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation with the ids behind it: what :func:`completions` returns (the server's usage and
    ``finish_reason`` count these ids; the text's own tokens can differ: a byte token decodes to U+FFFD, which
    encodes as three)."""

    text: str  # what complete returns for the prompt
    prompt_ids: list[int]  # the ids the model read (a tokenizer's bos included, a trailing end-of-text left off)
    ids: list[int]  # the ids it generated: through its end id or the token that completed a stop string
    ended: bool  # an end id or a stop string ended it (OpenAI's "stop"); False: a length limit cut it ("length")


def _generated(
    row: list[int], ends: Sequence[int], pad_id: int, fires: Callable[[int], bool] | None
) -> tuple[int, bool]:
    """(how many ids a row of :func:`generate` generated, whether it ended itself) from its generated columns.
    generate pads a row after its end with an id the row may also generate (Llama pads with its end-of-text), so the
    end is found as generate found it: the first end id, or the first step after which ``fires(n)`` (the stop
    strings' check after n ids) is True — at or after the start of the trailing padding, where its end lies."""
    end = next((i + 1 for i, t in enumerate(row) if t in ends), None)
    last = len(row) if end is None else end
    if fires is not None:
        start = len(row)
        while start > 1 and row[start - 1] == pad_id:
            start -= 1
        stopped = next((n for n in range(start, last + 1) if fires(n)), None)
        if stopped is not None:
            return stopped, True
    return last, end is not None


def complete(
    model: MultimodalTransformer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    processor: Processor | None = None,
    streamer: TextStreamer | None = None,
    **decoding: Any,
) -> list[str]:
    """Continuations of prompts by a decoder-only language model (GPT-2, Llama, a model trained with ``lm``).

    Prompts of different lengths are left-padded and decoded together; each continues exactly as it would alone.

    Args:
        prompts: a text, a list of texts (tokenized without a trailing end-of-text), or prompt ids (a (B, P) tensor
            with ``prompt_mask=`` for its padding, or a list of id lists).
        processor: its tokenizer turns text into ids and back; default ``model.processor``.
        decoding: :func:`generate` options (``max_new_tokens``, ``num_beams``, ``top_k``, ``top_p``,
            ``temperature``, ``repetition_penalty``, ``stop_strings``, ``generator``, ...); ``generator``: one, or
            one per prompt (:func:`~mmformer.generation.token_choice.row_generators`), with which a prompt samples
            the same text whatever it is batched with.
        streamer: a :class:`mmformer.generation.streaming.TextStreamer` that receives the continuation of one prompt
            piece by piece while it is decoded (greedy or sampling); its pieces concatenate to the returned text (it
            is told the ``stop_strings``, so it ends where the text is cut).

    Returns:
        The generated text of each prompt (without the prompt): what it adds to the prompt's text, as Hugging Face's
        text-generation pipeline cuts it (a SentencePiece continuation keeps its leading space; see
        :func:`~mmformer.generation.token_choice.text_after`). A row that produced a stop string ends before it
        (as OpenAI's ``stop``; :func:`generate`'s ids keep it, as Hugging Face's do).
    """
    return [c.text for c in completions(model, prompts, processor, streamer, **decoding)]


def completions(
    model: MultimodalTransformer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    processor: Processor | None = None,
    streamer: TextStreamer | None = None,
    **decoding: Any,
) -> list[Completion]:
    """:func:`complete`'s continuations (same arguments) with the prompt ids each read and the ids each generated."""
    processor = processor_with_tokenizer(model, processor, "complete")
    tokenizer = processor.tokenizer
    routes = model.config.routes
    if model.lm_head is None:
        raise ValueError(f"complete: this model has no decoder; its routes are {sorted(routes)}")
    if not continues_prompts(model):
        raise ValueError(
            f"complete: this model's decoder reads an encoder's states (routes {sorted(routes)}): it continues no "
            f"bare prompt — caption an image, transcribe audio, or generate(model, input_ids=...) for a "
            f"text-to-text model"
        )
    rows, from_text = _prompt_rows(tokenizer, prompts)
    context = model.config.text.max_length
    if from_text:
        for i, row in enumerate(rows):
            if len(row) > context:
                raise ValueError(
                    f"prompts[{i}]: {len(row)} tokens exceed the model's context (config.text.max_length="
                    f"{context}); shorten the prompt"
                )
    if isinstance(rows, list) and not ragged(rows):
        rows = torch.tensor(rows, dtype=torch.long)
    if isinstance(rows, torch.Tensor):
        rows = rows.to(model_device(model))
    n_prompt = rows.shape[1] if isinstance(rows, torch.Tensor) else max(len(r) for r in rows)
    names = {f.name for f in fields(DecodingOptions)}
    changes = {k: decoding.pop(k) for k in list(decoding) if k in names}
    options = DecodingOptions.build(decoding.pop("options", None), **changes)
    if streamer is not None:
        streamer.set_stop_strings(options.stop_strings)
    ids = generate(model, prompt_ids=rows, tokenizer=tokenizer, options=options, streamer=streamer, **decoding)
    prompts, generated = _real_prompts(rows, decoding.get("prompt_mask")), ids[:, n_prompt:].tolist()
    texts = [text_after(tokenizer, text_context(tokenizer, p), row) for p, row in zip(prompts, generated)]
    found = None if not options.stop_strings else StopStrings(tokenizer, options.stop_strings, n_prompt)
    if found is not None:
        texts = [found.cut(t) for t in texts]
    ends, pad_id, results = model_end_ids(model), model.config.text.pad_id, []
    for i, (p, row, text) in enumerate(zip(prompts, generated, texts)):
        fires = None if found is None else lambda n, i=i: bool(found(ids[i : i + 1, : n_prompt + n])[0])
        n, ended = _generated(row, ends, pad_id, fires)
        results.append(Completion(text, p, row[:n], ended))
    return results
