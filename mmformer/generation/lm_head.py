"""The LM head of a decoding step on CPU: which GEMM layout computes its logits fastest here
(:func:`head_layout`), and, where a step needs only each row's most likely token (greedy decoding whose score
processors only forbid tokens: a checkpoint's suppressed tokens, the length rules), the float32 argmax found without
computing every float32 logit (:class:`HeadScreen`).

At whisper-tiny's 51,865 × 384 the head is the largest single cost of a decoding step: 80 MB of float32 weight read
for every token at batch 1, at this machine's memory bandwidth (BENCHMARKS.md, "Decoding at whisper-tiny
dimensions"). The screen reads an int8 copy of it (20 MB), bounds how far each approximate logit can be from the
float32 one, and computes in float32 only the rows that can still be the largest: the same token as the float32
head's argmax, in about two thirds of its time. The first greedy decoding of a large head makes its screen (0.18 s
at whisper-tiny, then kept beside the weight) and times it against the whole head's layouts (~0.1 s, once per row
and thread count in the process).

Shape legend: N decoded rows, D width, V vocabulary, C candidate tokens of all rows together.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.generation.token_choice import most_likely
from mmformer.io.weights import is_plain_tensor

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

_FEW_ROWS = 64  # decoding steps of at most this many rows choose their LM head's GEMM layout on CPU (see below)
_LARGE_HEAD = 1 << 22  # weight elements (16 MB in float32) from which the layout is timed (see head_layout)
SCREEN = "int8-screen"  # the layout of a step that returns its rows (N, D) for HeadScreen instead of logits
Adjust = Callable[[torch.Tensor], torch.Tensor]  # score processors that only forbid tokens: scores (N, V) → (N, V)


def last_logits(model: MultimodalTransformer, hidden: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """Decoder states (N, T, D) → float32 logits (N, V) of the last position only (the one generation needs),
    through the LM head's GEMM ``layout`` (:func:`head_layout`; None: the head's own call). With :data:`SCREEN`,
    the last position's states (N, D) themselves: the screen picks the token from them (:func:`screened_ids`)."""
    head = model.lm_head
    if layout is None:  # 3-D as in training: torchao's static int8 layers keep the input rank they were calibrated at
        return head(hidden[:, -1:])[:, 0].float()
    if layout == SCREEN:
        return hidden[:, -1]
    return project(head.weight, hidden[:, -1], layout).float()  # only a plain nn.Linear head has a layout


def head_layout(model: MultimodalTransformer, h: torch.Tensor, ids_only: bool = False) -> str | None:
    """The GEMM layout of the LM head for decoding rows h (N, D), or None where the head runs through its own call.

    For the few rows of a decoding step on CPU, a plain bias-free ``nn.Linear`` LM head chooses its layout: the
    head is the largest single cost of a step at whisper-tiny's 51,865 × 384 (BENCHMARKS.md, "Decoding at
    whisper-tiny dimensions"), and which layout MKL runs fastest differs between CPUs — on a 2-core AMD EPYC
    ``W @ hᵀ`` took 0.6× the time of ``F.linear``'s ``h @ Wᵀ`` and one row ran fastest as two columns (a GEMM
    instead of a single-threaded GEMV), while on an Intel Xeon one row as two columns took 2× ``F.linear``'s time,
    and 8 rows ran in half the time through MKL's packed weight (:func:`_packed_weight`). Where the step needs only
    each row's most likely token (``ids_only``), a large head also times :data:`SCREEN` (:class:`HeadScreen`).
    A large head (:data:`_LARGE_HEAD`) times the layouts once per shape, row count and thread count
    (:func:`_head_layout`); a small one takes ``W @ hᵀ``. Any other head — one that peft wraps (LoRA, trainable
    tokens, modules to save), a subclass — goes through its own call: nothing here reads attributes of a module that
    may not be an ``nn.Linear``. Chosen outside compiled graphs (no timing inside a trace): the decoder runner
    chooses at the prompt and passes the layout to every step, compiled or not (:func:`graph_layout`)."""
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None and h.device.type == "cpu" and h.shape[0] <= _FEW_ROWS:
        weight = head.weight  # (V, D)
        if is_plain_tensor(weight) and h.dtype == weight.dtype:  # not a quantized (tensor subclass) weight
            return "weight-major" if weight.numel() < _LARGE_HEAD else _head_layout(weight, h, ids_only=ids_only)
    return None


