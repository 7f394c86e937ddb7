"""Hugging Face folders whose tokenizer is vocabulary files, as older Hub repositories ship it: BERT's ``vocab.txt``
(WordPiece) and GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level BPE), read without ``tokenizer.json``. Token ids
(with and without special tokens) and decoded text equal transformers' tokenizers built from the same files; a folder
with tokenizer files of another kind warns naming them; a model without a tokenizer says so when asked for text."""

from __future__ import annotations

import json
import os
import unicodedata
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below is local; never reach for the network

import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

from mmformer import from_pretrained  # noqa: E402
from mmformer.cli.main import main  # noqa: E402
from mmformer.convert.hf_tokenizer import read_hf_tokenizer  # noqa: E402

# transformers' pure-Python BERT tokenizer: BertTokenizerLegacy since transformers 5, BertTokenizer before
SlowBertTokenizer = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
END = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — Ünïcödé façade",
    "数字 and 中文 characters, 日本語も",
    "Hello,   world!!  (a-b) [x] {y} e-mail me@example.com #$%&*",
    "  leading\tand\t\ttrailing   spaces \n\n new lines  ",
    "UPPER lower MiXeD Case WORDS",
    "emoji 🍕🎉 and ❤️ hearts 👍🏽",
    "don't won't it's — “quoted” ‘text’ … ok .",
    "numbers 12345 3.14 1,000,000",
    "a\u200bzero-width\u00a0nbsp\u3000ideographic space",
    "unseen words: xylophone quizzically, Zürich",
    "special tokens in text: [MASK] and [CLS], <|endoftext|> too",  # no [SEP]: decode ends at the first
]
CORPUS = TEXTS[:-1] * 3 + [t.lower() for t in TEXTS[:-1]]


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def write_json(path, content) -> None:
    path.write_text(json.dumps(content), encoding="utf-8")


def bert_folder(folder, tokenizer_config: dict | None) -> None:
    """A BERT tokenizer as old Hub repositories hold it: vocab.txt (a WordPiece trained on both cases and on the
    accent-stripped texts, so that cased and uncased reading both find words), config.json and optionally
    tokenizer_config.json."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=400, special_tokens=BERT_SPECIALS, show_progress=False)
    backend.train_from_iterator(CORPUS + [strip_accents(t.lower()) for t in TEXTS], trainer)
    folder.mkdir()
    backend.model.save(str(folder))  # vocab.txt
    write_json(folder / "config.json", {"model_type": "bert"})
    if tokenizer_config is not None:
        write_json(folder / "tokenizer_config.json", tokenizer_config)


def gpt2_folder(folder, tokenizer_config: dict | None = None) -> tokenizers.Tokenizer:
    """A GPT-2 tokenizer as old Hub repositories hold it: vocab.json + merges.txt of a byte-level BPE trained on the
    texts, config.json and optionally tokenizer_config.json."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=[END], initial_alphabet=alphabet,
                                             show_progress=False)  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer)
    folder.mkdir()
    backend.model.save(str(folder))  # vocab.json + merges.txt
    write_json(folder / "config.json", {"model_type": "gpt2"})
    if tokenizer_config is not None:
        write_json(folder / "tokenizer_config.json", tokenizer_config)
    return backend


def assert_same_as(reference, ours, *, decoded: bool = True, **decoding) -> None:
    """Ids with and without the special tokens, and (where ``decoded``) the text decoded from them, equal
    ``reference``'s (``decoding``: its decode options)."""
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        assert ours.encode(text) == expected, text
        plain = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.backend.encode(text, add_special_tokens=False).ids == plain, text
        for ids in (expected, plain) if decoded else ():
            assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True, **decoding), text


# BertTokenizer cleans decoded text up (" ' " -> "'", " ." -> ".") unless the config says otherwise; transformers 5's
# tokenizers-backed one only where it does: it is asked to here.
CLEAN_UP = {"clean_up_tokenization_spaces": True}


