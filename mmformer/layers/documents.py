"""Packed (padding-free) batches: documents laid back to back along the token axis, and attention that never crosses
a document boundary.

A packed batch holds n documents (captions, transcripts, audio clips, LM documents) in token rows (R, T): each row is
whole documents one after another, so projections and MLPs never compute a padding token. :class:`Documents` says
where each document lies, and every packed operation reads it:

- positions restart at 0 in every document (:attr:`Documents.positions`);
- attention stays inside each document (:func:`document_attention`, called by
  :class:`~mmformer.layers.attention.Attention` when it is given ``documents=``); cross-attention pairs query
  document i with memory document i (or memory row i);
- pooling and losses per document: :meth:`Documents.pad` regroups tokens (R, T, ...) into (n, L, ...) rows padded to
  the longest document, with :attr:`Documents.mask`, the layout the padded code paths already take, and
  :meth:`Documents.unpad` is its inverse.

The attention backends (``backend=``; measured in BENCHMARKS.md, "Packed batches"):

- ``"dense"`` (``"auto"``, the default): the projected queries/keys/values are regrouped per document, (n, nh, L,
  hs) padded to the longest document, and run through the usual fused SDPA path: its key-padding / ``is_causal``
  rules, RoPE (positions 0…L-1 in each row), ALiBi, GQA. Only the attention kernel sees padding, and only up to the
  longest document (long documents of unequal lengths: of their length bucket, :attr:`Documents.buckets`); on
  CUDA it runs the flash kernels. Chosen by measurement: on CPU, FlexAttention has no backward
  (and eager FlexAttention materialises the scores) and nested tensors reach only SDPA's unfused math kernel,
  without causal masking (2.5× slower than dense, non-causal); on an H200 (torch 2.11, bf16, forward + backward of
  one causal layer over 256 COCO-length captions) dense took 1.9 ms, nested jagged tensors 14 ms and compiled
  FlexAttention with a per-batch document block mask 10.5 ms.
- ``"jagged"``: nested jagged tensors (``torch.nested``, ``layout=torch.jagged``) into SDPA, which runs the flash
  varlen kernels on CUDA (cumulative sequence lengths, no padding anywhere) and the math kernel, non-causal only,
  on CPU. No attention bias (ALiBi): that falls back to ``dense``.

Shape legend: R packed rows, T tokens per row, N = R*T tokens, n documents, L longest document, D width,
nh heads, hs head size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "dense", "jagged"]
BACKENDS = ("auto", "dense", "jagged")
BUCKET_MIN_LENGTH = 64  # documents at least this long may run self-attention in length buckets (Documents.buckets)
BUCKET_GAIN = 0.6  # ... when the buckets' padded attention costs at most this fraction of one padded batch


class _Regroup(torch.autograd.Function):
    """Rows of x (M, ...) at ``index`` (K,), where index M reads a row of zeros; its backward is the same kind of
    gather by ``inverse`` (M,) into the K gradient rows (K: zeros). Exact when every row of x is read at most once,
    as regrouping tokens into padded rows reads them; autograd's own backward of a gather is a scatter-add, which
    took 14× the forward's time on CPU (in the packed speech step, a third of the step). ``pads``: whether
    ``index`` / ``inverse`` read the zero row at all (when they do not, no zero row is appended)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pads: tuple[bool, bool]):
        ctx.save_for_backward(inverse)
        ctx.inverse_pads = pads[1]
        return _rows(x, index, pads[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return _rows(grad, inverse, ctx.inverse_pads), None, None, None


def _rows(x: torch.Tensor, index: torch.Tensor, pads: bool) -> torch.Tensor:
    """x's rows at ``index``; with ``pads``, index len(x) reads zeros."""
    if pads:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x.index_select(0, index)


@dataclass(eq=False)
class Bucket:
    """Documents of similar length regrouped into rows (n_b, L_b) padded to their own longest (see
    :attr:`Documents.buckets`)."""

    mask: torch.Tensor  # (n_b, L_b) True at real tokens
    index: torch.Tensor  # (n_b * L_b,) the flat token at each position; N (zeros) at padding
    inverse: torch.Tensor  # (N,) each flat token's position in the bucket's flattened rows; n_b * L_b if not in it


class Documents:
    """Where the documents of a packed batch lie: n runs of ``lengths`` tokens tiling the (R, T) token rows in
    row-major order, none crossing a row's end.

    Build it with :meth:`from_lengths` (a collator that concatenates samples) or :meth:`from_ids` (rows of
    per-token document ids, as an LM packer writes them). Tensors derived from it (positions, the regrouping
    indices) are computed once, on ``lengths``' device.

    A plain class, not a dataclass: it is a layout, not data, and passes through input casts unchanged. FSDP2's
    mixed precision casts a sharded module's floating-point inputs (``_cast_forward_inputs``) and rebuilds every
    dataclass it is given with ``dataclasses.replace``, which would drop the prepared layout and refuses fields
    computed here; a Documents holds no floating-point tensor to cast.

    Args:
        lengths: (n,) tokens of each document, >= 1, in order.
        max_length: the longest document (``lengths.max()``; pass it to save a device sync).
        backend: how attention runs (module docstring).
    """

    def __init__(self, lengths: torch.Tensor, max_length: int = -1, backend: Backend = "auto"):
        if not isinstance(lengths, torch.Tensor) or lengths.ndim != 1 or lengths.numel() == 0:
            got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"lengths: expected a non-empty 1-D tensor of document lengths (n,), got {got}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths: expected integer document lengths, got {lengths.dtype}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        self.lengths = lengths.long()
        self.backend = backend
        host = self.lengths.cpu()
        if int(host.min()) < 1:
            raise ValueError(f"lengths: every document needs at least one token, got {host.tolist()}")
        self.tokens, self.min_length = int(host.sum()), int(host.min())
        self.max_length = int(host.max()) if max_length < 0 else max_length

    def __repr__(self) -> str:
        return f"Documents(n={len(self)}, tokens={self.tokens}, max_length={self.max_length}, backend={self.backend!r})"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[int] | torch.Tensor,
        *,
        device: torch.device | str | None = None,
        backend: Backend = "auto",
    ) -> Documents:
        """Documents of these token counts, back to back."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return cls(lengths.to(device) if device is not None else lengths, backend=backend)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, *, backend: Backend = "auto") -> Documents:
        """Documents of rows (R, T) of per-token document ids: a new document starts at each row and wherever the
        id changes (ids need not be unique across rows; padding may be given its own id, forming its own
        document)."""
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected per-token document ids (R, T), got {got}")
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        first = starts.flatten().nonzero().squeeze(1)  # (n,) flat index of each document's first token
        ends = torch.cat([first[1:], first.new_tensor([ids.numel()])])
        return cls(ends - first, backend=backend)

    def to(self, device: torch.device | str) -> Documents:
        """The same documents with their tensors on ``device``."""
        return Documents(self.lengths.to(device), self.max_length, self.backend)

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def prepare(self) -> Documents:
        """Compute every derived tensor attention reads (positions, the regrouping indices, the buckets) now, once,
        and return self. A :class:`~mmformer.layers.block.Stack` calls it before its blocks: a lazily computed
        property inside a compiled block would break its graph (and the buckets read lengths on the host)."""
        for name in ("offsets", "document_ids", "positions", "mask", "_index", "_inverse"):
            getattr(self, name)
        if self.buckets is not None:
            self._bucket_layout  # noqa: B018  (computed and cached)
        return self

    # ------------------------------------------------------------------ derived layout
    @cached_property
    def offsets(self) -> torch.Tensor:
        """(n + 1,) cumulative lengths: document i is flat tokens offsets[i] … offsets[i+1]-1."""
        return F.pad(self.lengths.cumsum(0), (1, 0))

    @cached_property
    def document_ids(self) -> torch.Tensor:
        """(N,) the document of each token."""
        ids = torch.arange(len(self), device=self.lengths.device)
        return torch.repeat_interleave(ids, self.lengths, output_size=self.tokens)

    @cached_property
    def positions(self) -> torch.Tensor:
        """(N,) each token's position within its document (0 at every document's first token)."""
        flat = torch.arange(self.tokens, device=self.lengths.device)
        return flat - self.offsets[self.document_ids]

    @cached_property
    def mask(self) -> torch.Tensor:
        """(n, L) True at real tokens of the per-document layout of :meth:`pad`."""
        return torch.arange(self.max_length, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def key_mask(self, *, causal: bool = False) -> torch.Tensor | None:
        """The key-padding mask attention over the per-document rows of :meth:`pad` needs, decided from the lengths
        known on the host (no look at device data, so compiled attention holds no data-dependent branch): none for
        causal attention (the rows are right-padded, so ``is_causal`` is exact for every real query, and
        :meth:`unpad` drops the padded ones) or when every document is as long as the longest; else :attr:`mask`.
        While compiling, the mask in both of those non-causal cases (exact for either): a graph would otherwise
        guard on the batch's lengths being equal, and be traced again for the batches where they are not."""
        if causal:
            return None
        if torch.compiler.is_compiling():
            return self.mask
        return None if self.min_length == self.max_length else self.mask

    @cached_property
    def _index(self) -> torch.Tensor:
        """(n * L,) the flat token at each position of the per-document rows; N (a row of zeros) at padding."""
        steps = torch.arange(self.max_length, device=self.lengths.device)[None, :]
        return torch.where(self.mask, self.offsets[:-1, None] + steps, self.tokens).flatten()

    @cached_property
    def _inverse(self) -> torch.Tensor:
        """(N,) each flat token's position in the flattened (n * L) per-document rows."""
        return self.document_ids * self.max_length + self.positions

    def _bucket(self, docs: torch.Tensor) -> Bucket:
        lengths = self.lengths[docs]
        longest = int(lengths.max())
        steps = torch.arange(longest, device=self.lengths.device)[None, :]
        mask = steps < lengths[:, None]
        index = torch.where(mask, self.offsets[docs, None] + steps, self.tokens).flatten()
        inverse = torch.full((self.tokens + 1,), mask.numel(), dtype=torch.long, device=mask.device)
        inverse[index] = torch.arange(mask.numel(), device=mask.device)  # padding positions all write row N
        return Bucket(mask, index, inverse[: self.tokens])

    @cached_property
    def buckets(self) -> list[Bucket] | None:
        """Self-attention over long documents of unequal lengths runs in up to 4 buckets of similar length, each
        padded to its own longest, rather than every document padded to the longest of all: attention costs
        n_b * L_b² per bucket (clips of 2–15 s: about 2.5× less than n * L²). None where one batch is as good:
        documents shorter than :data:`BUCKET_MIN_LENGTH` (extra kernel calls would cost more than the padding), or
        buckets saving less than 1 - :data:`BUCKET_GAIN` of the padded cost."""
        if self.max_length < BUCKET_MIN_LENGTH or len(self) < 2:
            return None
        host = self.lengths.cpu()
        order = host.argsort()
        n = len(host)
        cuts = sorted({round(n * q) for q in (0.25, 0.5, 0.75)} - {0, n})
        groups = [g for g in torch.tensor_split(order, cuts) if len(g)]
        cost = sum(len(g) * int(host[g].max()) ** 2 for g in groups)
        if cost > BUCKET_GAIN * n * self.max_length**2:
            return None
        return [self._bucket(g.to(self.lengths.device)) for g in groups]

    @cached_property
    def _bucket_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (N,), inverse (K,)) between flat tokens and the buckets' flattened rows concatenated (K rows)."""
        sizes = [b.mask.numel() for b in self.buckets]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        index = torch.stack(
            [
                torch.where(b.inverse < size, b.inverse + start, -1)
                for b, size, start in zip(self.buckets, sizes, starts)
            ]
        ).amax(0)
        inverse = torch.cat([b.index for b in self.buckets])
        return index, inverse

    def pad_bucket(self, x: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """Packed (R, T, ...) → the bucket's rows (n_b, L_b, ...), zeros at padding."""
        self._check("x", x, 2)
        flat = x.reshape(self.tokens, *x.shape[2:])
        return _Regroup.apply(flat, bucket.index, bucket.inverse, (True, True)).view(*bucket.mask.shape, *x.shape[2:])

    def unpad_buckets(self, ys: list[torch.Tensor], rows: int = 1) -> torch.Tensor:
        """Each bucket's rows (n_b, L_b, ...) → packed (rows, N / rows, ...), the inverse of :meth:`pad_bucket`."""
        flat = torch.cat([y.reshape(-1, *y.shape[2:]) for y in ys])  # (K, ...)
        index, inverse = self._bucket_layout
        out = _Regroup.apply(flat, index, inverse, (False, True))  # (N, ...)
        return out.view(rows, self.tokens // rows, *out.shape[1:])

    # ------------------------------------------------------------------ regrouping
    def _check(self, name: str, x: torch.Tensor, dims: int) -> None:
        tokens = x.shape[:dims].numel()
        if tokens != self.tokens:
            raise ValueError(
                f"{name}: expected {self.tokens} tokens (the documents' total) in its first {dims} dim(s), got shape "
                f"{tuple(x.shape)}"
            )

    def pad(self, x: torch.Tensor, fill: float | int | None = None) -> torch.Tensor:
        """Packed (R, T, ...) → per-document (n, L, ...), right-padded with zeros (or ``fill``)."""
        self._check("x", x, 2)
        flat = x.reshape(self.tokens, *x.shape[2:])
        out = _Regroup.apply(flat, self._index, self._inverse, (True, False))  # (n * L, ...)
        out = out.view(*self.mask.shape, *x.shape[2:])  # (n, L, ...)
        if fill is not None and fill != 0:
            keep = self.mask.view(*self.mask.shape, *([1] * (out.ndim - 2)))
            out = out.masked_fill(~keep, fill)
        return out

    def unpad(self, y: torch.Tensor, rows: int = 1) -> torch.Tensor:
        """Per-document (n, L, ...) → packed (rows, N / rows, ...), the inverse of :meth:`pad`."""
        if y.shape[:2] != self.mask.shape:
            raise ValueError(f"y: expected per-document rows {tuple(self.mask.shape)} first, got {tuple(y.shape)}")
        flat = _Regroup.apply(y.reshape(-1, *y.shape[2:]), self._inverse, self._index, (False, True))  # (N, ...)
        return flat.view(rows, self.tokens // rows, *y.shape[2:])

    # ------------------------------------------------------------------ attention
    def jagged(self, x: torch.Tensor) -> torch.Tensor:
        """Flat (N, h, hs) → a nested jagged tensor (n, h, j, hs) whose ragged dim is the document."""
        nested = torch.nested.nested_tensor_from_jagged(
            x.contiguous(), self.offsets, min_seqlen=self.min_length, max_seqlen=self.max_length
        )
        return nested.transpose(1, 2)

    def use_jagged(self, *, bias: bool) -> bool:
        """Whether attention over these documents takes the nested-tensor path: only when asked for (``auto`` is
        ``dense``, measured faster on CPU and on an H200), never with an attention bias."""
        return self.backend == "jagged" and not bias


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_docs: Documents,
    kv_docs: Documents,
    *,
    causal: bool,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of packed queries (N, nh, hs) over packed keys/values (M, nkv, hs): query document i reads only
    key document i (causally within it when ``causal``) → (N, nh, hs). The ``jagged`` backend's core; the
    ``dense`` one runs through :class:`~mmformer.layers.attention.Attention` on :meth:`Documents.pad` 'ed rows."""
    if len(q_docs) != len(kv_docs):
        raise ValueError(f"documents: {len(q_docs)} query documents but {len(kv_docs)} key/value documents")
    if k.shape[1] != q.shape[1]:  # GQA: jagged SDPA wants equal head counts
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(
        q_docs.jagged(q), kv_docs.jagged(k), kv_docs.jagged(v), dropout_p=dropout_p, is_causal=causal, scale=scale
    )  # (n, nh, j, hs) nested
    return out.transpose(1, 2).values()  # (N, nh, hs)
