"""Text-only training: the ``lm`` and ``mlm`` losses equal a hand-computed cross-entropy, BERT's masking has its
statistics, packed documents never attend across a boundary with ``packed_attention="document"``, and text data
(plain .txt files, JSONL, WebDataset .txt members) reaches the task as packed blocks with perplexity logged."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.data import Collator, MultimodalDataModule, PackedBlocks, TextDocuments
from mmformer.data.text import pack_documents
from mmformer.layers.documents import Documents
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.tasks import MultimodalTask
from mmformer.tasks.text_objectives import mask_tokens

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

V, MASK = 64, 3


def text_only(**objectives) -> dict:
    """The task's options for text-only training with ``objectives``."""
    return dict(
        objectives=dict(contrastive=0.0, caption=0.0, speech=0.0, **objectives),
        schedule=dict(warmup_steps=1, max_steps=10),
    )


# The padded reference of packed documents: each document alone in a right-padded row (an implementation of its
# own, independent of Documents, which the model's packed path uses).
def split_documents(
    input_ids: torch.Tensor, document_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (B, T) → one right-padded row per document (D, L) and its mask (D, L), True = real token.

    A document is a run of equal ``document_ids`` within a row (padding, where ``attention_mask`` is False, belongs to
    none). The real tokens keep their order: ``rows[mask]`` lists them as ``input_ids[attention_mask]`` does.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    starts = torch.ones_like(real)  # a new document: at each row's start, its first real token, a change of id
    starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]) | (real[:, 1:] & ~real[:, :-1])
    lengths = torch.unique_consecutive(torch.cumsum(starts[real], dim=0), return_counts=True)[1]
    documents = torch.split(input_ids[real], lengths.tolist())
    rows = pad_sequence(documents, batch_first=True, padding_value=0)  # (D, L)
    mask = torch.arange(rows.shape[1], device=rows.device) < lengths[:, None].to(rows.device)
    return rows, mask


def per_document(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    document_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fn(ids, mask)`` (rows of tokens → per-token outputs (rows, L, ...)) run on each document of packed rows alone,
    its outputs put back in the packed layout (B, T, ...); zeros at padding."""
    rows, mask = split_documents(input_ids, document_ids, attention_mask)
    out = fn(rows, mask)  # (D, L, ...)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    packed = out.new_zeros(*input_ids.shape, *out.shape[2:])
    packed[real] = out[mask]
    return packed


def config(route: str = "decoder", **stack) -> ModelConfig:
    return ModelConfig(
        stacks={"s": StackConfig(width=16, depth=2, n_heads=2, mlp_ratio=2.0, **stack)},
        routes={route: "s"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=V, max_length=32, mask_id=MASK),
        embed_dim=None,
        mlm_head=route == "text",
    )


def hand_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """-mean log softmax(logits)[target] over the kept positions, written out."""
    logits, targets = logits.double(), targets[keep]
    log_probs = logits[keep] - logits[keep].exp().sum(dim=-1, keepdim=True).log()
    return -log_probs[torch.arange(len(targets)), targets].mean()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, V, (3, 10))
    mask = torch.arange(10) < torch.tensor([[10], [7], [4]])
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask}


# ---------------------------------------------------------------- losses
def test_lm_loss_is_the_next_token_cross_entropy():
    torch.manual_seed(0)
    task = MultimodalTask(config(), **text_only(lm=1.0))
    b = batch()
    parts, _ = task._losses(b)
    assert set(parts) == {"lm"}
    with torch.no_grad():
        logits = task.model.decode(b["input_ids"], attention_mask=b["attention_mask"])
    expected = hand_cross_entropy(logits[:, :-1], b["input_ids"][:, 1:], b["attention_mask"][:, 1:])
    assert parts["lm"].item() == pytest.approx(expected.item(), rel=1e-5)  # float32 cross-entropy (~4): rounding


def test_mlm_loss_is_the_cross_entropy_of_the_masked_tokens():
    torch.manual_seed(0)
    task = MultimodalTask(config("text"), **text_only(mlm=1.0))
    b = batch()
    torch.manual_seed(5)
    parts, _ = task._losses(b)
    torch.manual_seed(5)  # the same draws
    text = task.model.config.text
    inputs, labels = mask_tokens(b["input_ids"], b["attention_mask"], mask_id=MASK, vocab_size=V,
                                 special_ids=(text.pad_id, text.bos_id, text.eos_id))  # fmt: skip
    with torch.no_grad():
        logits = task.model.mlm_logits(inputs, b["attention_mask"])
    expected = hand_cross_entropy(logits, labels, labels != -100)
    assert labels.ne(-100).any() and parts["mlm"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mlm_on_packed_documents_equals_each_document_alone():
    torch.manual_seed(0)
    model = MultimodalTask(config("text"), **text_only(mlm=1.0)).model.eval()
    ids, documents = packed()
    with torch.no_grad():
        expected = per_document(lambda x, m: model.mlm_logits(x, m), ids, documents)
        got = model.mlm_logits(ids, documents=Documents.from_ids(documents))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    vocab = 5000
    chosen = masked = random = kept = eligible = 0
    for _ in range(20):
        ids = torch.randint(10, vocab, (64, 128), generator=g)
        ids[:, 0], ids[:, -1] = 1, 2  # bos, eos: never masked
        mask = torch.arange(128) < torch.randint(64, 129, (64, 1), generator=g)
        inputs, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=vocab, special_ids=(0, 1, 2), generator=g)
        picked = labels != -100
        assert not picked[~mask].any() and not picked[:, 0].any() and torch.equal(labels[picked], ids[picked])
        assert torch.equal(inputs[~picked], ids[~picked])  # nothing else changes
        eligible += int((mask & (ids > 2)).sum())
        chosen += int(picked.sum())
        masked += int((inputs[picked] == 4).sum())
        kept += int((inputs[picked] == ids[picked]).sum())
        random += int(((inputs[picked] != 4) & (inputs[picked] != ids[picked])).sum())
    assert abs(chosen / eligible - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.015
    assert abs(random / chosen - 0.1) < 0.01 and abs(kept / chosen - 0.1) < 0.01


# ---------------------------------------------------------------- packed documents
def packed() -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed rows of 12 tokens: documents of 5, 4, 3 tokens, and of 7, 5."""
    ids = torch.randint(4, V, (2, 12))
    documents = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5])
    return ids, documents


