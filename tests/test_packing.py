"""Packed (padding-free) batches: :class:`mmformer.layers.Documents` regroups tokens exactly; packed attention equals
each document run alone, for every attention variant; a document never attends across its boundary; and a packed
training batch gives the padded batch's losses and gradients (≤ 1e-5, float32) for contrastive, captioning and
speech (+ CTC) batches.

Shape legend: R packed rows, T tokens per row, n documents, L longest document, D width.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmformer.config import StackConfig
from mmformer.data.collate import Collator
from mmformer.data.packing import TokenBudgetSampler, budget_batches
from mmformer.layers import Attention, Documents, Stack
from mmformer.model import MultimodalTransformer, pack
from mmformer.tasks import MultimodalTask
from mmformer.tasks.losses import IGNORE_INDEX, document_targets, teacher_forcing
from tests.test_task import Digits, tiny_config, tokenizer

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-5
LENGTHS = [5, 1, 7, 3]


# ---------------------------------------------------------------- Documents
def test_documents_layout_and_round_trip():
    docs = Documents.from_lengths(LENGTHS)
    assert docs.tokens == 16 and docs.max_length == 7 and len(docs) == 4
    assert docs.offsets.tolist() == [0, 5, 6, 13, 16]
    assert docs.positions.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert docs.mask.sum(dim=1).tolist() == LENGTHS
    x = torch.randn(2, 8, 3)  # two rows of 8 tokens hold the 16 tokens (no document crosses a row's end)
    docs = Documents.from_lengths([5, 3, 2, 6])
    padded = docs.pad(x, fill=0.0)  # (n, L, 3)
    assert padded.shape == (4, 6, 3) and torch.equal(padded[1, :3], x[0, 5:8]) and not padded[1, 3:].any()
    assert torch.equal(docs.unpad(padded, rows=2), x)


@pytest.mark.parametrize("lengths", [LENGTHS, [70, 5, 130, 20, 90, 100]], ids=["short", "bucketed"])
def test_regrouping_gradients_equal_plain_slicing(lengths):
    """pad / unpad (and the length buckets) use a gather whose backward is a gather: equal to autograd's own."""
    import torch.nn.functional as F

    docs = Documents.from_lengths(lengths)
    x = torch.randn(1, docs.tokens, 3, requires_grad=True)
    weight = torch.randn(len(lengths), docs.max_length, 3)
    reference = torch.stack([F.pad(p, (0, 0, 0, docs.max_length - len(p))) for p in x[0].split(lengths)])
    grads = [torch.autograd.grad((pad * weight).sum(), x)[0] for pad in (docs.pad(x), reference)]
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    assert torch.equal(docs.pad(x), reference)
    y = torch.randn(len(lengths), docs.max_length, 3, requires_grad=True)
    back = torch.autograd.grad((docs.unpad(y) * x.detach()).sum(), y)[0]
    assert torch.equal(back, docs.pad(x.detach()))
    if docs.buckets is not None:
        parts = [docs.pad_bucket(x, b) for b in docs.buckets]
        torch.testing.assert_close(docs.unpad_buckets(parts), x, atol=0, rtol=0)
        w = torch.randn_like(x)
        grad = torch.autograd.grad((docs.unpad_buckets([p * 2 for p in parts]) * w).sum(), x)[0]
        torch.testing.assert_close(grad, 2 * w, atol=1e-6, rtol=0)


def test_documents_from_ids_cut_at_id_changes_and_row_starts():
    ids = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2]])  # the id 1 continues into row 1: still a new document
    assert Documents.from_ids(ids).lengths.tolist() == [2, 3, 2, 3]


