"""Text generation from image or audio memory: greedy decoding, beam search and sampling, with or without a KV cache.

Structure (after Whisper's ``decoding.py``): the options are a frozen, validated :class:`DecodingOptions`; small
strategy classes pick tokens (:class:`Greedy`, :class:`Sampler` with its logit filters :class:`Temperature`,
:class:`TopK`, :class:`TopP`) and run the search (:class:`TokenSearch` for greedy/sampling, :class:`BeamSearch`);
:class:`DecoderRunner` feeds the decoder either incrementally through one preallocated
:class:`~mmformer.layers.cache.KVCache` or from scratch every step (the reference the cache must equal). A
checkpoint's rules (suppressed tokens, Whisper's prompt and language detection) and the length rules
(``min_new_tokens``, ``forced_eos``) live in :mod:`mmformer.decoding_rules`.

Returned ids are the prompt followed by the generated tokens. A row ends at its first ``eos_id`` (kept) and is
right-padded with ``pad_id`` to the longest row; rows that never emit eos run to ``max_new_tokens``, or stop cleanly
where the decoder's position table (``config.text.max_length``) ends.

Shape legend: B batch, K beams, N = B*K decoded rows, P prompt tokens, L tokens so far, V vocabulary,
S memory tokens, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmformer.decoding_rules import LogitRules, default_prompt, logit_rules, prompt_length
from mmformer.embedders.checks import check_token_ids

if TYPE_CHECKING:
    from mmformer.layers.cache import KVCache
    from mmformer.model import MultimodalTransformer
    from mmformer.processor import Processor

_NEG = -1.0e9  # score of beams that must not be chosen (finite, so sums and divisions stay defined)
_CACHE_STEP = 64  # KV cache positions allocated beyond the prompt at first; the cache doubles when it fills up


# ---------------------------------------------------------------------- options
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode: the one place the options, their defaults and their help live (``generate(**options)`` builds
    it, the CLI derives its flags from it). Validated on construction, so a bad option fails before any model work;
    ``replace(options, **changes)`` validates again."""

    max_new_tokens: int = _option(
        30, "tokens generated after the prompt (fewer if every row ends or positions run out)"
    )
    num_beams: int = _option(1, "beam width; > 1 runs beam search")
    top_k: int | None = _option(None, "sample only among the k most likely tokens")
    top_p: float | None = _option(None, "sample only from the most likely tokens whose probability reaches top_p")
    temperature: float = _option(1.0, "logits are divided by it before sampling")
    length_penalty: float = _option(1.0, "beam search scores a hypothesis sum(logprob) / length**length_penalty")
    do_sample: bool | None = _option(None, "sample (True) or pick the most likely token (False); default: sample iff "
                                           "top_k, top_p or a temperature != 1 asks for it")  # fmt: skip
    use_cache: bool = _option(True, "decode incrementally through a KV cache (False recomputes every step)")
    compile: bool = _option(False, "run the cached decoder step through torch.compile (pays off over many calls)")
    min_new_tokens: int = _option(0, "end-of-text is not generated before this many new tokens")
    forced_eos: bool = _option(False, "a row still open at the length limit ends with end-of-text there")
    language: str | None = _option(None, "Whisper: the audio's language code, e.g. en (default: the checkpoint's, "
                                         "else detected from the audio)")  # fmt: skip
    task: str | None = _option(None, "Whisper: transcribe or translate (default: the checkpoint's, else transcribe)")

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams: expected an int >= 1, got {self.num_beams!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(
                f"temperature: expected a number > 0 (do_sample=False decodes greedily), got {self.temperature!r}"
            )
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty: expected a finite number, got {self.length_penalty!r}")
        if self.do_sample not in (None, True, False):
            raise ValueError(f"do_sample: expected None, True or False, got {self.do_sample!r}")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"use_cache: expected True or False, got {self.use_cache!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: expected True or False, got {self.compile!r}")
        if self.compile and not self.use_cache:
            raise ValueError(
                "compile=True compiles the KV-cached decoder step; it needs use_cache=True (got use_cache=False)"
            )
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens: expected an int >= 0, got {self.min_new_tokens!r}")
        if not isinstance(self.forced_eos, bool):
            raise ValueError(f"forced_eos: expected True or False, got {self.forced_eos!r}")
        for name in ("language", "task"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected None or a string, got {getattr(self, name)!r}")
        if self.sample and self.num_beams > 1:
            raise ValueError(
                f"num_beams={self.num_beams} with sampling (do_sample={self.do_sample}, top_k={self.top_k}, "
                f"top_p={self.top_p}, temperature={self.temperature}) is not supported: use num_beams=1 to sample, "
                "or drop the sampling options for beam search"
            )

    @property
    def sample(self) -> bool:
        """Whether tokens are sampled: ``do_sample``, or when it is None, whether a sampling filter is set."""
        if self.do_sample is not None:
            return self.do_sample
        return self.top_k is not None or self.top_p is not None or self.temperature != 1.0

    @classmethod
    def build(cls, options: DecodingOptions | None = None, **changes: Any) -> DecodingOptions:
        """``options`` (default: the defaults) with ``changes`` applied, as whisper's ``replace(options, **kwargs)``;
        an unknown name is a TypeError listing the valid ones."""
        if options is not None and not isinstance(options, DecodingOptions):
            raise TypeError(f"options: expected a DecodingOptions or None, got {type(options).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; expected some of {names}")
        return replace(options or cls(), **changes)


# ---------------------------------------------------------------------- token choice
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


# ---------------------------------------------------------------------- running the decoder
_FEW_ROWS = 64  # decoding steps of at most this many rows project to the vocabulary as (W hᵀ)ᵀ on CPU


def _last_logits(model: MultimodalTransformer, hidden: torch.Tensor) -> torch.Tensor:
    """Decoder states (N, T, D) → float32 logits (N, V) of the last position only (the one generation needs).

    For the few rows of a decoding step on CPU, the (bias-free) LM head runs as ``W @ hᵀ``: that GEMM layout reads
    the (V, D) weight in one pass, where ``F.linear``'s ``h @ Wᵀ`` took 1.6× longer at whisper-tiny's 51,865 × 384
    (the largest single cost of a step; see BENCHMARKS.md, "Decoding at whisper-tiny dimensions")."""
    h = hidden[:, -1]  # (N, D)
    weight = model.lm_head.weight  # (V, D)
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a quantized (tensor subclass) weight
    if (
        plain
        and h.device.type == "cpu"
        and h.shape[0] <= _FEW_ROWS
        and h.dtype == weight.dtype
        and model.lm_head.bias is None
    ):
        return torch.mm(weight, h.t()).t().float()  # (N, V)
    return model.lm_head(h).float()


def _next_logits(
    model: MultimodalTransformer, new: torch.Tensor, memory_mask: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """One cached decoder step without input checks: new ids (N, T) → float32 logits (N, V) of the last one."""
    return _last_logits(model, model.decode_step(new, memory_mask=memory_mask, cache=cache))


_compiled_next_logits: Callable | None = None
_COMPILED_GRAPHS = 64  # compiled variants of the decoder step kept per process (about 16 models)


def compiled_next_logits() -> Callable:
    """:func:`_next_logits` through ``torch.compile``, made on first use and shared by every model (dynamo keeps a
    compiled graph per model; the batch size and cache length are symbolic, so growing sequences and beam reorders
    reuse one graph).

    A model brings a few graphs (beams sharing a memory row or not, a full cache or not, and sizes that were equal
    by chance when a graph was traced: dynamo's "duck shaping", which costs such recompiles but made the steady
    state 10–15% faster here than tracing without it), so dynamo's limit of 8 graphs per function is raised to
    :data:`_COMPILED_GRAPHS` for this function's calls; past it, dynamo falls back to eager decoding with a warning.
    Models of one architecture share graphs (their weights are graph inputs).
    """
    global _compiled_next_logits
    if _compiled_next_logits is None:
        compiled = torch.compile(_next_logits, dynamic=True)

        def step(*args: Any) -> torch.Tensor:
            with torch._dynamo.config.patch(recompile_limit=_COMPILED_GRAPHS):
                return compiled(*args)

        _compiled_next_logits = step
    return _compiled_next_logits


class DecoderRunner:
    """Next-token logits for growing sequences: incrementally through one KV cache, or recomputed from scratch.

    With the cache, the first call feeds the whole prompt and fills the cross-attention keys/values from the
    memory once; later calls feed only the tokens the cache has not seen, and the memory's padding mask (the cached
    keys still need it) but no longer the memory itself.

    The cache starts small and doubles as decoding goes on (up to ``max_length``), so that memory follows the
    tokens actually decoded: with relative positions (RoPE, ALiBi) nothing else bounds ``max_new_tokens``, and a
    cache preallocated for a huge one would take gigabytes before the first token.

    ``memory`` (B, S, D) may serve N = B*K rows, K consecutive ones each (the beams of a sample). ``prefix`` (P, D),
    a learned decoder prefix, is fed before the first token: it fills the cache's first P positions.
    """

    def __init__(
        self,
        model: MultimodalTransformer,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        max_length: int,
        use_cache: bool,
        compile: bool = False,
        prefix: torch.Tensor | None = None,
    ):
        self.model = model
        self.prefix = prefix
        self.n_prefix = 0 if prefix is None else prefix.shape[0]
        if memory_mask is not None and bool(memory_mask.all()):
            memory_mask = None  # nothing padded: no mask to carry and apply at every step
        self.memory, self.memory_mask = memory, memory_mask
        self.max_length = max_length
        self.use_cache = use_cache
        self.step = compiled_next_logits() if compile else _next_logits
        self.cache: KVCache | None = None

    def _reserve(self, rows: int, needed: int) -> None:
        """A cache for ``rows`` sequences with room for ``needed`` positions (it starts small and grows)."""
        needed, limit = needed + self.n_prefix, self.max_length + self.n_prefix
        if self.cache is None:
            self.cache = self.model.make_cache(rows, min(limit, needed + _CACHE_STEP))
        self.cache.ensure(needed, limit=limit, step=_CACHE_STEP)

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens so far (N, L) → float32 logits (N, V) for position L."""
        if self.use_cache:
            self._reserve(*tokens.shape)
        if self.cache is not None and self.cache.length > 0:  # the model's own tokens, one step further: no checks
            seen = self.cache.length - self.n_prefix
            return self.step(self.model, tokens[:, seen:], self.memory_mask, self.cache)
        # the prompt (or, without a cache, everything so far): validated like any user input
        hidden = self.model.decode(
            tokens, self.memory, self.memory_mask, cache=self.cache, return_hidden=True, prefix_embeds=self.prefix
        )
        if self.cache is not None:
            self.memory = None  # the cache now holds the cross-attention keys/values; don't carry (or reorder) it
        return _last_logits(self.model, hidden)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (N,) of the cached self-attention keys/values, as beam search reassigns hypotheses.

        Beam search replaces a beam only with a beam of the same sample, and the beams of a sample share its memory
        rows (and their cross-attention keys/values), so the memory and its mask stay as they are.
        """
        if self.cache is not None:
            self.cache.reorder(index, cross=False)


# ---------------------------------------------------------------------- searches
class TokenSearch:
    """One token per row and step (greedy or sampled); a row that emits eos is padded from then on."""

    def __init__(self, choose: Greedy | Sampler, eos_id: int, pad_id: int, rules: LogitRules | None = None):
        self.choose, self.eos_id, self.pad_id = choose, eos_id, pad_id
        self.rules = rules or LogitRules()

    def run(self, runner: DecoderRunner, prompt: torch.Tensor, max_length: int) -> torch.Tensor:
        """Prompt (B, P) → ids (B, P + generated), at most ``max_length`` long."""
        B, cur = prompt.shape
        n_prompt = cur
        tokens = prompt.new_empty(B, max_length)  # filled up to `cur`; no per-step concatenation
        tokens[:, :cur] = prompt
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        while cur < max_length:
            logits = self.rules(runner.next_logits(tokens[:, :cur]), cur - n_prompt, max_length - cur)  # (B, V)
            next_ids = self.choose(logits)  # (B,)
            next_ids.masked_fill_(done, self.pad_id)
            tokens[:, cur] = next_ids
            cur += 1
            done |= next_ids == self.eos_id
            if bool(done.all()):
                break
        return tokens[:, :cur]


class BeamSearch:
    """Beam search as Hugging Face ``generate`` does it (``early_stopping=False``).

    Each step keeps the 2K best continuations of the K running beams; those ending in eos (or at the length limit)
    among the first K become finished hypotheses scored ``sum(logprob) / generated_length**length_penalty``, the
    best K unfinished ones run on. A sample stops once it has K finished hypotheses and its best running beam can
    no longer beat the worst of them; the best finished hypothesis of each sample is returned.
    """

    def __init__(
        self, num_beams: int, length_penalty: float, eos_id: int, pad_id: int, rules: LogitRules | None = None
    ):
        self.K, self.length_penalty, self.eos_id, self.pad_id = num_beams, length_penalty, eos_id, pad_id
        self.rules = rules or LogitRules()

    def run(self, runner: DecoderRunner, prompt: torch.Tensor, max_length: int) -> torch.Tensor:
        """Prompt (B*K, P), each sample's row repeated K times → best hypotheses (B, P + generated)."""
        K, device = self.K, prompt.device
        B, n_prompt = prompt.shape[0] // K, prompt.shape[1]
        running = prompt.view(B, K, n_prompt)
        running_scores = torch.zeros(B, K, device=device)
        running_scores[:, 1:] = _NEG  # the first step expands only beam 0 (all beams hold the same prompt)
        finished = torch.full((B, K, n_prompt), self.pad_id, dtype=torch.long, device=device)  # widens on merges
        finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
        finished_scores = torch.full((B, K), _NEG, device=device)
        finished_real = torch.zeros(B, K, dtype=torch.bool, device=device)
        improvable = torch.ones(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)[:, None]  # (B, 1)
        cur = n_prompt  # tokens per row so far
        while cur < max_length:
            logprobs = F.log_softmax(runner.next_logits(running.reshape(B * K, cur)), dim=-1)  # (N, V)
            logprobs = self.rules(logprobs, cur - n_prompt, max_length - cur)
            V = logprobs.shape[-1]
            scores = (logprobs.view(B, K, V) + running_scores[..., None]).view(B, K * V)
            n_candidates = min(2 * K, K * V)
            cand_scores, cand = scores.topk(n_candidates, dim=-1)  # (B, 2K)
            cand_beam, cand_token = cand // V, cand % V
            cand_seqs = torch.cat([running[rows, cand_beam], cand_token[..., None]], dim=-1)  # (B, 2K, cur+1)
            ends = (cand_token == self.eos_id) | (cur + 1 >= max_length)  # (B, 2K)

            # the best K continuations that did not end run on
            open_scores = cand_scores + ends.float() * _NEG
            keep = open_scores.topk(K, dim=-1).indices  # (B, K)
            running, running_scores = cand_seqs[rows, keep], open_scores.gather(1, keep)

            # candidates that ended among the first K join the finished hypotheses if they rank in the best K (a
            # step where none ended, most of them, leaves the finished ones as they are: skip the merge)
            generated = cur + 1 - n_prompt
            eligible = ends & (torch.arange(n_candidates, device=device) < K) & improvable[:, None]
            if bool(eligible.any()):
                new_scores = cand_scores / generated**self.length_penalty
                new_scores = new_scores.masked_fill(~eligible, 2 * _NEG)  # below every real or empty slot
                merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, K + 2K)
                best = merged_scores.topk(K, dim=-1).indices  # (B, K)
                # (B, K, cur + 1): as wide as the candidates
                finished = F.pad(finished, (0, cur + 1 - finished.shape[-1]), value=self.pad_id)
                finished = torch.cat([finished, cand_seqs], dim=1)[rows, best]
                finished_len = torch.cat([finished_len, torch.full_like(cand_token, cur + 1)], dim=1).gather(1, best)
                finished_real = torch.cat([finished_real, eligible], dim=1).gather(1, best)
                finished_scores = merged_scores.gather(1, best)

            cur += 1
            best_running = running_scores[:, :1] / generated**self.length_penalty  # (B, 1)
            worst_finished = torch.where(finished_real, finished_scores.min(dim=1, keepdim=True).values, _NEG)
            improvable &= (best_running > worst_finished).any(dim=1)
            if not bool(improvable.any()) or bool(ends.all()):
                break
            runner.reorder((rows * K + cand_beam.gather(1, keep)).view(-1))
        length = int(finished_len[:, 0].max())
        return finished[:, 0, :length]


# ---------------------------------------------------------------------- entry points
def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _memory(
    model: MultimodalTransformer,
    image: torch.Tensor | None,
    audio: torch.Tensor | None,
    audio_lengths: torch.Tensor | None,
    audio_features: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    given = [
        name for name, x in (("image", image), ("audio", audio), ("audio_features", audio_features)) if x is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"generate: expected exactly one of image=, audio=, audio_features= (the memory the decoder reads), "
            f"got {given or 'none'}"
        )
    if audio_lengths is not None and audio is None:
        raise ValueError("audio_lengths: only meaningful with audio= (waveforms); got audio=None")
    if image is not None:
        return model.encode_image_tokens(image)
    if audio is not None:
        return model.encode_audio_tokens(audio, audio_lengths)
    return model.encode_audio_tokens(audio_features=audio_features)


def _prompt(model: MultimodalTransformer, prompt_ids: Any, batch: int, device: torch.device) -> torch.Tensor:
    if prompt_ids is None:
        return torch.full((batch, 1), model.config.text.bos_id, dtype=torch.long, device=device)
    try:
        prompt = torch.as_tensor(prompt_ids, device=device)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise TypeError(
            f"prompt_ids: expected integer ids (B, P) or (P,) as a tensor or lists, got {type(prompt_ids).__name__}"
        ) from e
    if prompt.dtype not in (torch.int64, torch.int32) or prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(
            f"prompt_ids: expected integer ids (B, P) or (P,) with P >= 1, got {tuple(prompt.shape)} {prompt.dtype}"
        )
    prompt = prompt.long()
    if prompt.ndim == 1:
        prompt = prompt.expand(batch, -1)
    if prompt.shape[0] != batch:
        raise ValueError(f"prompt_ids: expected {batch} rows (one per image/audio), got shape {tuple(prompt.shape)}")
    check_token_ids("prompt_ids", prompt, model.config.text.vocab_size, what="ids")
    return prompt


@torch.inference_mode()
def generate(
    model: MultimodalTransformer,
    *,
    image: torch.Tensor | None = None,
    audio: torch.Tensor | None = None,
    audio_lengths: torch.Tensor | None = None,
    audio_features: torch.Tensor | None = None,
    prompt_ids: torch.Tensor | Sequence | None = None,
    prefix_embeds: torch.Tensor | None = None,
    options: DecodingOptions | None = None,
    generator: torch.Generator | None = None,
    **changes: Any,
) -> torch.Tensor:
    """Decode token ids from an image or audio memory.

    Args:
        model: a model with a decoder route.
        image: normalised pixels (B, C, H, W).
        audio: waveforms (B, S) with optional sample counts ``audio_lengths`` (B,).
        audio_features: precomputed log-mel (B, n_mels, frames), as Whisper's ``input_features``.
        prompt_ids: decoder prefix (B, P) or (P,) for every row; default ``[[bos_id]] * B``, or for a checkpoint with
            a generation config (Whisper) its start, language (``language=`` or detected), task and no-timestamps
            tokens. The checkpoint's suppressed tokens are never generated.
        prefix_embeds: a learned decoder prefix (P', D) read before the prompt by every row (prompt tuning; see
            :class:`mmformer.prompts.DecoderPrefix`); it takes P' positions of the decoder's position table.
        options: a :class:`DecodingOptions`; default its defaults.
        generator: random generator for reproducible sampling.
        changes: :class:`DecodingOptions` fields overriding ``options`` (``max_new_tokens=``, ``num_beams=``,
            ``top_k=``, ``top_p=``, ``temperature=``, ``length_penalty=``, ``do_sample=``, ``use_cache=``,
            ``compile=``, ``min_new_tokens=``, ``forced_eos=``, ``language=``, ``task=``).

    Returns:
        LongTensor (B, P + generated): the prompt then the generated tokens; each row ends at its first eos (kept)
        and is padded with ``pad_id``. Decoding stops early, without error, where the decoder's position table ends.
    """
    options = DecodingOptions.build(options, **changes)
    if model.lm_head is None:
        raise ValueError(f"generate: this model has no decoder; its routes are {sorted(model.config.routes)}")
    text = model.config.text
    memory, memory_mask = _memory(model, image, audio, audio_lengths, audio_features)  # (B, S, D), (B, S)
    B = memory.shape[0]
    if B == 0:
        raise ValueError(f"generate: expected at least one image or waveform, got a batch of 0 ({tuple(memory.shape)})")
    if prompt_ids is None:
        prompt = default_prompt(model, options, memory, memory_mask)
    else:
        prompt = _prompt(model, prompt_ids, B, memory.device)
    n_prompt = prompt.shape[1]
    max_length = n_prompt + options.max_new_tokens
    if prefix_embeds is not None:
        model.check_prefix(prefix_embeds, None)
        prefix_embeds = prefix_embeds.to(memory.device)
    n_prefix = 0 if prefix_embeds is None else prefix_embeds.shape[0]
    if text.position != "none":  # absolute positions end with their table: stop there rather than fail
        if n_prefix + n_prompt > text.max_tokens:
            raise ValueError(
                f"prompt_ids: {n_prompt} tokens{f' after a {n_prefix}-vector prefix' if n_prefix else ''} exceed the "
                f"decoder's position table (config.text.max_length={text.max_length})"
            )
        max_length = min(max_length, text.max_tokens - n_prefix)
    if max_length <= n_prompt:
        return prompt

    K = options.num_beams
    if K > 1:
        # (B, P) → (B*K, P): each sample's K beams sit next to each other and share its memory rows (B, S, D),
        # whose cross-attention keys/values are computed and read once per sample
        prompt = prompt.repeat_interleave(K, dim=0)
        rules = logit_rules(model, options)
        search: TokenSearch | BeamSearch = BeamSearch(K, options.length_penalty, text.eos_id, text.pad_id, rules)
    else:
        search = TokenSearch(token_chooser(options, generator), text.eos_id, text.pad_id, logit_rules(model, options))
    runner = DecoderRunner(model, memory, memory_mask, max_length, options.use_cache, options.compile, prefix_embeds)
    return search.run(runner, prompt, max_length)


def _processor(model: MultimodalTransformer, processor: Processor | None, what: str) -> Processor:
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"{what}: turning ids into text needs a Processor with a tokenizer; pass processor=, or use a model "
            f"loaded with one (model.processor); got processor={processor!r}"
        )
    return processor


def _detokenize(model: MultimodalTransformer, processor: Processor, ids: torch.Tensor, decoding: dict) -> list[str]:
    """The generated text of ids from :func:`generate`, without the prompt."""
    prompt = decoding.get("prompt_ids")
    skip = prompt_length(model) if prompt is None else torch.as_tensor(prompt).shape[-1]
    return processor.tokenizer.batch_decode(ids[:, skip:].cpu(), skip_special_tokens=True)


def caption(
    model: MultimodalTransformer, images: Any, processor: Processor | None = None, **decoding: Any
) -> list[str]:
    """Captions of images.

    Args:
        images: normalised ``pixel_values`` (B, C, H, W) as a float tensor, or anything the processor takes (PIL
            images, file paths, numpy arrays, (C, H, W) tensors).
        processor: preprocessing and tokenizer; default ``model.processor``.
        decoding: :func:`generate` options (``max_new_tokens``, ``num_beams``, ...).
    """
    processor = _processor(model, processor, "caption")
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
        pixel_values = images
    else:
        pixel_values = processor(images=images)["pixel_values"]
    ids = generate(model, image=pixel_values.to(_model_device(model)), **decoding)
    return _detokenize(model, processor, ids, decoding)


def transcribe(
    model: MultimodalTransformer,
    waveforms: Any,
    sample_rate: int = 16000,
    processor: Processor | None = None,
    **decoding: Any,
) -> list[str]:
    """Transcripts of speech.

    A model with a fixed audio window (``AudioConfig.pad_to_seconds``: Whisper's 30 s) transcribes longer audio by
    consecutive, non-overlapping windows: [0, 30 s), [30 s, 60 s), ... each decoded on its own (with its own prompt,
    and language detection when no language is chosen); a row's transcript is its windows' texts joined by spaces.
    A word cut by a window boundary may be lost or split (Whisper's own long-form decoding moves its windows by the
    timestamps it predicts; this does not).

    Args:
        waveforms: (B, S) tensor/array or a list of 1-D waveforms recorded at ``sample_rate``, or audio file paths;
            the processor resamples them to the model's rate and pads them.
        sample_rate: the rate of the waveform arrays (file paths carry their own).
        processor: preprocessing and tokenizer; default ``model.processor``.
        decoding: :func:`generate` options.
    """
    processor = _processor(model, processor, "transcribe")
    if model.config.audio is not None:
        processor.check_audio_rate(model.config.audio.sample_rate)
    batch = processor(audio=waveforms, sampling_rate=sample_rate)
    audio, lengths = batch["audio"], batch["audio_lengths"]
    device = _model_device(model)
    window = model.config.audio.window_samples if model.config.audio is not None else 0
    if not window or audio.shape[-1] <= window:
        ids = generate(model, audio=audio.to(device), audio_lengths=lengths.to(device), **decoding)
        return _detokenize(model, processor, ids, decoding)
    parts: list[list[str]] = [[] for _ in range(audio.shape[0])]
    for start in range(0, int(lengths.max()), window):
        rows = (lengths > start).nonzero().flatten()  # the waveforms that reach into this window
        chunk = audio[rows, start : start + window]
        chunk = F.pad(chunk, (0, window - chunk.shape[-1]))  # (b, window): the log-mel pads to it anyway
        chunk_lengths = (lengths[rows] - start).clamp(max=window)
        options = dict(decoding)
        prompt = options.get("prompt_ids")
        if prompt is not None and torch.as_tensor(prompt).ndim == 2:
            options["prompt_ids"] = torch.as_tensor(prompt)[rows]
        ids = generate(model, audio=chunk.to(device), audio_lengths=chunk_lengths.to(device), **options)
        for row, text in zip(rows.tolist(), _detokenize(model, processor, ids, options)):
            parts[row].append(text.strip())
    return [" ".join(p for p in row if p) for row in parts]
