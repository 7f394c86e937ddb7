"""openai-whisper checkpoints: a random-weight ``whisper.model.Whisper`` saved as openai's ``.pt`` converts exactly
(decoder logits against openai's own forward), loads by ``whisper:NAME`` from openai-whisper's download cache
(``XDG_CACHE_HOME``) and by path through ``from_pretrained`` (in a fresh process), and its tokenizer — openai-whisper's
tiktoken vocabulary as a ``tokenizers`` BPE — gives the same ids as ``whisper.tokenizer.get_tokenizer`` for texts and
for every special and timestamp token."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

whisper = pytest.importorskip("whisper")
from whisper.model import ModelDimensions, Whisper  # noqa: E402
from whisper.tokenizer import get_tokenizer  # noqa: E402

from mmformer.convert.openai_whisper import (  # noqa: E402
    _alignment_heads,
    checkpoint_path,
    from_openai_whisper,
    openai_tokenizer,
)
from mmformer.convert.whisper_vocab import WhisperTokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOATS = ("avg_logprob", "no_speech_prob", "compression_ratio")
TEXTS = [
    "Hello world, I'm here!  ok\n\nthe  ",
    " four two nine",
    "naïve café 日本語 ♪♪ 🎉 – “quoted” (brackets) [x] {y}",
    "Il n'y a pas d'année 2024... ¿Qué? ¡Sí! 1234567 0.5%",
    "   leading and trailing spaces   ",
    "tabs\tand\r\nnewlines\n",
    "Привет, как дела? Γειά σου! مرحبا שלום",
]
DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=51865,
            n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=2)  # fmt: skip


def random_whisper(seed: int = 0, **dims) -> Whisper:
    """openai-whisper's model at small widths with every weight random (norm scales near 1)."""
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**{**DIMS, **dims}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm_scale else 0.05 * torch.randn_like(p))
    return model.eval()


def save_pt(model: Whisper, path: Path) -> Path:
    """The checkpoint as openai-whisper's download cache holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def multilingual():
    return openai_tokenizer(51865)


@pytest.mark.parametrize("multilingual_vocab", [True, False], ids=["multilingual", "english"])
def test_tokenizer_ids_equal_openai_whisper(multilingual_vocab, multilingual):
    n_vocab = 51865 if multilingual_vocab else 51864
    ours = multilingual if multilingual_vocab else openai_tokenizer(n_vocab)
    ref = get_tokenizer(multilingual_vocab, num_languages=99)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.encoding.decode(ids) == text
    specials = ref.encoding.special_tokens_set
    assert len(specials) == 1608  # end-of-text, 99 languages, tasks, ..., 1501 timestamps
    vocab = ours.backend.get_vocab(with_added_tokens=True)
    assert {s: vocab[s] for s in specials} == {s: ref.encoding.encode_single_token(s) for s in specials}
    assert ours.vocab_size == n_vocab
    # the ids the long-form decoder reads by name, and openai's suppressed and non-speech tokens
    tokens = WhisperTokens.from_tokenizer(ours)
    for name in ("eot", "sot", "sot_prev", "sot_lm", "no_speech", "no_timestamps", "transcribe", "translate",
                 "timestamp_begin"):  # fmt: skip
        assert getattr(tokens, name) == getattr(ref, name), name
    assert tokens.non_speech_tokens() == ref.non_speech_tokens
    assert list(tokens.language_ids.values()) == sorted(ref.all_language_tokens)


def test_decode_of_any_ids_equals_openai_whisper(multilingual):
    """Random ids (partial UTF-8 sequences included) and timestamps decode as tiktoken does (errors="replace"), and
    words split as openai-whisper splits them."""
    tokens, ref = WhisperTokens.from_tokenizer(multilingual), get_tokenizer(True, language="en")
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(51865) for _ in range(rng.randrange(1, 20))]
        assert tokens.decode(ids) == ref.decode(ids)
        assert tokens.decode_with_timestamps(ids) == ref.decode_with_timestamps(ids)
        text_ids = [i for i in ids if i < ref.eot]
        assert tokens.split_to_word_tokens(text_ids, "en") == ref.split_to_word_tokens(text_ids)
    ja = get_tokenizer(True, language="ja")
    ids = ja.encode("日本語のテキスト、です。")
    assert tokens.split_to_word_tokens(ids, "ja") == ja.split_to_word_tokens(ids)


def test_converted_logits_equal_openai_whisper(tmp_path):
    ref = random_whisper()
    model = from_openai_whisper(save_pt(ref, tmp_path / "random.pt"))
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 3000)
    ids = torch.tensor([[50258, 50259, 50359, 50364, 440, 1002, 11], [50258, 50259, 50359, 50363, 2425, 13, 50257]])
    with torch.no_grad():
        expected = ref(mel, ids)
        memory, mask = model.encode_audio_tokens(audio_features=mel)
        logits = model.decode(ids, memory, mask)
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    gen = model.config.generation
    assert gen.alignment_heads == [[1, h] for h in range(4)]  # a path: openai's default, the decoder's second half
    assert gen.no_timestamps_id == 50363 and gen.language_ids["en"] == 50259 and gen.task_ids["translate"] == 50358
    # ids the model's own generate() uses (Hugging Face's suppress lists for Whisper)
    assert gen.begin_suppress_tokens == [220, 50257]


def test_alignment_heads_of_a_named_model_follow_openai_whisper():
    """openai-whisper's table for "tiny" (4 layers × 6 heads), read without importing its package, gives the heads
    its model sets."""
    ref = Whisper(ModelDimensions(**{**DIMS, "n_text_layer": 4, "n_text_head": 6, "n_text_state": 48}))
    ref.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny"])
    expected = ref.alignment_heads.to_dense().nonzero().tolist()
    assert _alignment_heads("tiny", 4, 6) == expected and len(expected) < 24


def test_from_pretrained_reads_the_whisper_cache_and_pt_paths_in_a_fresh_process(tmp_path):
    ref = random_whisper(seed=3)
    cache = tmp_path / "xdg"
    save_pt(ref, cache / "whisper" / "tiny-random.pt")
    plain = save_pt(ref, tmp_path / "elsewhere" / "model.pt")
    torch.manual_seed(2)
    mel = torch.randn(1, 80, 3000)
    torch.save(mel, tmp_path / "mel.pt")
    ids = [[50258, 50259, 50359, 50363, 440]]
    with torch.no_grad():
        expected = ref(mel, torch.tensor(ids))[0, -1]
    script = f"""