def test_documents_refuse_bad_input():
    with pytest.raises(ValueError, match="lengths"):
        Documents.from_lengths([3, 0])
    with pytest.raises(TypeError, match="lengths"):
        Documents(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="backend"):
        Documents.from_lengths([2], backend="flash")
    with pytest.raises(ValueError, match="16 tokens"):
        Documents.from_lengths(LENGTHS).pad(torch.zeros(1, 15, 2))
    with pytest.raises(ValueError, match="right-padded"):
        pack(torch.zeros(1, 3, 2), torch.tensor([[True, False, True]]))


def test_documents_pass_fsdp_mixed_precision_input_cast_unchanged():
    """FSDP2 with ``param_dtype`` casts a sharded block's floating-point inputs before its forward, rebuilding every
    dataclass among them (``dataclasses.replace``): a packed batch's Documents passes through as the same object,
    its prepared integer layout neither cast nor recomputed, while the tokens are cast."""
    from functools import partial

    from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
    from torch.distributed.utils import _apply_to_tensors

    docs = Documents.from_lengths(LONG).prepare()  # long documents: the length buckets too
    layout = {name: getattr(docs, name).clone() for name in ("lengths", "offsets", "positions", "_index", "_inverse")}
    cast = partial(_cast_fp_tensor, torch.bfloat16)  # what FSDPState._cast_forward_inputs applies
    (x,), kwargs = (
        _apply_to_tensors(cast, (torch.randn(1, docs.tokens, 4),)),
        _apply_to_tensors(cast, {"documents": docs, "memory_documents": None, "causal": True}),
    )
    assert x.dtype == torch.bfloat16 and kwargs["documents"] is docs and kwargs["causal"] is True
    for name, value in layout.items():
        assert getattr(docs, name).dtype == torch.long and torch.equal(getattr(docs, name), value), name
    assert (docs.tokens, docs.min_length, docs.max_length) == (sum(LONG), min(LONG), max(LONG))
    assert docs.buckets is not None and all(b.index.dtype == torch.long for b in docs.buckets)


# ---------------------------------------------------------------- attention
VARIANTS = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "rope_qk_norm": dict(position="rope", qk_norm=True),
    "alibi": dict(position="alibi"),
}


LONG = [70, 5, 130, 20, 90, 100]  # long, unequal documents: self-attention runs in length buckets


