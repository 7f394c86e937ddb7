"""The model side of the server: which routes a model serves, input decoding, and one batched function per route
(``(key, payloads) → results``, run on the model thread by :class:`~mmformer.serve.batching.Batcher`). Nothing here
knows about HTTP.

Shape legend: B inputs in a batch, E embedding size, C classes, S audio samples.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch

from mmformer.data.collate import pad_audio
from mmformer.generation.completion import Completion, completions, continues_prompts, prompt_ids
from mmformer.generation.decoding_rules import language_id, reads_memory
from mmformer.generation.options import DecodingOptions
from mmformer.generation.streaming import TextStreamer
from mmformer.generation.token_choice import row_generators
from mmformer.io.weights import model_device
from mmformer.longform import has_timestamps, with_compute_type
from mmformer.longform.options import TranscribeOptions
from mmformer.preprocess.media import check_unicode
from mmformer.serve.transcripts import transcribe_clips
from mmformer.zeroshot import ZeroShotClassifier

ROUTES = ("embeddings", "audio/transcriptions", "completions", "classify", "captions")
# A model call's fixed cost in seconds of (padded) audio: a batch of waveforms is split into calls of similar
# lengths where the padding saved outweighs it. Measured on the digits model (CPU, one thread): a call costs about
# 7 ms plus 1.9 ms per second of padded audio in it, i.e. ~3.7 s; 3 s leans to fewer, larger calls.
CALL_OVERHEAD_S = 3.0


# what each route needs of a model (served_routes' rules, in words: the refusal of a model that serves none)
ROUTE_NEEDS = {
    "embeddings": "an image, audio or text encoder, projected (ModelConfig.embed_dim) or in a model without a decoder",
    "audio/transcriptions": "an audio encoder and a decoder",
    "completions": "a decoder that reads no encoder's states (a language model)",
    "classify": "a text encoder, an image or audio encoder, and a projection (ModelConfig.embed_dim)",
    "captions": "an image encoder and a decoder",
}


def served_routes(model: Any) -> list[str]:
    """The ``/v1/...`` model routes this model can answer (a PT2E int8 model: its float model's, its towers left
    unquantized running in float, but completions, which need a decoder-only model: PT2E does not quantize one).

    Embeddings are the encoders' pooled outputs (``encode_text`` / ``encode_image`` / ``encode_audio``, L2-normalised)
    where they are what the model gives: projected into a joint space (``embed_dim``: CLIP, the digits model), or an
    encoder-only model's, which has no projection (BERT and sentence-transformers models such as all-MiniLM-L6-v2, a
    head-less timm ViT). The encoder of a decoder without a projection (Whisper, T5) feeds the decoder: none."""
    from mmformer.compress.pt2e import PT2EModel

    if isinstance(model, PT2EModel):
        return [route for route in served_routes(model.model) if route != "completions"]
    cfg, has = model.config, model.config.routes
    decoder = model.lm_head is not None
    embeds = "text" in has or "image" in has or "audio" in has
    served = {
        "embeddings": embeds and (cfg.embed_dim is not None or not decoder),
        "audio/transcriptions": decoder and "audio" in has,
        "completions": continues_prompts(model),
        "classify": "text" in has and ("image" in has or "audio" in has) and cfg.embed_dim is not None,
        "captions": decoder and "image" in has,
    }
    return [route for route in ROUTES if served[route]]


def check_serves(model: Any, model_id: str) -> list[str]:
    """:func:`served_routes` of a model that serves one at least; otherwise a ValueError naming ``model_id``, what it
    has and what each route needs (a server with no route would refuse every request)."""
    routes = served_routes(model)
    if routes:
        return routes
    cfg = model.config
    encoders = [m for m in ("image", "audio", "text") if m in cfg.routes]
    if len(encoders) == 1:
        has = [f"{'a' if encoders[0] == 'text' else 'an'} {encoders[0]} encoder"]
    else:
        has = [f"{' and '.join(encoders)} encoders" if encoders else "no encoder"]
    if "decoder" in cfg.routes:
        has.append("a decoder reading an encoder's states" if reads_memory(cfg) else "a decoder")
    else:
        has.append("no decoder")
    has.append("no projection (ModelConfig.embed_dim is None)" if cfg.embed_dim is None else "a projection")
    needs = "; ".join(f"/v1/{route} needs {ROUTE_NEEDS[route]}" for route in ROUTES)
    raise ValueError(f"model: {model_id} can serve none of mmformer serve's routes: it has {', '.join(has)}; {needs}")


def decode_base64(value: Any, param: str) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL (line breaks, as ``base64`` wraps it, allowed);
    ValueError naming ``param`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{param}: expected a base64 string or data URL, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{param}: expected a base64 string or data URL, got an empty string")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise ValueError(f"{param}: expected a base64 data URL (data:<type>;base64,...), got {head!r}")
    value = "".join(value.split())
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{param}: expected base64 data, got {len(value)} characters that are not base64") from None


def sampling(temperature: float, top_p: float | None = None) -> dict[str, Any]:
    """OpenAI's temperature (0 = greedy) as decoding options."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": top_p}