def step_logits(model: MultimodalTransformer, out: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A step's output through ``layout`` (:func:`last_logits`) → float32 logits (N, V): the screen's rows (N, D)
    through the whole head, logits as they are."""
    return project(model.lm_head.weight, out, "linear").float() if layout == SCREEN else out


def step_ids(
    model: MultimodalTransformer, out: torch.Tensor, layout: str | None, process: Adjust | None = None
) -> torch.Tensor:
    """A step's output through ``layout`` → each row's most likely token (N,) after ``process`` (processors that
    only forbid tokens): the screen's pick from its rows (:func:`screened_ids`), or the processed logits' argmax."""
    if layout == SCREEN:
        return screened_ids(model.lm_head.weight, out, process)
    return _allowed_argmax(out, process)


def _allowed_argmax(logits: torch.Tensor, process: Adjust | None) -> torch.Tensor:
    """Logits (N, V) → each row's most likely token (N,) among those ``process`` leaves allowed."""
    return most_likely(logits if process is None else process(logits))


def graph_layout(layout: str | None) -> str | None:
    """The layout a compiled step runs for an eager ``layout``: MKL's packed copy lives in a Python cache that a graph
    cannot read, so a packed head runs as ``F.linear`` there (inductor's own GEMM; with freezing, the same packed
    operator); every other layout is a plain product a graph runs as it is (the screen's rows leave the graph)."""
    return "linear" if layout == "mkl-packed" else layout


def weight_state(t: torch.Tensor) -> tuple:
    """Whether ``t`` is still the tensor something was derived from, told without reading it — the one rule for it
    here and in :func:`mmformer.generation.search.frozen_next_logits`: its storage (address), shape, strides, dtype
    and device, which ``param.data = new`` changes (``torch.nn.utils.vector_to_parameters``, ``module.to``,
    ``_apply``), and its version counter, which every in-place write autograd sees moves (an optimizer step,
    ``load_state_dict``, ``weight.mul_`` under ``no_grad``). A tensor subclass (torchao's quantized weights, which
    have no storage of their own): the states of its inner tensors.

    Writes through ``.data`` (``p.data.copy_(q)``: old-style EMA code, weight surgery) change none of these — by
    PyTorch's design ``.data`` is a tensor autograd does not track, with a version counter of its own — and neither
    does a new storage at the address of a freed one: only reading the contents tells those (:func:`content_print`).
    """
    if not is_plain_tensor(t) and hasattr(t, "__tensor_flatten__"):
        parts = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return type(t), t.shape, t.dtype, t.device, t._version, tuple(weight_state(p) for p in parts if p is not None)
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version


_GOLDEN = 0.6180339887498949  # i·φ mod 1: distinct weights for every row index (a Weyl sequence)


def content_print(t: torch.Tensor) -> int:
    """A fingerprint of a floating tensor's contents (V, ...), read in one pass: the float32 sums of its rows,
    weighted by a fixed sequence of distinct numbers and added in float64 in order (a scan: the same bits at any
    thread count, where a threaded sum or dot rounds differently) — the result's bits, so that NaN equals itself.
    It tells a changed row apart (unless the change keeps the row's float32 sum) and a swapped pair of rows (unless
    their sums are equal): old-style EMA code and weight surgery through ``.data``, which :func:`weight_state`
    cannot see. At the speed of ``t.sum()`` (a 51,865 × 384 head on a 2-core AMD EPYC: a product ``W·v``, a GEMV,
    took 2–5× its time; a float64 sum 25–70×, torch reduces that one unvectorized)."""
    rows = t.detach().flatten(1) if t.dim() >= 2 else t.detach().reshape(-1, 1)  # (V, D)
    sums = rows.sum(dim=1, dtype=torch.float32).double()  # (V,)
    weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.float64, device=t.device).mul_(_GOLDEN).frac_()  # (V,)
    return int(sums.mul_(weights).cumsum(0)[-1:].view(torch.int64)) if rows.shape[0] else 0