def test_split_documents_keeps_every_token_in_order():
    ids, documents = packed()
    rows, mask = split_documents(ids, documents)
    assert rows.shape == (5, 7) and mask.sum(dim=1).tolist() == [5, 4, 3, 7, 5]
    assert torch.equal(rows[mask], ids.flatten())


@pytest.mark.parametrize(
    "stack", [{}, {"position": "rope"}, {"position": "alibi"}, {"position": "t5", "relative_buckets": 8}]
)
def test_document_attention_never_crosses_a_boundary(stack):
    torch.manual_seed(0)
    task = MultimodalTask(config(**stack), **text_only(lm=1.0, packed_attention="document")).eval()
    model = task.model
    ids, documents = packed()

    def decode(x, m):
        return model.decode(x, attention_mask=m)

    with torch.no_grad():
        logits = per_document(decode, ids, documents)
        for row, (start, end) in (
            (0, (0, 5)),
            (0, (5, 9)),
            (0, (9, 12)),
            (1, (0, 7)),
            (1, (7, 12)),
        ):  # each document alone
            alone = model.decode(ids[row : row + 1, start:end])[0]
            torch.testing.assert_close(logits[row, start:end], alone, atol=1e-5, rtol=1e-5)
        changed = ids.clone()
        changed[0, 5:9] = torch.randint(4, V, (4,))  # another middle document
        other = per_document(decode, changed, documents)
        keep = torch.ones(2, 12, dtype=torch.bool)
        keep[0, 5:9] = False
        torch.testing.assert_close(other[keep], logits[keep], atol=0, rtol=0)  # the others are untouched
        assert not torch.allclose(model.decode(changed)[0, 9:], model.decode(ids)[0, 9:])  # unpacked: they mix
        # the padding-free packed path the objective runs equals the padded per-document reference
        padding_free = model.decode(ids, documents=Documents.from_ids(documents))
        torch.testing.assert_close(padding_free, logits, atol=1e-5, rtol=1e-5)
        # the loss counts only predictions inside a document, each made from that document alone
        parts, _ = task._losses({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                                 "document_ids": documents})  # fmt: skip
        inside = documents[:, 1:] == documents[:, :-1]
    expected = hand_cross_entropy(logits[:, :-1], ids[:, 1:], inside)
    assert parts["lm"].item() == pytest.approx(expected.item(), rel=1e-5)  # logits of two paths, within 1e-5