def length_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` split into groups of neighbouring lengths (shortest first), each a model call padded to
    its longest: the split minimising the padded total plus ``overhead`` per call (exact, by dynamic programming
    over the sorted lengths; a batch of waveforms 0.3-1.3 s long pads to ~2x its audio in one call)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(sizes)  # best[j]: the cheapest split of the j shortest
    cut = [0] * (len(sizes) + 1)  # cut[j]: where the last group of that split starts
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            cost = best[i] + overhead + (j - i) * sizes[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(sizes)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def language_names(model: Any) -> dict[str, str]:
    """Language code → name ("en" → "english", as OpenAI's verbose_json names it) of a checkpoint's language tokens,
    from openai-whisper's ``LANGUAGES`` table: mmformer keeps only the codes (``GenerationConfig.language_ids``).
    Empty for a model without language tokens, or without the openai-whisper package (the ``longform`` extra)."""
    gen = model.config.generation
    if gen is None or not gen.language_ids:
        return {}
    try:
        from whisper.tokenizer import LANGUAGES
    except ImportError:
        return {}
    return {code: LANGUAGES[code] for code in gen.language_ids if code in LANGUAGES}


CHARS_PER_TOKEN = 64  # more characters than this a text position: refused without tokenizing


class CompletionKey(NamedTuple):
    """What the prompts of one :meth:`Engine.complete` call share: OpenAI's decoding fields of their requests."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float | None
    stop: tuple[str, ...]
    # sampling's seed (None: unseeded); prompt ``row`` of a request samples with the generator of row ``row`` of
    # that seed, as the ``complete`` command's ``--seed`` samples its ``row``-th prompt: the same text whatever it
    # is batched with (:func:`~mmformer.generation.token_choice.row_generators`)
    seed: int | None = None
    row: int = 0


class Engine:
    """A loaded model and its processor, with the per-route batched functions the server runs."""

    def __init__(self, model: Any, model_id: str, max_classifiers: int = 32, compute_type: str = "float32"):
        if getattr(model, "processor", None) is None:
            raise ValueError(f"model: {model_id} has no processor files (tokenizer.json, preprocessor_config.json)")
        self.model, self.processor, self.model_id = model.eval(), model.processor, model_id
        # transcriptions: the model, or a Whisper checkpoint's int8 (PT2E) / bf16-autocast audio encoder under it
        self.transcriber, self.bf16_encoder, self.compute = with_compute_type(model, compute_type, model_id)
        self.routes = check_serves(model, model_id)
        self.modalities = [m for m in ("image", "audio", "text") if m in model.config.routes]  # what it reads
        self.device = model_device(model)
        self._classifiers: OrderedDict[Hashable, ZeroShotClassifier] = OrderedDict()
        self._max_classifiers = max_classifiers
        self._language_names = language_names(model)

    # ------------------------------------------------------------------ inputs (request side)
    def check_reads(self, modality: str, param: str) -> None:
        """ValueError naming ``param`` for an input of a modality this model has no encoder for (an image sent to a
        text-only model's embeddings)."""
        if modality not in self.modalities:
            raise ValueError(f"{param}: this model has no {modality} encoder: expected {' or '.join(self.modalities)} "
                             f"input, got {modality}")  # fmt: skip

    def load_image(self, data: bytes, param: str) -> torch.Tensor:
        """(C, H, W) pixels of an encoded image; SampleError naming ``param`` when it does not decode."""
        self.check_reads("image", param)
        return self.processor.load_image(data, name=param)

    def load_audio(self, data: bytes, param: str) -> torch.Tensor:
        """(S,) waveform at the model's rate of an encoded audio file; SampleError naming ``param``."""
        self.check_reads("audio", param)
        return self.processor.load_audio(data, name=param)

    def load_recording(self, data: bytes, param: str, max_seconds: float | None = None) -> torch.Tensor:
        """(S,) mono waveform at the model's rate of a whole recording (no cut: the long-form path reads any length);
        SampleError naming ``param``, :class:`~mmformer.preprocess.media.AudioTooLongError` for a recording longer
        than ``max_seconds``, whose decoding stops there (the server's ``--max-audio-seconds``: a few hundred KB of
        FLAC silence can claim hours)."""
        from mmformer.data.io import read_audio

        self.check_reads("audio", param)
        rate = self.model.config.audio.sample_rate
        return read_audio(data, rate, mono=True, name=param, refuse_longer_than=max_seconds)[0]

    def text_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer.encode(text))

    def check_text(self, text: str, param: str) -> None:
        """ValueError naming ``param`` for a text the text encoder cannot read whole (checked per request input, not
        in the model's batch, where a message could name neither the input nor its real length): not valid Unicode,
        or more tokens than the position table holds — counted untruncated, except that a text of more than
        :data:`CHARS_PER_TOKEN` characters a position is refused uncounted (20 MB of text took 48 s to tokenize)."""
        check_unicode(text, param)
        cfg = self.model.config.text
        if cfg is None or cfg.position == "none":  # relative positions: no table to outgrow
            return
        limit = cfg.max_tokens
        self._check_chars(text, param, limit)
        if (n := self.text_tokens(text)) > limit:
            raise ValueError(f"{param}: {n} tokens; this model reads at most {limit} (TextConfig.max_length)")

    @staticmethod
    def _check_chars(text: str, param: str, limit: int) -> None:
        """Refuse uncounted a text of more than :data:`CHARS_PER_TOKEN` characters for each of ``limit`` tokens."""
        if len(text) > CHARS_PER_TOKEN * limit:
            raise ValueError(f"{param}: {len(text):,} characters; this model reads at most {limit} tokens "
                             f"(texts over {CHARS_PER_TOKEN * limit:,} characters are refused uncounted)")  # fmt: skip

    def prompt_ids(self, text: str, param: str) -> list[int]:
        """The ids a completion of ``text`` reads, as :func:`~mmformer.generation.completion.completions` tokenizes a
        prompt (without a trailing end-of-text, which would end it); ValueError naming ``param`` for a prompt it
        would refuse: not valid Unicode, no tokens, or more than the model's context (``config.text.max_length``;
        :meth:`check_text`'s character limit first). Checked per request, where the message can name the prompt's
        index in it: in a batch it is one among other requests' prompts."""
        cfg, tokenizer = self.model.config.text, self.processor.tokenizer
        self._check_chars(text, param, cfg.max_tokens)
        ids = prompt_ids(tokenizer, text, param)
        if len(ids) > cfg.max_tokens:
            raise ValueError(f"{param}: {len(ids)} tokens exceed the model's context (config.text.max_length="
                             f"{cfg.max_length}); shorten the prompt")  # fmt: skip
        return ids

    @property
    def completion_context(self) -> int | None:
        """How many positions a completion's prompt and generated tokens share: the position table's (absolute
        positions: :func:`~mmformer.generation.decoding.generate` would stop where it ends); None for relative
        positions (RoPE, ALiBi), which decode on past ``config.text.max_length``."""
        cfg = self.model.config.text
        return None if cfg.position == "none" else cfg.max_tokens

    # ------------------------------------------------------------------ batched work (model thread)
    @torch.inference_mode()
    def embed(self, modality: Hashable, payloads: Sequence[Any]) -> list[torch.Tensor]:
        """(E,) float32 embeddings of texts, (C, H, W) pixels or (S,) waveforms, all of one ``modality``."""
        model = self.model
        if modality == "text":
            batch = self.processor(text=list(payloads))
            out = model.encode_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        elif modality == "image":
            out = model.encode_image(torch.stack(list(payloads)).to(self.device))  # (B, C, H, W) → (B, E)
        else:
            return self.by_length(payloads, self._encode_audio)
        return list(out.float().cpu())

    def _encode_audio(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        audio, lengths = pad_audio(waves)  # (B, S), (B,)
        return list(self.model.encode_audio(audio.to(self.device), lengths.to(self.device)).float().cpu())

    def by_length(self, waves: Sequence[torch.Tensor], run: Callable[[list[torch.Tensor]], list[Any]]) -> list[Any]:
        """``run``'s results of (S,) waveforms, called on groups of similar lengths (:func:`length_groups`), in the
        waveforms' order."""
        overhead = round(CALL_OVERHEAD_S * self.model.config.audio.sample_rate)
        results: list[Any] = [None] * len(waves)
        for group in length_groups([w.shape[-1] for w in waves], overhead):
            for i, result in zip(group, run([waves[i] for i in group])):
                results[i] = result
        return results

    @property
    def whisper(self) -> bool:
        """A Whisper checkpoint: transcribed by openai-whisper's algorithm, which can also align words and take a
        previous-text prompt (:class:`~mmformer.longform.options.TranscribeOptions`)."""
        return has_timestamps(self.model)

    def language_name(self, code: str | None) -> str | None:
        """A result's language as OpenAI names it ("english"); None stays None (a model without language tokens:
        it refuses ``language`` and detects none) and a code without a known name is left as it is."""
        return self._language_names.get(code, code) if code is not None else None

    def check_language(self, language: str | None) -> str | None:
        """The code of ``language`` as the model's language tokens name it ("EN", "<|en|>" → "en"); ValueError naming
        ``language`` unless the model has that language's token (None: any model)."""
        if language is None:
            return None
        token = language_id(self.model, language)
        return next(code for code, i in self.model.config.generation.language_ids.items() if i == token)

    def transcribe(
        self,
        key: Hashable,
        waves: Sequence[torch.Tensor],
        on_segment: Callable[[dict], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Results of waveforms decoded together; ``on_segment`` (one waveform: a streamed request) gets its
        segments in order as they are decoded; ``stop()``, asked between windows, ends the call when True (its
        clients went away: :class:`~mmformer.serve.batching.Abandoned`). ``key``: (language, temperature, word
        timestamps, prompt), the last two for a Whisper checkpoint only."""
        language, temperature, words, prompt = key
        if self.whisper:  # one temperature, no fallback: the request's
            options = TranscribeOptions(temperature=temperature, language=language, word_timestamps=words,
                                        initial_prompt=prompt)  # fmt: skip
        elif words or prompt:
            raise ValueError("timestamp_granularities[], prompt: word timestamps and a text prompt need a Whisper "
                             f"checkpoint; {self.model_id} is not one")  # fmt: skip
        else:
            options = DecodingOptions(language=language, **sampling(temperature))
        each = None if on_segment is None else lambda index, segment: on_segment(segment)
        with torch.inference_mode():
            return transcribe_clips(self.transcriber, waves, options, on_segment=each, bf16_encoder=self.bf16_encoder,
                                    stop=stop)  # fmt: skip

    def complete(
        self, key: Hashable, prompts: Sequence[str | list[int]], streamer: TextStreamer | None = None
    ) -> list[Completion]:
        """Completions of prompts (texts, or :meth:`prompt_ids`) decoded together, each with the ids it read and
        generated (what the usage counts); with a ``streamer`` (one prompt: a streamed request) it gets the text
        piece by piece as it is decoded. ``key``: a :class:`CompletionKey` (or the tuple of its fields)."""
        key = CompletionKey(*key)
        options = DecodingOptions(max_new_tokens=key.max_tokens, stop_strings=key.stop,
                                  **sampling(key.temperature, key.top_p))  # fmt: skip
        generator = None
        if key.seed is not None:  # one per prompt, each row `key.row`'s (the others are other requests' prompts)
            generator = [row_generators(key.seed, 1, self.device, first=key.row)[0] for _ in prompts]
        with torch.inference_mode():
            return completions(self.model, list(prompts), options=options, streamer=streamer, generator=generator)

    def caption(self, key: Hashable, pixels: Sequence[torch.Tensor]) -> list[str]:
        with torch.inference_mode():
            return self.model.caption(torch.stack(list(pixels)).to(self.device), options=DecodingOptions(**sampling(0)))

    def classifier(self, modality: str, labels: tuple[str, ...], templates: tuple[str, ...]) -> ZeroShotClassifier:
        """A zero-shot classifier per (modality, labels, templates), its class embeddings cached (least recently
        used dropped first)."""
        key = (modality, labels, templates)
        if key not in self._classifiers:
            self._classifiers[key] = ZeroShotClassifier(
                self.model, self.processor, classnames=list(labels), templates=list(templates), modality=modality
            )
            while len(self._classifiers) > self._max_classifiers:
                self._classifiers.popitem(last=False)
        self._classifiers.move_to_end(key)
        return self._classifiers[key]

    @torch.inference_mode()
    def classify(self, key: Hashable, payloads: Sequence[torch.Tensor]) -> list[list[float]]:
        """Per input, the probability of each label (in the labels' order). In inference mode, as the engine's other
        batched work: a compiled graph (PT2E int8) called with inference tensors by one route and ordinary tensors by
        another compiles twice (dynamo guards on the inputs' dispatch keys)."""
        modality, labels, templates = key
        clf = self.classifier(modality, labels, templates)
        if modality == "image":
            probs = clf.predict_proba(torch.stack(list(payloads)))  # (B, C)
            return probs.tolist()

        def run(waves: list[torch.Tensor]) -> list[list[float]]:
            audio, lengths = pad_audio(waves)  # (B, S), (B,)
            return clf.predict_proba(audio, lengths=lengths).tolist()  # (B, C)

        return self.by_length(payloads, run)