_contents: dict[int, tuple] = {}  # id(weight) → its (weight_state, content_print) when its contents were last read


def _stamp(weight: torch.Tensor, read: bool = False) -> tuple:
    """The state and contents of ``weight`` a derived copy is keyed on: its :func:`weight_state` now, and its
    :func:`content_print` read now (``read``) or when it was last read — read again where the state changed."""
    state = weight_state(weight)
    held = _contents.get(id(weight))
    if read or held is None or held[0] != state:
        if held is None:
            weakref.finalize(weight, _contents.pop, id(weight), None)  # dropped with the weight (its id may be reused)
        held = _contents[id(weight)] = (state, content_print(weight))
    return held


def recheck_head(model: MultimodalTransformer) -> None:
    """Read the LM head's contents again where copies derived from it are kept (MKL's packed weight, the screen):
    called once per decoding (:class:`~mmformer.generation.search.DecoderRunner`), so that a head rewritten through
    ``.data`` since the last one — which neither its version counter nor its storage shows (:func:`weight_state`) —
    gets new copies instead of decoding with the old ones. One pass over the head (:func:`content_print`): 0.67–0.75 %
    of a greedy decoding of 64 tokens at batch 1 at whisper-tiny dimensions, 0.71–0.86 % of a compiled static one
    (2-core AMD EPYC loaded by other work, 1 thread, two sessions of 9 interleaved runs, medians), and nothing where
    no copy is kept."""
    head = model.lm_head
    if type(head) is nn.Linear:  # the only head whose weight is read for a layout (head_layout)
        weight = head.weight
        if id(weight) in _packed or id(weight) in _screens:
            _stamp(weight, read=True)


def _derived(cache: dict, weight: torch.Tensor, key: object, make: Callable[[], object], keep: int = 1) -> object:
    """What ``make()`` derives from ``weight`` for ``key``, made once and kept in ``cache`` beside the weight, at most
    ``keep`` per weight, dropped with it. Made again once the weight changed: its state (:func:`weight_state`: an
    in-place write autograd sees, ``param.data = new``) at every call; its contents (:func:`content_print`: a write
    through ``.data``) as last read — when a copy is made, and once per decoding (:func:`recheck_head`). A write
    through ``.data`` between two calls outside decoding, or during one decoding, goes unseen until then."""
    held = cache.get(id(weight))
    if held is None:
        held = cache[id(weight)] = {}
        weakref.finalize(weight, cache.pop, id(weight), None)  # dropped with the weight (its id may be reused)
    last = _contents.get(id(weight))
    stamp = _stamp(weight)
    entry = held.get(key)
    if entry is None or entry[0] != stamp:
        if stamp is last:  # a new copy is keyed on the contents it is made from: read them unless just read
            stamp = _stamp(weight, read=True)
        for old in [k for k, (made_from, _) in held.items() if made_from != stamp]:
            del held[old]  # made from other contents: never used again
        while len(held) >= keep:
            held.pop(next(iter(held)))
        entry = held[key] = (stamp, make())
    return entry[1]


_HEAD_LAYOUTS: dict[tuple, str] = {}  # (weight shape, dtype, rows, threads, packed allowed, ids) → the fastest layout
_MKL_PACKED = torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_linear")  # MKL's packed-weight GEMM (x86 builds)
_INT8_ROWS = hasattr(torch, "_weight_int8pack_mm")  # int8 weight × bf16 rows, per-row scales (the screen's product)
_PACKS_PER_WEIGHT = 4  # row counts whose packed copy of a head is kept (each as large as the weight)
_packed: dict[int, dict] = {}  # id(weight) → {rows: (the weight's stamp, packed)}, while it lives (_derived)
_screens: dict[int, dict] = {}  # id(weight) → {None: (the weight's stamp, HeadScreen)}, while it lives


