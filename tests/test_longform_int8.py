"""mmformer's int8 long-form path (issues #25, #26): a Whisper checkpoint's PT2E int8 model passed to
``transcribe_files`` reads every window through its int8 audio encoder and decodes with the float decoder (Whisper's
rules, fallback, timestamps and word alignment as they are); models it cannot serve are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmformer.longform import TranscribeOptions, transcribe_files

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (hasattr(torch.ops, "onednn") and torch.backends.mkldnn.is_available()), reason="x86 int8 kernels needed"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.compress import pt2e
    from mmformer.convert.openai_whisper import from_openai_whisper

    model = from_openai_whisper(save_pt(random_whisper(seed=0), tmp_path_factory.mktemp("whisper") / "tiny.pt"))
    return model.eval(), pt2e.quantize(model, "dynamic", towers=["audio"], compile=False)


@pytest.mark.parametrize("vad", [False, True])
def test_int8_long_form_is_the_float_decoder_over_the_int8_encoders_states(models, vad, monkeypatch):
    """The int8 model's result equals the float model's with its encoder replaced by the int8 graph (so every
    window went through that graph, sequential and VAD-batched alike), and the int8 states stay near float's."""
    model, int8 = models
    wave = digits_recording(20, seed=130)[0]  # ~40 s: two windows
    options = TranscribeOptions(temperature=0.0, language="en", word_timestamps=True)
    got = transcribe_files(int8, [wave], options=options, vad=vad, batch_size=4)
    mel = model.audio_embed.features(wave[None, : 16000 * 30], torch.tensor([16000 * 30]))
    with torch.no_grad():
        reference, _ = model.encode_audio_tokens(audio_features=mel)
    states = int8.audio_states(mel)
    assert states.shape == reference.shape
    assert (states - reference).abs().max() < 0.1 * reference.abs().max()
    monkeypatch.setattr(model, "encode_audio_tokens", lambda audio_features: (int8.audio_states(audio_features), None))
    expected = transcribe_files(model, [wave], options=options, vad=vad, batch_size=4)
    assert got == expected and got[0]["segments"]


def test_an_int8_model_the_long_form_path_cannot_serve_is_refused_by_name(models):
    from mmformer import load_pretrained
    from mmformer.compress import pt2e

    model, _ = models
    text_only = pt2e.quantize(model, "dynamic", towers=["decoder"], compile=False)
    with pytest.raises(ValueError, match="no int8 audio encoder"):
        transcribe_files(text_only, [torch.zeros(16000)])
    digits = load_pretrained(ROOT / "data" / "digits_model").eval()
    only_whisper = "reads long recordings only under a Whisper checkpoint's decoder"
    with pytest.raises(ValueError, match=only_whisper):
        transcribe_files(digits, [torch.zeros(16000)], bf16_encoder=True)
    with pytest.raises(ValueError, match="int8 already"):
        transcribe_files(models[1], [torch.zeros(16000)], bf16_encoder=True)


@pytest.mark.parametrize("vad", [False, True])
def test_bf16_long_form_is_the_float_decoder_over_autocast_states_and_bf16_cross_keys(models, vad, monkeypatch):
    """``bf16_encoder`` (``transcribe --compute-type bfloat16 | auto``): every window's states come from the audio
    encoder under ``torch.autocast(bfloat16)`` and the decoder (float32) keeps its cross-attention keys/values in
    bf16 — the result is the float model's with its encoder under autocast and its caches made with
    ``cross_dtype=bfloat16``, and differs both from float32's and from the autocast encoder's alone (so each part
    shows)."""
    model, _ = models
    wave = digits_recording(20, seed=130)[0]
    options = TranscribeOptions(temperature=0.0, language="en", word_timestamps=True)
    got = transcribe_files(model, [wave], options=options, vad=vad, batch_size=4, bf16_encoder=True)
    float32 = transcribe_files(model, [wave], options=options, vad=vad, batch_size=4)
    encode, make_cache = model.encode_audio_tokens, model.make_cache

    def under_autocast(audio_features):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states, mask = encode(audio_features=audio_features)
        return states.float(), mask

    monkeypatch.setattr(model, "encode_audio_tokens", under_autocast)
    encoder_only = transcribe_files(model, [wave], options=options, vad=vad, batch_size=4)
    monkeypatch.setattr(model, "make_cache", lambda *a, **k: make_cache(*a, **{**k, "cross_dtype": torch.bfloat16}))
    expected = transcribe_files(model, [wave], options=options, vad=vad, batch_size=4)
    assert got == expected and got[0]["segments"]
    scores = [[s["avg_logprob"] for s in r["segments"]] for r in (got[0], float32[0], encoder_only[0])]
    assert scores[0] != scores[1] and scores[0] != scores[2]


def test_a_cache_keeps_cross_attention_keys_in_bf16_and_the_decoder_reads_them(models):
    """``make_cache(cross_dtype=torch.bfloat16)``: the cached cross-attention keys/values are bf16 (half the bytes a
    step reads) and the logits stay within 2 % of the float32 cache's (the queries meet them in bf16: not equal)."""
    model, _ = models
    g = torch.Generator().manual_seed(5)
    memory = torch.randn(2, 1500, model.config.width("decoder"), generator=g)
    ids = torch.tensor([[50258, 50259, 50359, 50363]] * 2)
    with torch.no_grad():
        caches = [model.make_cache(2, 8), model.make_cache(2, 8, cross_dtype=torch.bfloat16)]
        logits = [model.decode(ids, memory, None, cache=c) for c in caches]
        steps = [model.decode_step(ids[:, -1:], cache=c) for c in caches]
    assert caches[1].cross(0)[0].dtype == torch.bfloat16 and caches[0].cross(0)[0].dtype == torch.float32
    for reference, got in (logits, steps):
        assert not torch.equal(got, reference)
        assert float((got - reference).abs().max()) <= 0.02 * float(reference.abs().max())
    with pytest.raises(ValueError, match="only the growing cache"):
        model.make_cache(2, 8, static=True, cross_dtype=torch.bfloat16)