@pytest.mark.parametrize("lengths", [LENGTHS, LONG], ids=["short", "long"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_self_attention_equals_each_document_alone(variant, causal, lengths):
    attn = Attention(StackConfig(width=16, n_heads=4, **VARIANTS[variant]))
    x = torch.randn(1, sum(lengths), 16)
    docs = Documents.from_lengths(lengths)
    assert (docs.buckets is not None) == (lengths is LONG)
    packed = attn(x, causal=causal, documents=docs)
    alone = torch.cat([attn(part, causal=causal) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("packed_memory", [False, True])
def test_packed_cross_attention_reads_only_its_documents_memory(packed_memory):
    attn = Attention(StackConfig(width=16, n_heads=4, n_kv_heads=2), cross=True)
    x = torch.randn(1, sum(LENGTHS), 16)
    docs = Documents.from_lengths(LENGTHS)
    memory_lengths = [4, 2, 6, 3]
    memory = torch.randn(4, 6, 16)
    memory_mask = torch.arange(6)[None] < torch.tensor(memory_lengths)[:, None]
    if packed_memory:
        memory_docs, packed = pack(memory, memory_mask)
        out = attn(x, memory=packed, documents=docs, memory_documents=memory_docs)
    else:
        out = attn(x, memory=memory, mask=memory_mask, documents=docs)
    alone = [
        attn(part, memory=memory[i : i + 1, : memory_lengths[i]]) for i, part in enumerate(x.split(LENGTHS, dim=1))
    ]
    torch.testing.assert_close(out, torch.cat(alone, dim=1), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_jagged_backend_equals_dense_on_cpu():
    """The nested-tensor path (CUDA's default) against the dense one, where CPU runs it: non-causal attention."""
    attn = Attention(StackConfig(width=16, n_heads=4, position="rope"))
    x = torch.randn(1, sum(LENGTHS), 16)
    dense = attn(x, documents=Documents.from_lengths(LENGTHS, backend="dense"))
    jagged = attn(x, documents=Documents.from_lengths(LENGTHS, backend="jagged"))
    torch.testing.assert_close(jagged, dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_a_document_never_attends_across_its_boundary(causal):
    """Changing one document changes that document's outputs only (a stack of 2 blocks; a cross-attending decoder
    whose other documents' memory also stays put)."""
    torch.manual_seed(0)
    stack = Stack(StackConfig(width=16, depth=2, n_heads=4, position="rope", cross_attention=True)).eval()
    docs = Documents.from_lengths(LENGTHS)
    x = torch.randn(1, docs.tokens, 16)
    memory = torch.randn(4, 5, 16)
    changed = 2
    start, end = docs.offsets[changed].item(), docs.offsets[changed + 1].item()
    y = x.clone()
    y[:, start:end] = torch.randn(1, end - start, 16)
    other = memory.clone()
    other[changed] = torch.randn(5, 16)
    for kwargs_x, kwargs_y in (({}, {}), ({"memory": memory}, {"memory": other})):
        out_x = stack(x, causal=causal, documents=docs, **kwargs_x)
        out_y = stack(y, causal=causal, documents=docs, **kwargs_y)
        moved = (out_x - out_y).abs().amax(dim=-1)[0]  # (N,)
        inside = torch.zeros(docs.tokens, dtype=torch.bool)
        inside[start:end] = True
        assert torch.equal(moved[~inside], torch.zeros_like(moved[~inside]))
        assert (moved[inside] > 0).all()


# ---------------------------------------------------------------- the model's entry points
def test_model_encodes_packed_as_padded(make_model_config):
    model = MultimodalTransformer(make_model_config(text=dict(causal=True))).eval()
    lengths = torch.tensor([9, 4, 6, 2])
    mask = torch.arange(9)[None] < lengths[:, None]
    ids = torch.randint(3, 32, (4, 9)).masked_fill(~mask, 0)
    torch.testing.assert_close(
        model.encode_text(ids, mask, packed=True), model.encode_text(ids, mask), atol=ATOL, rtol=0
    )
    wave = torch.randn(3, 900)
    wave_lengths = torch.tensor([900, 500, 300])
    torch.testing.assert_close(
        model.encode_audio(wave, wave_lengths, packed=True), model.encode_audio(wave, wave_lengths), atol=ATOL, rtol=0
    )


def test_document_targets_are_the_padded_targets():
    tok = tokenizer()
    batch = tok(["one two", "three", "four five six"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    docs, packed = pack(ids, mask)
    _, _, padded_targets = teacher_forcing(ids, mask)
    targets = document_targets(packed[0], docs)
    assert targets[targets != IGNORE_INDEX].tolist() == padded_targets[padded_targets != IGNORE_INDEX].tolist()
    assert (targets[docs.offsets[1:] - 1] == IGNORE_INDEX).all()


# ---------------------------------------------------------------- training: packed == padded
KINDS = {
    "contrastive": (dict(caption=0.0, speech=0.0), ("image",)),
    "captioning": (dict(contrastive=0.0, speech=0.0), ("image",)),
    "speech+ctc": (dict(contrastive=1.0, caption=0.0, ctc=0.3), ("audio",)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_batch_gives_the_padded_losses_and_gradients(kind):
    weights, modalities = KINDS[kind]
    torch.manual_seed(0)
    task = MultimodalTask(tiny_config(tokenizer().vocab_size, position="rope"), objectives=weights)
    samples = [Digits(modalities=modalities)[i] for i in (3, 47, 120, 9, 1000)]  # 1–4 words: unequal lengths
    padded = Collator(tokenizer())(samples)
    packed = Collator(tokenizer(), packing=True)(samples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()

    results = []
    for batch in (padded, packed):
        task.zero_grad(set_to_none=True)
        parts, _ = task._losses(batch)
        loss = sum(task.weights[k] * v for k, v in parts.items())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in parts.items()}, grads))
    (parts_a, grads_a), (parts_b, grads_b) = results
    assert parts_a.keys() == parts_b.keys() and grads_a.keys() == grads_b.keys()
    for name in parts_a:
        assert math.isclose(parts_a[name].item(), parts_b[name].item(), abs_tol=ATOL), (name, parts_a, parts_b)
    worst = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
    assert worst <= ATOL, worst


# ---------------------------------------------------------------- token budgets (data module)
def test_budget_batches_respect_every_budget():
    costs = [(3, 1.0), (5, 0.5), (2, 2.0), (9, 0.1), (1, 0.2)]
    assert budget_batches(costs, range(5), [8, None]) == [[0, 1], [2], [3], [4]]  # 9 alone: over budget alone
    assert budget_batches(costs, range(5), [None, 2.0]) == [[0, 1], [2], [3, 4]]
    assert budget_batches(costs, [4, 3, 2, 1, 0], [10, 2.5]) == [[4, 3], [2, 1], [0]]


def test_token_budget_sampler_covers_each_epoch_and_splits_ranks_evenly():
    costs = [(1 + i % 7,) for i in range(40)]
    data = list(range(40))
    one = TokenBudgetSampler(data, costs, [12], seed=5)
    batches = list(one)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(sum(costs[i][0] for i in b) <= 12 for b in batches)
    assert list(TokenBudgetSampler(data, costs, [12], seed=5)) == batches  # deterministic
    one.set_epoch(1)
    assert list(one) != batches  # reshuffled per epoch
    ranks = [TokenBudgetSampler(data, costs, [12], num_replicas=2, rank=r, seed=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(batches) // 2)
    assert [b for pair in zip(*ranks) for b in pair][: len(batches)] == batches  # global steps interleave ranks
    ranks[0].start = 2
    assert list(ranks[0]) == list(TokenBudgetSampler(data, costs, [12], num_replicas=2, rank=0, seed=5))[2:]
    with pytest.raises(ValueError, match="budgets"):
        TokenBudgetSampler(data, costs, [None])


def test_datamodule_packs_training_batches_within_the_token_budget(tmp_path):
    from mmformer.data.datamodule import MultimodalDataModule
    from tests.test_data import write_digits, write_manifest

    root = tmp_path / "digits"
    train = write_manifest(root / "train.jsonl", write_digits(root, 24, "train"))
    kwargs = dict(train=str(train), image_size=8, vocab_size=300, tokenizer_cache_dir=str(tmp_path / "cache"))
    dm = MultimodalDataModule(packing=True, max_tokens=20, max_batch_seconds=0.25, **kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sorted(t for b in batches for t in b["text"]) == sorted(r["text"] for r in map(_row, range(24)))
    for b in batches:
        assert "attention_mask" not in b and b["input_ids"].shape == (1, int(b["text_lengths"].sum()))
        assert len(b["text"]) == 1 or (b["text_lengths"].sum() <= 20 and b["audio_lengths"].sum() <= 0.25 * 16000)
    assert len({len(b["text"]) for b in batches}) > 1  # the sample count follows the lengths
    state = {**loader.state_dict(), "batches": 2}
    resumed = MultimodalDataModule(packing=True, max_tokens=20, max_batch_seconds=0.25, **kwargs)
    resumed.setup("fit")
    again = resumed.train_dataloader()
    again.load_state_dict(state)
    assert [b["text"] for b in again] == [b["text"] for b in batches[2:]]
    with pytest.raises(ValueError, match="packing"):
        MultimodalDataModule(max_tokens=20, **kwargs)


def _row(i: int) -> dict:
    from tests.test_data import caption

    return {"text": caption(i)}
