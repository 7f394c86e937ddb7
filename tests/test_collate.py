"""The collator tells when it cuts texts: a model whose text table (``text.max_length``, which ``mmformer fit`` makes
``data.text_max_length`` follow) was shorter than its captions trained on their first words only, silently."""

from __future__ import annotations

import warnings

import pytest

from mmformer.data import Collator
from mmformer.preprocess.tokenizer import Tokenizer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([f"{a} {b} {a}" for a in WORDS for b in WORDS], vocab_size=300)


@pytest.mark.parametrize("packing", [False, True])
def test_cut_texts_warn_once_naming_how_many_and_the_limit(tokenizer, packing):
    collate = Collator(tokenizer, text_max_length=4, packing=packing)
    long = [{"text": "nine six seven nine"}, {"text": "one"}, {"text": "two three four five six"}]
    with pytest.warns(UserWarning, match=r"2 of 3 texts .* longer than text_max_length=4 tokens and are cut"):
        batch = collate(long)
    lengths = batch["text_lengths"] if packing else batch["attention_mask"].sum(dim=1)
    assert lengths.tolist() == [4, 3, 4]  # bos + "one" + eos fits; the others are cut to the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later batches with cut texts are quiet
        again = collate(long)
    assert again["input_ids"].tolist() == batch["input_ids"].tolist()


def test_texts_that_fit_do_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = Collator(tokenizer, text_max_length=5)([{"text": "nine six seven"}, {"text": "one"}])
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 3]