# ---------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat", "a dog ran in the park"] * 3, vocab_size=300, max_length=16)


def test_text_documents_and_packed_blocks(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the cat sat\non the mat\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\ufeffa dog ran in the park", encoding="utf-8")
    assert TextDocuments(tmp_path).texts() == ["the cat sat\non the mat", "a dog ran in the park"]
    lines = TextDocuments(tmp_path, unit="line")
    assert lines.texts() == ["the cat sat", "on the mat", "a dog ran in the park"]
    assert lines[1]["source"].endswith("a.txt:2")
    blocks = PackedBlocks(lines.texts(), tokenizer, block_size=6)
    stream = [i for t in lines.texts() for i in tokenizer.encode(t)]
    assert len(blocks) == len(stream) // 6 and blocks.n_tokens == len(stream)
    first, second = blocks[0], blocks[1]
    assert first["input_ids"].tolist() == stream[:6] and second["input_ids"].tolist() == stream[6:12]
    assert first["document_ids"][0] == 0 and (first["document_ids"].diff() >= 0).all()
    collated = Collator(tokenizer)([first, second])
    assert collated["input_ids"].shape == collated["document_ids"].shape == (2, 6) and collated["attention_mask"].all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the folder holds no .txt files"):
        TextDocuments(tmp_path / "empty")


def _write_shard(path, texts: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            data = text.encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "webdataset"])
def test_datamodule_packs_text_for_lm_and_logs_perplexity(tmp_path, kind):
    texts = [f"the cat number {i} sat on the mat and a dog ran in the park" for i in range(24)]
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(texts), encoding="utf-8")
        data = dict(train=str(path), val=str(path), text_documents="line")
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
        data = dict(train=str(path), val=str(path), modalities=["text"])
    else:
        path = tmp_path / "shard-000000.tar"
        _write_shard(path, texts)
        data = dict(train=str(path), val=str(path), modalities=["text"])
    dm = MultimodalDataModule(**data, vocab_size=300, batch_size=4, text_max_length=16, pack_documents=True,
                              tokenizer_cache_dir=str(tmp_path / "tok"))  # fmt: skip
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == train["document_ids"].shape == (4, 16)
    torch.manual_seed(0)
    stack = StackConfig(width=16, depth=1, n_heads=2, mlp_ratio=2.0, position="rope")
    text = TextConfig(vocab_size=dm.vocab_size, max_length=16, position="none")
    model = ModelConfig(stacks={"s": stack}, routes={"decoder": "s"}, image=None, audio=None, text=text, embed_dim=None)
    task = MultimodalTask(model, **text_only(lm=1.0, packed_attention="document"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, datamodule=dm)
    trainer.validate(task, datamodule=dm)
    metrics = trainer.callback_metrics
    perplexity, loss = float(metrics["val/lm_perplexity"]), float(metrics["val/lm"])
    assert 1.0 < perplexity < 2 * dm.vocab_size and math.isfinite(loss)


def test_text_objectives_refuse_models_that_cannot_train_them():
    with pytest.raises(
        ValueError, match=r"objectives.lm > 0 needs a model with a decoder route; its routes are \['text'\]"
    ):
        MultimodalTask(config("text"), **text_only(lm=1.0))
    no_mask = config("text")
    no_mask.text.mask_id = None
    with pytest.raises(ValueError, match=r"objectives.mlm > 0 needs model.mlm_head: true and model.text.mask_id"):
        MultimodalTask(no_mask, **text_only(mlm=1.0))
    with pytest.raises(
        ValueError, match=r"objectives.packed_attention: expected one of \['none', 'document'\], got 'row'"
    ):
        MultimodalTask(config(), **text_only(lm=1.0, packed_attention="row"))


def test_pack_documents_streams_iterable_data(tokenizer):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ({"text": t} for t in ["the cat sat on the mat"] * 5)

    blocks = list(pack_documents(Stream(), tokenizer, 8))
    assert blocks and all(b["input_ids"].shape == (8,) for b in blocks)
    assert all(b["document_ids"][0] == 0 and (b["document_ids"].diff() >= 0).all() for b in blocks)
