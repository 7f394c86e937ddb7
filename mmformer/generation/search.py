"""Running the decoder token by token (:class:`DecoderRunner`: through one growing KV cache, or from scratch as the
reference the cache must equal) and the searches over it (:class:`TokenSearch` for greedy decoding and sampling,
:class:`BeamSearch` as Hugging Face's ``generate`` runs it).

Shape legend: B batch, K beams, N = B*K decoded rows, P prompt tokens, L tokens so far, V vocabulary,
S memory tokens, D width.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.generation.lm_head import (
    graph_layout,
    head_layout,
    last_logits,
    recheck_head,
    step_ids,
    step_logits,
    weight_state,
)
from mmformer.generation.score_processing import ScoreProcessor, apply_processors, end_ids, masks_only
from mmformer.generation.token_choice import Greedy, Sampler, StopStrings
from mmformer.io.weights import model_device
from mmformer.layers.freezing import FrozenCompile, graph_limit

if TYPE_CHECKING:
    from mmformer.generation.streaming import TextStreamer
    from mmformer.layers.cache import KVCache
    from mmformer.model import MultimodalTransformer

_NEG = -1.0e9  # score of beams that must not be chosen (finite, so sums and divisions stay defined)
CACHE_STEP = 64  # KV cache positions allocated beyond the prompt at first; the cache doubles when it fills up


# ---------------------------------------------------------------------- running the decoder
def _next_logits(
    model: MultimodalTransformer,
    new: torch.Tensor,
    memory_mask: torch.Tensor | None,
    cache: KVCache,
    layout: str | None = None,
) -> torch.Tensor:
    """One cached decoder step without input checks: new ids (N, T) → float32 logits (N, V) of the last one, through
    the LM head's ``layout`` (:func:`~mmformer.generation.lm_head.head_layout`; a constant of a compiled graph) —
    or, for the head's screen, the last one's states (N, D)."""
    return last_logits(model, model.decode_step(new, memory_mask=memory_mask, cache=cache), layout)


_compiled_next_logits: Callable | None = None
_COMPILED_GRAPHS = 64  # compiled variants of the decoder step kept per process (about 16 models)


def compiled_next_logits() -> Callable:
    """:func:`_next_logits` through ``torch.compile``, made on first use and shared by every model (dynamo keeps a
    compiled graph per model; the batch size and cache length are symbolic, so growing sequences and beam reorders
    reuse one graph).

    A model brings a few graphs (beams sharing a memory row or not, and sizes that were equal by chance when a graph
    was traced: dynamo's "duck shaping", which costs such recompiles but made the steady
    state 10–15% faster here than tracing without it), so dynamo's limit of 8 graphs per function is raised to
    :data:`_COMPILED_GRAPHS` for this function's calls; past it, dynamo falls back to eager decoding with a warning.
    Models of one architecture share graphs (their weights are graph inputs).
    """
    global _compiled_next_logits
    if _compiled_next_logits is None:
        _compiled_next_logits = _graph_limited(torch.compile(_next_logits, dynamic=True))
    return _compiled_next_logits


def _graph_limited(compiled: Callable) -> Callable:
    """``compiled`` called with dynamo's graph limit per function raised to :data:`_COMPILED_GRAPHS` (a decoding
    step brings a graph per row count, cache layout or length; past the limit dynamo falls back to eager)."""

    def step(*args: Any) -> torch.Tensor:
        with graph_limit(_COMPILED_GRAPHS):
            return compiled(*args)

    return step


_compiled_static: dict[str | None, Callable] = {}
# the static cache of each model's last compiled decoding, reset and reused by the next one of the same layout: a
# captured CUDA graph replays on the same buffers (a new cache would be captured again)
_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_static_next_logits(model: MultimodalTransformer) -> Callable:
    """:func:`_next_logits` compiled for a :class:`~mmformer.layers.cache.StaticKVCache`: fixed shapes
    (``dynamic=False``) and no host value read inside, so one graph serves every step. On CUDA with
    ``mode="reduce-overhead"``, which captures it as a CUDA graph and replays it (one launch per step; the graph's
    output buffer is reused by the next replay, so the logits are cloned); on CPU with the model's weights frozen
    into the graph (:func:`frozen_next_logits`)."""
    device_type = model_device(model).type
    if device_type == "cpu":
        return frozen_next_logits(model)
    mode = "reduce-overhead" if device_type == "cuda" else None
    if mode not in _compiled_static:
        compiled = _graph_limited(torch.compile(_next_logits, dynamic=False, mode=mode))

        def replay(*args: Any) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args).clone()

        _compiled_static[mode] = compiled if mode is None else replay
    return _compiled_static[mode]


# model → (the state of its weights when its frozen step was compiled, the step, the finalizer releasing it)
_frozen_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_state(model: nn.Module) -> tuple[tuple[int, tuple], ...]:
    """Which tensors the model holds and the state of each (``weight_state`` of :mod:`mmformer.generation.lm_head`: its
    storage, shape, dtype, device and version counter — an optimizer step, ``load_state_dict``, any in-place write
    autograd sees, ``param.data = new``): what a frozen graph folded in. Writes through ``.data`` change none of
    these (see :func:`frozen_next_logits`)."""
    return tuple((id(t), weight_state(t)) for t in (*model.parameters(), *model.buffers()))


def frozen_next_logits(model: MultimodalTransformer) -> Callable:
    """CPU: :func:`_next_logits` compiled for a static cache with inductor's ``freezing``, which folds the model's
    weights into the graph as constants and runs its linear layers on MKL's packed weights (whisper-tiny dimensions,
    8 rows, Intel Xeon: 0.96× → 1.20× eager decoding; BENCHMARKS.md). Frozen weights are the graph's own copy, so
    each model gets a step of its own — compiled from its own copy of the step's code, since dynamo keeps compiled
    graphs per code object — made again once a tensor of the model was replaced, moved or changed in place since it
    was compiled (:func:`_weights_state`: ``load_state_dict``, an optimizer step, ``vector_to_parameters``,
    ``param.data = new``, ``model.to(...)``). Not after a write through ``.data`` (``p.data.copy_(q)``: old-style EMA
    code, weight surgery), which moves neither a tensor's version counter nor its storage: the step then computes
    with the weights it froze. Reading every weight's contents per decoding to see it (as the LM head's copies do,
    :func:`~mmformer.generation.lm_head.recheck_head`) cost 1.8–2.2 % of a compiled greedy decoding of 64 tokens at
    batch 1 at whisper-tiny dimensions (2-core AMD EPYC, 1 thread); write such weights through the parameter instead
    (``with torch.no_grad(): p.copy_(q)``). A step's frozen weights are released when it is replaced and when the
    model is garbage-collected (:class:`~mmformer.layers.freezing.FrozenCompile`). (The cache's buffers stay graph
    inputs: on CPU they are not marked as static addresses, which freezing would fold too —
    :mod:`mmformer.layers.cache`.)

    The step's code around its kernels is inductor's C++ wrapper, not its Python one: at batch 1 a step is ~50
    kernel and library calls around a memory-bound LM head, and the Python wrapper's ~0.3 ms of them was a tenth of
    the step (whisper-tiny dimensions, Intel Xeon: 245 → 231 ms for 64 tokens at batch 1, 495 → 457 ms at batch 8,
    same ids; the first decoding compiles ~4 s longer; BENCHMARKS.md)."""
    state = _weights_state(model)
    held = _frozen_steps.get(model)
    if held is None or held[0] != state:
        if held is not None:
            held[2]()  # the old step's frozen weights released now (torch would keep them for the process's life)
        step = FrozenCompile(_next_logits, graphs=_COMPILED_GRAPHS, inductor={"cpp_wrapper": True})
        held = _frozen_steps[model] = (state, step, step.release_with(model))
    return held[1]


INT8_ACTIVATIONS = ("dynamic", "static")  # torchao methods whose linear layers quantize their inputs


def unseen(tokens: torch.Tensor, seen: int) -> torch.Tensor:
    """The tokens (N, L) after the first ``seen`` ones, (N, L - seen), copied with contiguous strides: one layout at
    every step, since a compiled step guards on its inputs' strides — a beam's rows are views of a stride that grows
    with L, a greedy row's of its buffer's width (a graph per stride: beam search compiled four). Not
    ``contiguous()``, which returns a single row's view as it is (a size-1 dimension's stride does not count for
    contiguity; dynamo still guards on it)."""
    return tokens[:, seen:].clone(memory_format=torch.contiguous_format)


def _check_compilable(model: MultimodalTransformer, rows: int) -> None:
    """Refuse to compile the single-row steps of a model whose torchao linear layers quantize their activations
    (``quantize(model, "dynamic" | "static")``): torch.compile computes those layers wrongly for an input whose
    leading dimensions are all 1 — one row of one token, every step of decoding at batch 1 (a 384-wide layer answered
    up to 2e4 away from its eager output; 2-D inputs and two or more rows are exact; torchao 0.18, torch 2.14,
    BENCHMARKS.md). Eager decoding of such a model is exact, and so is compiled decoding of two or more rows."""
    quantization = getattr(model, "quantization", None)
    method = getattr(quantization, "method", None)
    if rows == 1 and method in INT8_ACTIVATIONS:
        raise ValueError(
            f"compile: a model quantized with torchao's {method!r} int8 method decodes one row wrongly under "
            f"torch.compile (torchao's int8-activation linear layers on a (1, 1, D) input); decode it with "
            f"compile=False, decode two or more rows, or quantize with backend='pt2e'"
        )


class DecoderRunner:
    """Next-token logits for growing sequences: incrementally through one KV cache, or recomputed from scratch.

    With the cache, the first call feeds the whole prompt and fills the cross-attention keys/values from the
    memory once; later calls feed only the tokens the cache has not seen, and the memory's padding mask (the cached
    keys still need it) but no longer the memory itself.

    The cache starts small and doubles as decoding goes on (up to ``max_length``), so that memory follows the
    tokens actually decoded: with relative positions (RoPE, ALiBi) nothing else bounds ``max_new_tokens``, and a
    cache preallocated for a huge one would take gigabytes before the first token.

    ``memory`` (B, S, D) may serve N = B*K rows, K consecutive ones each (the beams of a sample); it is None for a
    decoder-only model. ``prompt_mask`` (N, P) marks the real tokens of left-padded prompts; the cache remembers it
    after the first call, and without a cache every step passes it with the generated tokens (all real) appended.
    ``prefix`` (P', D), a learned decoder prefix, is fed before the first token: it fills the cache's first P'
    positions.

    ``cross_dtype``: the growing cache keeps the cross-attention keys/values in it (bf16: half the bytes a step reads).

    ``static``: the cache is a :class:`~mmformer.layers.cache.StaticKVCache` of ``max_length`` positions, made at
    the first call, whose steps have fixed shapes; with ``compile`` they run through one compiled graph (a CUDA
    graph on a GPU, see :func:`compiled_static_next_logits`).
    """

    def __init__(
        self,
        model: MultimodalTransformer,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        max_length: int,
        use_cache: bool,
        compile: bool = False,
        prefix: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        static: bool = False,
        cross_dtype: torch.dtype | None = None,
    ):
        if static and not use_cache:
            raise ValueError("static: a static KV cache needs use_cache=True")
        recheck_head(model)  # once per decoding: a head rewritten through .data since the last gets new copies
        self.cross_dtype = cross_dtype  # the growing cache's cross-attention keys/values' (None: the memory's)
        self.model = model
        self.prefix = prefix
        self.n_prefix = 0 if prefix is None else prefix.shape[0]
        if memory_mask is not None and bool(memory_mask.all()):
            memory_mask = None  # nothing padded: no mask to carry and apply at every step
        if prompt_mask is not None and bool(prompt_mask.all()):
            prompt_mask = None
        self.memory, self.memory_mask, self.prompt_mask = memory, memory_mask, prompt_mask
        self.max_length = max_length
        self.use_cache, self.static, self.compiled = use_cache, static, compile
        if compile and static:
            self.step = compiled_static_next_logits(model)
        else:
            self.step = compiled_next_logits() if compile else _next_logits
        self._step = self.step  # the step's first call; its later calls, see next_logits
        self.cache: KVCache | None = None
        self.layout: str | None = None  # the LM head's GEMM layout for the steps, chosen at the prompt

    def _reserve(self, rows: int, needed: int) -> None:
        """A cache for ``rows`` sequences with room for ``needed`` positions (it starts small and grows)."""
        needed, limit = needed + self.n_prefix, self.max_length + self.n_prefix
        if self.cache is None:
            self.cache = self._static_cache(rows, limit) if self.static else None
        if self.cache is None:
            size = limit if self.static else min(limit, needed + CACHE_STEP)
            self.cache = self.model.make_cache(rows, size, static=self.static, cross_dtype=self.cross_dtype)
            if self.static and self.compiled:
                _static_caches[self.model] = self.cache
        # one position to spare below the limit: a step that filled the cache would attend to the whole buffer, a
        # contiguous tensor where every other step's keys are a narrowed view, and a compiled step specializes on
        # that (a second graph in every compiled decoding that outgrew its first cache)
        self.cache.ensure(needed + 1 if needed < limit else needed, limit=limit, step=CACHE_STEP)

    def _static_cache(self, rows: int, size: int) -> KVCache | None:
        """The model's static cache from its last compiled decoding, emptied, if it has this layout (else None)."""
        cache = _static_caches.get(self.model) if self.compiled else None
        ref = self.model.text_embed.tokens.weight  # where make_cache puts the cache, in its dtype
        if cache is None or not cache.fits(rows, size, ref.device, ref.dtype):
            return None
        cache.reset()
        return cache

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens so far (N, L) → float32 logits (N, V) for position L."""
        return step_logits(self.model, self._advance(tokens, ids_only=False), self.layout)

    def next_ids(
        self, tokens: torch.Tensor, process: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Tokens so far (N, L) → the most likely token at position L (N,) after ``process``, score processors that
        only forbid tokens (:func:`~mmformer.generation.score_processing.masks_only`): the float32 head's argmax,
        through its screen where that is the fastest way here (:class:`~mmformer.generation.lm_head.HeadScreen`),
        without computing every logit."""
        return step_ids(self.model, self._advance(tokens, ids_only=True), self.layout, process)

    def _advance(self, tokens: torch.Tensor, ids_only: bool) -> torch.Tensor:
        """Tokens so far (N, L) → the step's output for position L: float32 logits (N, V), or the last states
        (N, D) where the head's layout, chosen at the prompt (``ids_only``: for :meth:`next_ids`), is the screen."""
        if self.use_cache:
            self._reserve(*tokens.shape)
        if self.cache is not None and self.cache.length > 0:  # the model's own tokens, one step further: no checks
            seen = self.cache.length - self.n_prefix
            new = unseen(tokens, seen)  # (N, 1)
            out = self._step(self.model, new, self.memory_mask, self.cache, self.layout)
            # every later step has this one's signature (shapes, the same cache and mask): a frozen step is called
            # without the settings only a compile reads (FrozenCompile.again)
            self._step = getattr(self.step, "again", self.step)
            return out
        # the prompt (or, without a cache, everything so far): validated like any user input
        if self.compiled:
            _check_compilable(self.model, tokens.shape[0])
        mask = self.prompt_mask
        if self.cache is None and mask is not None:  # the generated tokens after the prompt are all real
            mask = F.pad(mask, (0, tokens.shape[1] - mask.shape[1]), value=True)  # (N, L)
        hidden = self.model.decode(
            tokens,
            self.memory,
            self.memory_mask,
            attention_mask=mask,
            cache=self.cache,
            return_hidden=True,
            prefix_embeds=self.prefix,
        )
        if self.cache is not None:
            self.memory = None  # the cache now holds the cross-attention keys/values; don't carry (or reorder) it
        layout = head_layout(self.model, hidden[:, -1], ids_only=ids_only)
        self.layout = graph_layout(layout) if self.compiled else layout
        return last_logits(self.model, hidden, layout)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (N,) of the cached self-attention keys/values, as beam search reassigns hypotheses.

        Beam search replaces a beam only with a beam of the same sample, and the beams of a sample share its memory
        rows (and their cross-attention keys/values), so the memory and its mask stay as they are.
        """
        if self.cache is not None:
            self.cache.reorder(index, cross=False)


# ---------------------------------------------------------------------- searches
class TokenSearch:
    """One token per row and step (greedy or sampled); a row that emits eos (or a stop string) is padded from then
    on. Each step's logits go through the score ``processors`` (:mod:`mmformer.generation.score_processing`) before the
    ``chooser`` picks a token."""

    def __init__(
        self,
        chooser: Greedy | Sampler,
        eos_id: int | Sequence[int],
        pad_id: int,
        processors: Sequence[ScoreProcessor] = (),
        stop: StopStrings | None = None,
    ):
        self.chooser, self.eos_ids, self.pad_id = chooser, end_ids(eos_id), pad_id
        self.processors, self.stop = list(processors), stop

    def run(
        self, runner: DecoderRunner, prompt: torch.Tensor, max_length: int, streamer: TextStreamer | None = None
    ) -> torch.Tensor:
        """Prompt (B, P) → ids (B, P + generated), at most ``max_length`` long. A ``streamer``
        (:mod:`mmformer.generation.streaming`; one row) gets the prompt, then each step's token as it is chosen, then
        ``end()``."""
        if streamer is not None:
            streamer.put(prompt.cpu())
        B, cur = prompt.shape
        n_prompt = cur
        # filled up to `cur`, no per-step concatenation; it doubles when full, so that a huge max_length (a "no limit"
        # 10**9) allocates what the rows use, not max_length
        tokens = prompt.new_empty(B, min(max_length, 2 * cur + 64))
        tokens[:, :cur] = prompt
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        # greedy decoding whose processors only forbid tokens needs no scores, only each row's most likely allowed
        # token (a runner may find it without computing every logit: DecoderRunner.next_ids)
        ids_only = type(self.chooser) is Greedy and masks_only(self.processors) and hasattr(runner, "next_ids")
        while cur < max_length:
            if cur == tokens.shape[1]:
                tokens = torch.cat([tokens, tokens.new_empty(B, min(max_length, 2 * cur) - cur)], dim=1)
            so_far = tokens[:, :cur]  # (B, cur)

            def process(
                scores: torch.Tensor, so_far: torch.Tensor = so_far, step: int = cur - n_prompt
            ) -> torch.Tensor:
                return apply_processors(self.processors, scores, so_far, step)  # (B, V)

            if ids_only:
                next_ids = runner.next_ids(so_far, process)  # (B,)
            else:
                next_ids = self.chooser.choose(process(runner.next_logits(so_far)))  # (B,)
            next_ids.masked_fill_(done, self.pad_id)
            tokens[:, cur] = next_ids
            if streamer is not None:
                streamer.put(next_ids.cpu())
            cur += 1
            ended = torch.isin(next_ids, next_ids.new_tensor(self.eos_ids))
            if self.stop is not None:
                ended |= self.stop(tokens[:, :cur], ~done)
            done |= ended
            if bool(done.all()):
                break
        if streamer is not None:
            streamer.end()
        return tokens[:, :cur]


class BeamSearch:
    """Beam search as Hugging Face ``generate`` does it (``early_stopping=False``).

    Each step keeps the 2K best continuations of the K running beams; those ending in eos (or at the length limit)
    among the first K become finished hypotheses scored ``sum(logprob) / generated_length**length_penalty``, the
    best K unfinished ones run on. A sample stops once it has K finished hypotheses and its best running beam can
    no longer beat the worst of them; the best finished hypothesis of each sample is returned. The score
    ``processors`` (:mod:`mmformer.generation.score_processing`) adjust each step's log-probabilities, as Hugging Face
    applies
    its logits processors there.
    """

    def __init__(
        self,
        num_beams: int,
        length_penalty: float,
        eos_id: int | Sequence[int],
        pad_id: int,
        processors: Sequence[ScoreProcessor] = (),
        stop: StopStrings | None = None,
    ):
        self.K, self.length_penalty, self.eos_ids, self.pad_id = num_beams, length_penalty, end_ids(eos_id), pad_id
        self.processors, self.stop = list(processors), stop  # a candidate that makes a stop string ends like eos

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
            rows_so_far = running.reshape(B * K, cur)
            logprobs = F.log_softmax(runner.next_logits(rows_so_far), dim=-1)  # (N, V)
            logprobs = apply_processors(self.processors, logprobs, rows_so_far, cur - n_prompt)
            V = logprobs.shape[-1]
            scores = (logprobs.view(B, K, V) + running_scores[..., None]).view(B, K * V)
            n_candidates = min(2 * K, K * V)
            cand_scores, cand = scores.topk(n_candidates, dim=-1)  # (B, 2K)
            cand_beam, cand_token = cand // V, cand % V
            cand_seqs = torch.cat([running[rows, cand_beam], cand_token[..., None]], dim=-1)  # (B, 2K, cur+1)
            ends = torch.isin(cand_token, cand_token.new_tensor(self.eos_ids)) | (cur + 1 >= max_length)  # (B, 2K)
            if self.stop is not None:
                ends |= self.stop(cand_seqs.flatten(0, 1)).view(B, n_candidates)

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