def _packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """MKL's packed copy of ``weight`` for products of ``rows`` rows, made once and kept beside the weight (a changed
    weight is packed again: :func:`_derived`). A float32 GEMM with few rows otherwise packs the whole weight
    into MKL's panel layout at every call: at whisper-tiny's 51,865 × 384 head and 8 rows, 3.8 → 2.0 ms a step
    (Intel Xeon, 2 threads); inductor's frozen CPU graphs use the same operator for their linear layers."""
    make = lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)  # noqa: E731
    return _derived(_packed, weight, rows, make, keep=_PACKS_PER_WEIGHT)


def project(weight: torch.Tensor, h: torch.Tensor, layout: str) -> torch.Tensor:
    """``h @ weightᵀ`` (N, V) of rows h (N, D) and a (V, D) weight, computed in one of the GEMM layouts."""
    if layout == "weight-major":
        return torch.mm(weight, h.t()).t()
    if layout == "two-columns":  # one row computed twice: MKL runs a one-column product as a GEMV, two as a GEMM
        return torch.mm(weight, torch.cat([h, h]).t())[:, :1].t()
    if layout == "mkl-packed":
        rows = h.shape[0]
        return torch.ops.mkl._mkl_linear(h.contiguous(), _packed_weight(weight, rows), weight, None, rows)
    if layout == SCREEN:
        raise ValueError(f"layout: {SCREEN!r} picks token ids (screened_ids), it computes no logits")
    return F.linear(h, weight)


def _head_layout(weight: torch.Tensor, h: torch.Tensor, repeats: int = 3, ids_only: bool = False) -> str:
    """The fastest layout of :func:`project` for this weight, row count and thread count — with ``ids_only``, the
    fastest way to each row's most likely token, :data:`SCREEN` among them: each candidate is timed once (two
    warm-up calls, then the fastest of ``repeats`` calls; ~60 ms in all at whisper-tiny, packing included) on first
    use in the process, and remembered. The layouts compute the same products; their float rounding may differ in
    the last bits."""
    packed = ("mkl-packed",) if _MKL_PACKED and weight.dtype == torch.float32 and not torch.is_grad_enabled() else ()
    screen = ids_only and not torch.is_grad_enabled() and _screenable(weight)
    key = (tuple(weight.shape), weight.dtype, h.shape[0], torch.get_num_threads(), bool(packed), screen)
    layout = _HEAD_LAYOUTS.get(key)
    if layout is None:
        runs: dict[str, Callable[[], torch.Tensor]] = {}
        for name in ("linear", "weight-major", *packed) + (("two-columns",) if h.shape[0] == 1 else ()):
            runs[name] = (lambda n=name: most_likely(project(weight, h, n))) if ids_only else (
                lambda n=name: project(weight, h, n))  # fmt: skip
        if screen and head_screen(weight) is not None:
            runs[SCREEN] = lambda: screened_ids(weight, h)
        seconds = {}
        for name, run in runs.items():
            for _ in range(2):  # warm-up: a new packed weight runs its first calls 2x slower (first touch)
                run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds[name] = min(times)
        layout = _HEAD_LAYOUTS[key] = min(seconds, key=seconds.__getitem__)
        if screen and layout != SCREEN:
            _screens.pop(id(weight), None)  # its int8 copy is not kept for a layout that lost
    return layout


# ---------------------------------------------------------------------- the screened argmax
_BLOCK = 64  # tokens whose largest approximate score is taken together before the candidates are searched
_ROUNDING = 2.0**-8  # relative error of a bf16 logit (2**-9) with room to spare
_ACCUMULATION = 2.0**-10  # the kernel's float32 accumulation, relative to |ĥ|·|Ŵᵢ| (D · 2**-24 at D ≤ 4096)


