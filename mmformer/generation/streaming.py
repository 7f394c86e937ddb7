"""Receiving generated text while it is decoded, as Hugging Face's streamers do (``TextStreamer``,
``TextIteratorStreamer``, ``AsyncTextIteratorStreamer``): the search calls ``put(ids)`` with the prompt once and then
with each step's new token, and ``end()`` when it stops (:meth:`mmformer.generation.search.TokenSearch.run`); the
streamer turns them into text pieces and hands each to :meth:`TextStreamer.on_text`.

A piece is sent only once it is stable: the ids so far are detokenized after the prompt's last tokens, as ``complete``
decodes its text (:func:`~mmformer.generation.token_choice.text_after`: a SentencePiece continuation keeps its leading
space), and the new suffix of that text is sent, holding back a trailing replacement character (a multi-byte UTF-8
character whose remaining bytes come with the next tokens) and, when stop strings are set (``complete`` sets its own),
any tail that may still grow into one. The pieces therefore concatenate to exactly the text ``complete`` returns. Each
step decodes the whole continuation (O(L²) characters over L tokens; negligible beside a decoder step at the lengths
served).

Only one row can be streamed (batch size 1) and beam search cannot stream (its final tokens are known only at the
end): ``generate`` refuses both, as Hugging Face does.

Shape legend: P prompt tokens.
"""

from __future__ import annotations

import asyncio
import queue
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from mmformer.generation.token_choice import text_after, text_context


class StreamCancelled(Exception):
    """Raised by :meth:`TextStreamer.put` once :meth:`TextStreamer.cancel` was called: it ends the generation that
    feeds the streamer (a client that went away)."""


class TextStreamer:
    """Turns streamed token ids into stable text pieces; by itself it prints them (as Hugging Face's ``TextStreamer``),
    subclasses override :meth:`on_text`.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...) -> str``.
        skip_prompt: leave the first ``put`` (the prompt) out of the text.
        skip_special_tokens: passed to ``decode`` (end-of-text and padding give no text).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, skip_special_tokens: bool = True):
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer: expected an object with decode(ids), got {type(tokenizer).__name__}")
        self.tokenizer, self.skip_prompt, self.skip_special_tokens = tokenizer, skip_prompt, skip_special_tokens
        self.stop_strings: tuple[str, ...] = ()
        self.cancelled = False
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._context: list[int] = []  # the prompt's last ids that the text of _ids is decoded after
        self._sent = ""  # the text handed to on_text so far
        self._prompt_next = True

    def set_stop_strings(self, strings: Sequence[str]) -> None:
        """End the text before the first of ``strings`` (as ``complete`` cuts its result) and hold back any tail that
        may still become one."""
        if isinstance(strings, str) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"strings: expected a list of non-empty strings, got {strings!r}")
        self.stop_strings = tuple(strings)

    def cancel(self) -> None:
        """Make the next :meth:`put` raise :class:`StreamCancelled` (callable from any thread)."""
        self.cancelled = True

    def put(self, value: torch.Tensor) -> None:
        """The prompt (1, P) / (P,) on the first call, then one step's token (1,); sends the text that became stable."""
        if self.cancelled:
            raise StreamCancelled("the stream was cancelled")
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError(f"value: a streamer takes one row (batch size 1), got shape {tuple(value.shape)}")
        ids = value.reshape(-1).tolist()
        if self._prompt_next:
            self._prompt_next = False
            if self.skip_prompt:
                self._context = text_context(self.tokenizer, ids, self.skip_special_tokens)
                return
        self._ids += ids
        self._send(self._stable(self._decode(), final=False))

    def end(self) -> None:
        """Send what was held back (the final text, cut before a stop string), then the end of the stream."""
        self._send(self._stable(self._decode(), final=True), final=True)
        self._reset()
        self.on_text("", stream_end=True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        """A new piece of text (``stream_end``: the stream is over; ``text`` is then empty)."""
        print(text, flush=True, end="" if not stream_end else "\n")

    # ------------------------------------------------------------------ text
    def _decode(self) -> str:
        return text_after(self.tokenizer, self._context, self._ids, self.skip_special_tokens)

    def _stable(self, text: str, final: bool) -> str:
        """The part of ``text`` that can no longer change: before a stop string; without a trailing replacement
        character or a tail that begins a stop string unless ``final``."""
        hits = [text.find(s) for s in self.stop_strings if s in text]
        if hits:
            return text[: min(hits)]
        if final:
            return text
        text = text.rstrip("\ufffd")  # the first bytes of a character whose other bytes are still to come
        for k in range(min(len(text), max((len(s) for s in self.stop_strings), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop_strings):
                return text[:-k]
        return text

    def _send(self, text: str, final: bool = False) -> None:
        if not text.startswith(self._sent):  # a decoder that rewrote text already sent: wait until it extends it
            if final:
                warnings.warn(
                    f"streamer: the tokenizer's final text does not extend the {len(self._sent)} characters already "
                    f"streamed ({self._sent[-20:]!r}...); the pieces differ from the returned text",
                    stacklevel=3,
                )
            return
        if len(text) > len(self._sent):
            piece, self._sent = text[len(self._sent) :], text
            self.on_text(piece)


_END = object()


class TextIteratorStreamer(TextStreamer):
    """The pieces as an iterator, for a consumer in another thread than the generation (Hugging Face's design):
    ``Thread(target=model.complete, kwargs={..., "streamer": s}).start(); for piece in s: ...``.

    ``timeout``: seconds to wait for each piece (``queue.Empty`` after it). :meth:`fail` hands an error of the
    generating thread to the consumer, which raises it.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, timeout: float | None = None, **kw: Any):
        super().__init__(tokenizer, skip_prompt, **kw)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(_END)

    def fail(self, error: BaseException) -> None:
        """End the iteration by raising ``error`` (the generation failed)."""
        self.queue.put(error)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.queue.get(timeout=self.timeout)
        if value is _END:
            raise StopIteration
        if isinstance(value, BaseException):
            raise value
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """The pieces as an async iterator, for an event loop while the generation runs in a worker thread (Hugging
    Face's ``AsyncTextIteratorStreamer``). Create it inside the running loop; ``put``/``end``/``fail`` may be called
    from any thread."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, timeout: float | None = None, **kw: Any):
        super().__init__(tokenizer, skip_prompt, **kw)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timeout = timeout

    def _put(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._put(text)
        if stream_end:
            self._put(_END)

    def fail(self, error: BaseException) -> None:
        """End the iteration by raising ``error`` (the generation failed)."""
        self._put(error)

    def __aiter__(self) -> AsyncTextIteratorStreamer:
        return self

    async def __anext__(self) -> str:
        value = await asyncio.wait_for(self.queue.get(), self.timeout)
        if value is _END:
            raise StopAsyncIteration
        if isinstance(value, BaseException):
            raise value
        return value