import json, sys, torch
import mmformer
out = {{}}
for name in ("whisper:tiny-random", {str(plain)!r}):
    model = mmformer.from_pretrained(name)
    mel = torch.load({str(tmp_path / "mel.pt")!r}, weights_only=True)
    with torch.no_grad():
        memory, mask = model.encode_audio_tokens(audio_features=mel)
        out[name] = model.decode(torch.tensor({ids}), memory, mask)[0, -1].tolist()
    out[name + ":text"] = model.processor.tokenizer.decode([440, 1002], skip_special_tokens=False)
print(json.dumps(out))
"""
    env = {"XDG_CACHE_HOME": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("whisper:tiny-random", str(plain)):
        logits = torch.tensor(out[name])
        assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert out[name + ":text"] == " The world"


def test_missing_or_foreign_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"whisper/large-v9\.pt.*nothing is downloaded"):
        checkpoint_path("whisper:large-v9")
    assert checkpoint_path  # the cache is read when called: XDG_CACHE_HOME set above
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not an openai-whisper checkpoint .*'dims'.*got \['state_dict'\]"):
        from_openai_whisper(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="path_or_name"):
        from_openai_whisper(3)


def test_hugging_face_generation_configs_bring_their_alignment_heads():
    from mmformer.config import GenerationConfig
    from mmformer.convert.hf_whisper import _generation_config

    gen = _generation_config({"alignment_heads": [[2, 0], [3, 5]], "no_timestamps_token_id": 50363})
    assert gen.alignment_heads == [[2, 0], [3, 5]]
    assert GenerationConfig(**json.loads(json.dumps(asdict(gen)))) == gen  # JSON round trip
    with pytest.raises(ValueError, match=r"alignment_heads must be \[layer, head\] pairs"):
        GenerationConfig(alignment_heads=[[1, -2]])


def test_a_converted_checkpoint_saved_and_reloaded_in_a_fresh_process_transcribes_the_same(tmp_path):
    """save_pretrained of the conversion (config with the generation rules and alignment heads, tokenizer.json),
    reloaded in a new process: the same long-form transcript, words included, as the converted model here."""
    from mmformer.longform.sequential import transcribe_sequential

    model = from_openai_whisper(save_pt(random_whisper(seed=4), tmp_path / "random.pt"))
    model.save_pretrained(tmp_path / "saved")
    generator = torch.Generator().manual_seed(5)
    audio = 0.1 * torch.randn(12 * 16000, generator=generator)
    torch.save(audio, tmp_path / "audio.pt")
    options = dict(temperature=0.0, word_timestamps=True, language="en")
    expected = transcribe_sequential(model, audio, **options)
    script = f"""
import json, torch
import mmformer
from mmformer.longform.sequential import transcribe_sequential
model = mmformer.from_pretrained({str(tmp_path / "saved")!r})
audio = torch.load({str(tmp_path / "audio.pt")!r}, weights_only=True)
print(json.dumps(transcribe_sequential(model, audio, **{options!r})))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    expected = json.loads(json.dumps(expected))
    assert (reloaded["text"], reloaded["language"]) == (expected["text"], expected["language"])
    assert len(reloaded["segments"]) == len(expected["segments"])
    for a, b in zip(reloaded["segments"], expected["segments"]):
        exact = lambda segment: {k: v for k, v in segment.items() if k not in (*FLOATS, "words")}  # noqa: E731
        assert exact(a) == exact(b)
        for k in FLOATS:  # the same up to float32 rounding (the last bits of a sum can differ between processes)
            assert a[k] == pytest.approx(b[k], rel=1e-5)
        assert [(w["word"], w["start"], w["end"]) for w in a["words"]] == [
            (w["word"], w["start"], w["end"]) for w in b["words"]
        ]
        assert [w["probability"] for w in a["words"]] == pytest.approx([w["probability"] for w in b["words"]], rel=1e-5)
    assert sum(len(s["words"]) for s in expected["segments"]) > 0
