"""Evaluation and prediction over real loaders: a batch of only unreadable samples is skipped, the epoch's losses do not
depend on the batch size, and a language model's prediction scores its text blocks.

Tiny seeded models on synthetic in-memory data, CPU only (the helpers of ``test_task``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_task import Digits, make_task, tokenizer, trainer
from torch.utils.data import DataLoader

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.data.collate import Collator
from mmformer.tasks import MultimodalTask
from mmformer.tasks.predictions import PredictionWriter


def loader(n: int, batch_size: int, unreadable: tuple[int, ...] | range = ()) -> DataLoader:
    """Digits samples in order; those in ``unreadable`` are None, as a data set gives a sample it skipped."""
    data = Digits(n)
    samples = [None if i in unreadable else data[i] for i in range(n)]
    return DataLoader(samples, batch_size, collate_fn=Collator(tokenizer()))


def evaluation_task() -> MultimodalTask:
    task = make_task(generation=dict(evaluate=False, max_new_tokens=2))
    task.tokenizer = tokenizer()  # no data module here
    return task


# ---------------------------------------------------------------------- a batch of only unreadable samples
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_skips_a_batch_of_unreadable_samples(stage):
    """The collator gives None for the middle batch (samples 4-7 all unreadable); the epoch equals one without them."""
    task = evaluation_task()
    run = lambda data: getattr(trainer(limit_val_batches=1.0), stage)(task, data)[0]  # noqa: E731
    skipped = run(loader(12, 4, unreadable=range(4, 8)))
    without = run(DataLoader([Digits(12)[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 4, collate_fn=Collator(tokenizer())))
    prefix = "val" if stage == "validate" else "test"
    assert {f"{prefix}/loss", f"{prefix}/i2t_r1", f"{prefix}/caption"} <= skipped.keys()
    assert skipped == pytest.approx(without, rel=1e-6)


def test_predict_skips_a_batch_of_unreadable_samples(tmp_path):
    """Prediction gives the empty batch no rows; the writer's lines are the readable samples, by their rows — also
    in a batch the collator dropped one sample of (the line after it was given its index)."""
    task = evaluation_task()
    unreadable = (4, 5, 6, 7, 9)
    out = trainer(callbacks=[PredictionWriter(tmp_path)]).predict(task, loader(12, 4, unreadable=unreadable))
    assert [len(batch["source"]) for batch in out] == [4, 0, 3]
    assert len(out[0]["captions"]) == 4 and out[2]["image_features"].shape == (3, 16)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(row["index"], row["source"]) for row in lines] == [(i, f"sample-{i}") for i in (0, 1, 2, 3, 8, 10, 11)]


# ---------------------------------------------------------------------- losses of an evaluation epoch
def test_evaluation_losses_are_means_over_all_target_tokens():
    """val/caption and val/speech are token means over the whole epoch (texts of 1 and 2 words here), whatever the
    batch size: batches of 3 give the values of one batch of all 16. val/loss is their weighted sum."""
    task = make_task(objectives=dict(contrastive=0.0, caption=1.0, speech=0.5), generation=dict(evaluate=False))
    values = {}
    for batch_size in (3, 16):
        metrics = trainer(limit_val_batches=1.0).validate(task, loader(16, batch_size))[0]
        values[batch_size] = {k: metrics[f"val/{k}"] for k in ("caption", "speech", "loss")}
    assert values[3] == pytest.approx(values[16], rel=1e-5)
    assert values[3]["loss"] == pytest.approx(values[3]["caption"] + 0.5 * values[3]["speech"], rel=1e-6)


# ---------------------------------------------------------------------- a language model's predictions
def lm_task() -> MultimodalTask:
    torch.manual_seed(0)
    stack = StackConfig(width=16, depth=1, n_heads=2, mlp_ratio=2.0)
    text = TextConfig(vocab_size=tokenizer().vocab_size, max_length=16)
    model = ModelConfig(stacks={"s": stack}, routes={"decoder": "s"}, image=None, audio=None, text=text, embed_dim=None)
    task = MultimodalTask(model, objectives=dict(lm=1.0, contrastive=0.0, caption=0.0, speech=0.0))
    task.tokenizer = tokenizer()
    return task


def block(texts: list[str], source: str) -> dict:
    """A packed text block as the text data sets give it: the documents' ``[bos] tokens [eos]`` back to back."""
    rows = [tokenizer().encode(t) for t in texts]  # each [bos] ... [eos]
    ids, documents = rows[0] + rows[1], [0] * len(rows[0]) + [1] * len(rows[1])
    return {"input_ids": torch.tensor(ids[:12]), "document_ids": torch.tensor(documents[:12]), "source": source}


def hand_log_prob(task: MultimodalTask, sample: dict) -> float:
    """The mean log-probability of each next token of a block, written out (``packed_attention: none``, as GPT-2 and
    lm_shakespeare.yaml: the block's documents see each other, and the bos after an eos is predicted too)."""
    ids = sample["input_ids"]
    with torch.no_grad():
        logits = task.model.decode(ids[None])[0, :-1].double()  # (L-1, V)
    return float(logits.log_softmax(dim=-1).gather(1, ids[1:, None]).mean())


def test_predict_scores_the_blocks_of_a_language_model(tmp_path):
    """A decoder-only model's prediction of a text block: its text, the mean log-probability of its next tokens (as
    the lm objective scores them) and the perplexity; the shorter last block is scored on its own tokens only."""
    task = lm_task()
    samples = [
        block(["one two three", "four five six seven"], "text:block 0"),
        block(["eight nine", "nine eight seven six five four"], "text:block 1"),
        {k: v[:7] if isinstance(v, torch.Tensor) else v for k, v in block(["six", "two one"], "text:block 2").items()},
    ]
    writer = PredictionWriter(tmp_path)
    out = trainer(callbacks=[writer]).predict(task, DataLoader(samples, 3, collate_fn=Collator(tokenizer())))[0]
    assert out["source"] == ["text:block 0", "text:block 1", "text:block 2"]
    assert "one two three" in out["text"][0] and "four five six seven" in out["text"][0]
    assert out["log_prob"] == pytest.approx([hand_log_prob(task, s) for s in samples], abs=1e-5)
    assert out["perplexity"] == pytest.approx([math.exp(-x) for x in out["log_prob"]])
    lines = [
        json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()
    ]  # mmformer predict's
    assert [(r["text"], r["log_prob"], r["perplexity"]) for r in lines] == list(
        zip(*(out[k] for k in ("text", "log_prob", "perplexity")))
    )