@pytest.mark.parametrize(
    "tokenizer_config",
    [
        None,  # no tokenizer_config.json: BertTokenizer (config.json's model_type), lowercasing, accents stripped
        {"do_lower_case": True},  # bert-base-uncased's whole tokenizer_config.json
        {"do_lower_case": False, "tokenizer_class": "BertTokenizer"},  # cased: accents and case kept
    ],
    ids=["no-config", "uncased", "cased"],
)
def test_bert_vocab_txt_reads_as_transformers_does(tmp_path, tokenizer_config):
    bert_folder(tmp_path / "bert", tokenizer_config)
    ours = read_hf_tokenizer(tmp_path / "bert")
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert_same_as(SlowBertTokenizer.from_pretrained(tmp_path / "bert"), ours)
    assert_same_as(AutoTokenizer.from_pretrained(tmp_path / "bert"), ours, **CLEAN_UP)


def test_bert_settings_of_the_tokenizer_config(tmp_path):
    """Accents kept while lowercasing, Chinese characters not split, no clean-up of the decoded text: as transformers'
    tokenizer built from the files (the pure-Python one gives the same ids; it decodes without the WordPiece
    decoder's clean-up of each token, which transformers' converter keeps)."""
    settings = {"strip_accents": False, "tokenize_chinese_chars": False, "clean_up_tokenization_spaces": False}
    bert_folder(tmp_path / "bert", settings)
    ours = read_hf_tokenizer(tmp_path / "bert")
    assert_same_as(AutoTokenizer.from_pretrained(tmp_path / "bert"), ours)
    assert_same_as(SlowBertTokenizer.from_pretrained(tmp_path / "bert"), ours, decoded=False)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the gpt2 repository of 2019: config.json, vocab.json, merges.txt
        {"tokenizer_config": {"add_prefix_space": True, "add_bos_token": True, "tokenizer_class": "GPT2Tokenizer"}},
    ],
    ids=["plain", "prefix-space-and-bos"],
)
def test_gpt2_vocab_and_merges_read_as_transformers_does(tmp_path, settings):
    gpt2_folder(tmp_path / "gpt2", **settings)
    ours = read_hf_tokenizer(tmp_path / "gpt2")
    assert ours.bos_token == (END if settings else None)
    assert_same_as(GPT2Tokenizer.from_pretrained(tmp_path / "gpt2"), ours)
    assert_same_as(AutoTokenizer.from_pretrained(tmp_path / "gpt2"), ours)


def test_added_and_special_tokens_of_the_side_files(tmp_path):
    """The older side files (special_tokens_map.json, added_tokens.json) of a GPT-2 folder and the
    added_tokens_decoder of a BERT tokenizer_config.json give the tokens and ids transformers gives; the padding
    token is the one they name."""
    backend = gpt2_folder(tmp_path / "gpt2")
    n = backend.get_vocab_size()
    write_json(tmp_path / "gpt2/tokenizer_config.json", {"additional_special_tokens": ["<|sep|>"]})
    write_json(tmp_path / "gpt2/special_tokens_map.json", {"pad_token": "<|pad|>"})
    write_json(tmp_path / "gpt2/added_tokens.json", {"<|pad|>": n, "<|sep|>": n + 1, "brown fox": n + 2})
    ours = read_hf_tokenizer(tmp_path / "gpt2")
    assert (ours.pad_token, ours.pad_id, ours.vocab_size) == ("<|pad|>", n, n + 3)
    texts = ["the brown fox<|sep|>jumps<|pad|>", "a brown foxes <|endoftext|>"]
    for reference in (
        GPT2Tokenizer.from_pretrained(tmp_path / "gpt2"),
        AutoTokenizer.from_pretrained(tmp_path / "gpt2"),
    ):
        for text in texts:
            assert ours.encode(text) == reference(text)["input_ids"], text
            assert ours.decode(ours.encode(text)) == reference.decode(ours.encode(text), skip_special_tokens=True)

    bert_folder(tmp_path / "bert", None)
    vocab = (tmp_path / "bert/vocab.txt").read_text(encoding="utf-8").splitlines()
    token = dict(lstrip=False, rstrip=False, single_word=False)
    decoder = {str(i): {"content": t, "normalized": False, "special": True, **token} for i, t in enumerate(vocab[:5])}
    decoder[str(len(vocab))] = {"content": "Brown Fox", "normalized": False, "special": False, **token}
    decoder[str(len(vocab) + 1)] = {"content": "<mask2>", "normalized": False, "special": True, **token}
    write_json(tmp_path / "bert/tokenizer_config.json", {"do_lower_case": True, "added_tokens_decoder": decoder})
    ours = read_hf_tokenizer(tmp_path / "bert")
    assert ours.vocab_size == len(vocab) + 2
    text = "The Brown Fox and the brown fox <mask2> [MASK]"
    reference = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert (
        ours.encode(text)
        == reference(text)["input_ids"]
        == SlowBertTokenizer.from_pretrained(tmp_path / "bert")(text)["input_ids"]
    )
    assert ours.decode(ours.encode(text)) == reference.decode(ours.encode(text), skip_special_tokens=True, **CLEAN_UP)