class HeadScreen:
    """An int8 copy of a float32 LM head (V, D) less its mean row μ — each row's symmetric scale (bf16, as
    ``torch._weight_int8pack_mm`` takes it) and the row in int8 — and the two constants of its error bound, computed
    in float64: the largest residual ‖(Wᵢ − μ) − Ŵᵢ‖ and the largest ‖Ŵᵢ‖ over the rows (Ŵᵢ = sᵢ·qᵢ, the copy's
    row as the kernel reads it). Leaving μ out changes no argmax (every logit moves by h·μ) and shrinks the bound
    where the rows share a direction.

    For states h (N, D) rounded to ĥ = bf16(h), the product aᵢ = ĥ·Ŵᵢ (the kernel's bf16 output) is within

        Eᵢ = ‖h‖·max‖(W − μ) − Ŵ‖ + (‖h − ĥ‖ + 2⁻¹⁰·‖ĥ‖)·max‖Ŵ‖ + 2⁻⁸·|aᵢ|

    of xᵢ = h·(Wᵢ − μ) (Cauchy–Schwarz on the weight's and the states' rounding, plus the kernel's float32
    accumulation and its bf16 output). With m = maxᵢ aᵢ at row j, the true argmax t has x_t ≥ x_j ≥ m − E_j and
    x_t ≤ a_t + E_t; as a ↦ a + 2⁻⁸|a| increases, every such t has a_t ≥ τ, the threshold solving it
    (:meth:`threshold`). The rows of the vocabulary at or above τ — one to a few dozen — get their float32 logits
    h·Wᵢ and the largest is taken, the first of ties, as ``argmax`` does: the float32 head's token. The kernel's
    product is checked against the bound when the screen is made (it was wrong for widths that are not multiples of
    16), and measured over random heads and states at most 0.38 of it (tests/test_lm_head.py).
    """

    def __init__(self, weight: torch.Tensor, chunk: int = 8192):
        # the mean row μ left out: h·Wᵢ − h·μ has the same argmax and, where rows share a direction (a trained
        # head's), a far smaller spread for the bound to cover
        self.center = weight.detach().mean(dim=0)  # (D,)
        w = weight.detach() - self.center  # (V, D)
        scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)  # (V,)
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
        self.q = torch.round(w / self.scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (V, D)
        # a few states to check the kernel with: the bound holds for its float32 accumulation, not for a wrong product
        probe = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # (4, D)
        got = torch._weight_int8pack_mm(probe, self.q, self.scale).double()  # (4, V)
        probe64, center64 = probe.double(), self.center.double()
        residual = norm = 0.0
        for start in range(0, w.shape[0], chunk):  # float64 in slices: a whole 51,865 × 384 copy is 160 MB
            rows = slice(start, start + chunk)
            approx = self.q[rows].double() * self.scale[rows].double()[:, None]  # (chunk, D): Ŵ
            centred = weight[rows].detach().double() - center64  # Wᵢ − μ, exactly
            residual = max(residual, float((centred - approx).norm(dim=1).max()))
            norm = max(norm, float(approx.norm(dim=1).max()))
            slack = _ROUNDING * got[:, rows].abs() + _ACCUMULATION * probe64.norm(dim=1)[:, None] * norm
            if bool(((got[:, rows] - probe64 @ approx.T).abs() > slack).any()):
                raise RuntimeError(f"HeadScreen: torch._weight_int8pack_mm's product is off its bound for a "
                                   f"{tuple(w.shape)} weight on this CPU")  # fmt: skip
        self.residual, self.norm = residual, norm

    def threshold(self, h: torch.Tensor, hb: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """States h (N, D), their bf16 ĥ, each row's largest approximate logit m (N,) → τ (N,): every token whose
        float32 logit can be its row's largest has aᵢ ≥ τ (see the class). In float32, rounded down: the norms'
        rounding is inside the bound's slack (``_ACCUMULATION`` alone is ~100 times the kernel's), and τ is lowered
        by twice 2⁻⁸|y| — g⁻¹(y) ≥ y − |y|·2⁻⁸/(1 − 2⁻⁸) for y of either sign — and by float32's rounding of m."""
        hf = hb.float()
        norms = torch.stack([h, h - hf, hf]).norm(dim=2)  # (3, N): ‖h‖, ‖h − ĥ‖, ‖ĥ‖
        base = norms[0] * self.residual + (norms[1] + _ACCUMULATION * norms[2]) * self.norm  # (N,)
        y = top - 2 * base - _ROUNDING * top.abs()  # a_t + 2⁻⁸|a_t| ≥ y
        return y - 2 * _ROUNDING * y.abs() - 2.0**-20 * (top.abs() + 2 * base)

    def most_likely(self, weight: torch.Tensor, h: torch.Tensor, process: Adjust | None = None) -> torch.Tensor:
        """Float32 states h (N, D) → the id of each row's largest float32 logit h·Wᵢ (N,), the first of ties, among
        the tokens ``process`` leaves allowed (it sets forbidden scores to -inf, or forces one token)."""
        N, V = h.shape[0], weight.shape[0]
        hb = h.to(torch.bfloat16)
        # the scores in blocks of _BLOCK tokens, -inf past the vocabulary: one pass finds each block's largest, and
        # only the few blocks that reach τ are searched (3× faster than comparing and searching every score)
        scores = torch.full((N, -(-V // _BLOCK) * _BLOCK), float("-inf"))  # (N, V')
        approx = scores[:, :V]  # (N, V)
        approx.copy_(torch._weight_int8pack_mm(hb, self.q, self.scale))
        if process is not None:  # a forbidden token is forbidden whatever its score
            processed = process(approx)
            if processed is not approx:
                approx.copy_(processed)
        blocks = scores.view(N, -1, _BLOCK)  # (N, V'/_BLOCK, _BLOCK)
        block_top = blocks.amax(dim=2)  # (N, V'/_BLOCK)
        top = block_top.amax(dim=1)  # (N,)
        tau = self.threshold(h, hb, top).masked_fill_(~torch.isfinite(top), float("inf"))  # no token allowed: none
        r, b = (block_top >= tau[:, None]).nonzero(as_tuple=True)  # the blocks holding a candidate
        k, c = (blocks[r, b] >= tau[r, None]).nonzero(as_tuple=True)  # (C,): which of those, where in its block
        rows, cols = r[k], b[k] * _BLOCK + c  # (C,), (C,)
        exact = (weight[cols] * h[rows]).sum(dim=1)  # (C,) the candidates' float32 logits
        best = torch.full((N,), float("-inf"), dtype=exact.dtype).scatter_reduce(0, rows, exact, "amax")
        first = torch.where(exact == best[rows], cols, V)  # (C,) the largest's id, V elsewhere: the first of ties
        ids = torch.full((N,), V, dtype=torch.long).scatter_reduce(0, rows, first, "amin")
        missing = ids == V  # no allowed token, or NaN / inf in the states: those rows through the whole float32 head
        if bool(missing.any()):
            ids[missing] = _allowed_argmax(F.linear(h, weight), process)[missing]  # every row, as processors expect
        return ids


def _screenable(weight: torch.Tensor) -> bool:
    """Whether torch's int8 kernel can serve a screen of this head: float32, its width a multiple of 16."""
    return _INT8_ROWS and weight.dtype == torch.float32 and weight.shape[1] % 16 == 0


def head_screen(weight: torch.Tensor) -> HeadScreen | None:
    """The screen of a float32 head (V, D), made once and kept beside the weight (made again once it changed) — or
    None where this CPU's int8 kernel cannot serve it: a width D that is not a multiple of 16 (torch 2.14's
    ``_weight_int8pack_mm`` answers such products wrongly or crashes), or a product off its bound when made."""
    if not _screenable(weight):
        return None

    def make() -> HeadScreen | None:
        try:
            return HeadScreen(weight)
        except RuntimeError as error:
            warnings.warn(f"{error}: greedy decoding computes its whole float32 head", RuntimeWarning, stacklevel=3)
            return None

    return _derived(_screens, weight, None, make)


def screened_ids(weight: torch.Tensor, h: torch.Tensor, process: Adjust | None = None) -> torch.Tensor:
    """Float32 states h (N, D) → the float32 head's most likely token of each row (N,) after ``process``
    (processors that only forbid tokens), through its screen (the whole head where there is none)."""
    with torch.no_grad():
        screen = head_screen(weight)
        if screen is None:
            return _allowed_argmax(F.linear(h, weight), process)
        return screen.most_likely(weight.detach(), h, process)