def test_an_added_token_on_another_id_is_refused(tmp_path):
    backend = gpt2_folder(tmp_path / "gpt2")
    n = backend.get_vocab_size()
    write_json(tmp_path / "gpt2/added_tokens.json", {"<|pad|>": n + 5})
    with pytest.raises(ValueError, match=rf"added_tokens.json: added token '<\|pad\|>' has id {n + 5}, but .* id {n}"):
        read_hf_tokenizer(tmp_path / "gpt2")


@pytest.mark.parametrize(
    "files, config",
    [
        ({"tokenizer.model": b"\x0a\x05"}, {"model_type": "llama"}),  # sentencepiece
        ({"vocab.json": b"{}", "merges.txt": b"#version: 0.2\n"}, {"model_type": "roberta"}),  # RoBERTa's own BPE
        ({"vocab.json": b"{}"}, {"model_type": "gpt2"}),  # no merges.txt
    ],
    ids=["sentencepiece", "roberta", "no-merges"],
)
def test_tokenizer_files_it_cannot_read_warn(tmp_path, files, config):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    write_json(tmp_path / "config.json", config)
    with pytest.warns(UserWarning, match=r"no tokenizer.json, and mmformer does not read its tokenizer files") as seen:
        assert read_hf_tokenizer(tmp_path) is None
    message = str(seen[0].message)
    assert str(tmp_path) in message and str(sorted(files)) in message
    for name in files:  # a folder without tokenizer files: no tokenizer, nothing to say
        (tmp_path / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_hf_tokenizer(tmp_path) is None


@pytest.fixture(scope="module")
def hf_gpt2_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random enough that greedy decoding has no near-ties
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_a_gpt2_folder_of_vocab_files_completes_and_converts(tmp_path, hf_gpt2_model):
    """The user's case: a GPT-2 folder whose tokenizer is vocab.json + merges.txt completes text as transformers does,
    and ``mmformer convert`` writes its tokenizer into the converted folder."""
    gpt2_folder(tmp_path / "hf")
    hf_gpt2_model.save_pretrained(tmp_path / "hf")
    reference = GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    prompt = "the quick brown"
    ids = torch.tensor([reference(prompt)["input_ids"]])
    with torch.no_grad():
        expected = hf_gpt2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    completed = model.complete([prompt], max_new_tokens=8)
    assert completed == [reference.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)]
    main(["convert", "--from", "hf_gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    assert (tmp_path / "ours/tokenizer.json").is_file()
    tokenizer = from_pretrained(tmp_path / "ours").processor.tokenizer
    assert [tokenizer.encode(text) for text in TEXTS] == [reference(text)["input_ids"] for text in TEXTS]


def test_a_model_without_a_tokenizer_says_what_is_missing(tmp_path, hf_gpt2_model):
    hf_gpt2_model.save_pretrained(tmp_path / "hf")  # weights and config, no tokenizer files
    model = from_pretrained(tmp_path / "hf")
    with pytest.raises(
        ValueError, match=r"complete: .* the model's has none \(model.processor.tokenizer is None\)"
    ) as e:
        model.complete(["the quick"], max_new_tokens=2)
    assert "vocab.json + merges.txt" in str(e.value) and "ImageProcessorConfig" not in str(e.value)
