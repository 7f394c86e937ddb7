"""Sequential long-form transcription against openai-whisper's own ``transcribe()`` (same process, same random
weights saved as openai's ``.pt``, the real multilingual vocabulary): 60 s of real speech made from the digits test
clips with pauses, at temperature 0, with and without the previous text as a prompt, with word timestamps — the same
token ids, texts, segment and word times. Plus the pieces on their own: the timestamp rules, DTW, batched windows,
beam search, the temperature fallback and the no-speech guard.

Random weights make the texts nonsense, but every decision of the algorithm (timestamp pairs, seeking, prompts,
segment splitting, word alignment) runs on them; the decode length is bounded by n_text_ctx // 2 (openai's
sample_len), kept small so that each test runs in seconds.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

whisper = pytest.importorskip("whisper")
from whisper.decoding import ApplyTimestampRules, DecodingOptions  # noqa: E402
from whisper.model import ModelDimensions, Whisper  # noqa: E402
from whisper.timing import dtw as openai_dtw  # noqa: E402
from whisper.tokenizer import get_tokenizer  # noqa: E402

from mmformer.convert.openai_whisper import from_openai_whisper  # noqa: E402
from mmformer.convert.whisper_vocab import WhisperTokens  # noqa: E402
from mmformer.data.io import read_audio  # noqa: E402
from mmformer.longform.options import TranscribeOptions  # noqa: E402
from mmformer.longform.sequential import log_mel, transcribe_sequential  # noqa: E402
from mmformer.longform.timing import dtw  # noqa: E402
from mmformer.longform.whisper_decode import decode_windows, needs_fallback  # noqa: E402
from mmformer.longform.whisper_rules import TimestampRules  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"
SR = 16000
DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                       n_vocab=51865, n_text_ctx=32, n_text_state=32, n_text_head=4, n_text_layer=2)  # fmt: skip


def digits_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Test-split utterances separated by 0.3–2 s of silence, cut to ``seconds``."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()]
    parts, total = [], 0
    while total < seconds * SR:
        wave = read_audio(DIGITS / rows[rng.randrange(len(rows))]["audio_filepath"], SR)[0].numpy()
        pause = np.zeros(int(rng.uniform(0.3, 2.0) * SR), dtype=np.float32)
        parts += [wave, pause]
        total += len(wave) + len(pause)
    return np.concatenate(parts)[: int(seconds * SR)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """openai-whisper's model with random weights (norm scales near 1), and mmformer's conversion of its ``.pt``."""
    torch.manual_seed(0)
    ref = Whisper(DIMS)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm_scale else 0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("whisper") / "random.pt"
    torch.save({"dims": asdict(DIMS), "model_state_dict": ref.state_dict()}, path)
    return ref.eval(), from_openai_whisper(path)


@pytest.fixture(scope="module")
def speech():
    return torch.from_numpy(digits_speech(60.0))


def assert_same_transcript(ours: dict, ref: dict, words: bool) -> None:
    assert ours["language"] == ref["language"]
    assert ours["text"] == ref["text"]
    assert len(ours["segments"]) == len(ref["segments"])
    for a, b in zip(ours["segments"], ref["segments"]):
        assert set(a) == set(b)
        for key in ("id", "seek", "tokens", "text", "temperature"):
            assert a[key] == b[key], (key, a, b)
        for key in ("start", "end"):
            assert abs(a[key] - b[key]) < 1e-6, (key, a, b)  # same 20-ms quantum (and the same float)
        for key in ("avg_logprob", "compression_ratio", "no_speech_prob"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
        if words:
            assert [w["word"] for w in a["words"]] == [w["word"] for w in b["words"]]
            for wa, wb in zip(a["words"], b["words"]):
                assert abs(wa["start"] - wb["start"]) < 1e-6 and abs(wa["end"] - wb["end"]) < 1e-6, (wa, wb)
                assert wa["probability"] == pytest.approx(wb["probability"], rel=1e-4)


@pytest.mark.parametrize(
    "prompting",
    [
        dict(condition_on_previous_text=True),
        dict(condition_on_previous_text=True, initial_prompt="four two nine", carry_initial_prompt=True),
        dict(condition_on_previous_text=False),
    ],
    ids=["previous-text", "carried-initial-prompt", "unprompted"],
)
def test_transcribe_equals_openai_whisper(models, speech, prompting):
    ref_model, model = models
    options = dict(temperature=0.0, word_timestamps=True, **prompting)
    ref = whisper.transcribe(ref_model, speech, fp16=False, **options)
    seen = []
    ours = transcribe_sequential(model, speech, progress=lambda done, total: seen.append((done, total)), **options)
    assert_same_transcript(ours, ref, words=True)
    # the run exercised what it claims to: several windows moved by predicted timestamps, segments with words
    seeks = sorted({s["seek"] for s in ours["segments"]})
    assert len(seeks) >= 3 and any(s % 3000 for s in seeks)
    assert sum(len(s["words"]) for s in ours["segments"]) >= 5
    assert seen[-1] == (60.0, 60.0) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_an_english_only_checkpoint_transcribes_as_openai_whisper(tmp_path, speech):
    """An English-only checkpoint (n_vocab 51,864: its vocabulary holds the language tokens, its decoder never reads
    one): the prompt is [sot] alone — with timestamps the whole prompt ends at sot — and the language "en", as
    openai-whisper's; sequential with word timestamps and the previous text, and the VAD-batched path. Both crashed
    before (language detection over no candidates; then a decoder call with no new token)."""
    from mmformer.longform import transcribe_files

    torch.manual_seed(1)
    dims = ModelDimensions(**{**asdict(DIMS), "n_vocab": 51864})
    ref = Whisper(dims)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm_scale else 0.05 * torch.randn_like(p))
    path = tmp_path / "english.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": ref.state_dict()}, path)
    ref, model = ref.eval(), from_openai_whisper(path)
    assert not ref.is_multilingual and not model.config.generation.language_ids
    options = dict(temperature=0.0, word_timestamps=True, condition_on_previous_text=True)
    clip = speech[: 20 * SR]
    expected = whisper.transcribe(ref, clip, fp16=False, **options)
    ours = transcribe_sequential(model, clip, **options)
    assert_same_transcript(ours, expected, words=True)
    assert ours["language"] == "en" and sum(len(s["words"]) for s in ours["segments"]) >= 3
    (batched,) = transcribe_files(model, [clip], TranscribeOptions(temperature=0.0), vad=True)
    assert batched["language"] == "en" and batched["segments"]


def test_hallucination_silence_skip_equals_openai_whisper(models, speech):
    """With hallucination_silence_threshold, the random model's improbable words count as hallucinations: both
    implementations skip the same silences and drop the same segments (here, all of them)."""
    ref_model, model = models
    options = dict(temperature=0.0, word_timestamps=True, hallucination_silence_threshold=1.0, clip_timestamps="0,6")
    ref = whisper.transcribe(ref_model, speech, fp16=False, **options)
    ours = transcribe_sequential(model, speech, **options)
    assert_same_transcript(ours, ref, words=True)
    without = transcribe_sequential(model, speech, **{**options, "hallucination_silence_threshold": None})
    assert sum(len(s["words"]) for s in without["segments"]) > sum(len(s["words"]) for s in ours["segments"])


def test_a_clip_past_the_files_end_gives_nothing(models, speech):
    """``--clip-timestamps`` is one string for every file: a clip starting past a short file's end made a window
    longer than 30 s and stopped the whole run; now a clip ends at its file's end (openai-whisper decodes the
    padding there, a window of silence)."""
    _, model = models
    short = speech[: 3 * SR]
    assert transcribe_sequential(model, short, temperature=0.0, clip_timestamps="5,7")["segments"] == []
    within = transcribe_sequential(model, short, temperature=0.0, clip_timestamps="1,2")
    assert transcribe_sequential(model, short, temperature=0.0, clip_timestamps="1,2,5,7") == within


@pytest.mark.parametrize("logprob_threshold", [-1.0, -100.0], ids=["forced", "not-needed"])
def test_fallback_temperature_equals_openai_whisper(models, speech, logprob_threshold):
    """The random model's windows average about -6 nats per token: a -1 threshold forces the fallback through
    every temperature (sampling never reaches it), -100 keeps temperature 0."""
    ref_model, model = models
    options = dict(temperature=(0.0, 0.5, 1.0), logprob_threshold=logprob_threshold, clip_timestamps="0,10")
    ref = whisper.transcribe(ref_model, speech, fp16=False, **options)
    ours = transcribe_sequential(model, speech, generator=torch.Generator().manual_seed(0), **options)
    assert ours["segments"][0]["temperature"] == ref["segments"][0]["temperature"]
    assert ref["segments"][0]["temperature"] == (1.0 if logprob_threshold == -1.0 else 0.0)


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_speech_guard_equals_openai_whisper(models, kind):
    """60 s of silence or white noise. A random model's no-speech probability is about 1/V, so it is no guard at
    openai's default threshold (0.6: both then write the same nonsense, see the speech test); at a threshold below
    it, with the log-probability check, both skip every window: no segment, no word."""
    ref_model, model = models
    generator = torch.Generator().manual_seed(1)
    audio = torch.zeros(60 * SR) if kind == "silence" else 0.1 * torch.randn(60 * SR, generator=generator)
    options = dict(temperature=0.0, no_speech_threshold=1e-9, word_timestamps=True)
    ref = whisper.transcribe(ref_model, audio, fp16=False, **options)
    ours = transcribe_sequential(model, audio, **options)
    assert_same_transcript(ours, ref, words=True)
    assert ours["segments"] == [] and ours["text"] == ""
    # a window whose text is probable enough (above logprob_threshold) is kept despite its no-speech probability
    options = dict(temperature=0.0, no_speech_threshold=1e-9, logprob_threshold=-100.0, clip_timestamps="0,5")
    ref = whisper.transcribe(ref_model, audio, fp16=False, **options)
    ours = transcribe_sequential(model, audio, **options)
    assert_same_transcript(ours, ref, words=False)
    assert ours["segments"]


def test_log_mel_of_the_whole_file_equals_openai_whisper(models, speech):
    _, model = models
    expected = whisper.log_mel_spectrogram(speech, 80, padding=whisper.audio.N_SAMPLES)
    mel = log_mel(model, speech)
    assert mel.shape == expected.shape
    assert (mel - expected).abs().max() < 1e-4


def test_batched_windows_equal_one_by_one_and_openai_decode(models, speech):
    """Three windows with prompts of different lengths (left-padded together) give each window's tokens alone, which
    are openai-whisper's ``decode`` tokens; beam search (beam_size=2) too."""
    ref_model, model = models
    mel = log_mel(model, speech)
    windows = torch.stack([mel[:, s : s + 3000] for s in (0, 1234, 2600)])  # (3, 80, 3000)
    prompts = [[], [440, 1002], [2425, 13, 50400, 1451, 732]]
    options = TranscribeOptions(language="en")
    together = decode_windows(model, windows, options, 0.0, prompts)
    for window, prompt, batched in zip(windows, prompts, together):
        alone = decode_windows(model, window, options, 0.0, [prompt])[0]
        assert batched["tokens"] == alone["tokens"] and batched["text"] == alone["text"]
        assert batched["avg_logprob"] == pytest.approx(alone["avg_logprob"], rel=1e-4)
        ref = whisper.decode(ref_model, window, DecodingOptions(language="en", fp16=False, prompt=prompt or None))
        assert alone["tokens"] == ref.tokens and alone["text"] == ref.text
        assert alone["no_speech_prob"] == pytest.approx(ref.no_speech_prob, rel=1e-4)
        assert alone["avg_logprob"] == pytest.approx(ref.avg_logprob, rel=1e-4)
    # the language detected per window, and decoding without timestamp tokens
    for options, ref_options in (
        (TranscribeOptions(), DecodingOptions(fp16=False)),
        (TranscribeOptions(language="en", without_timestamps=True), DecodingOptions("transcribe", "en", fp16=False,
                                                                                    without_timestamps=True)),
    ):  # fmt: skip
        ours = decode_windows(model, windows[1], options, 0.0)[0]
        ref = whisper.decode(ref_model, windows[1], ref_options)
        assert (ours["tokens"], ours["language"]) == (ref.tokens, ref.language)
    beams = decode_windows(model, windows[:2], TranscribeOptions(language="en", beam_size=2), 0.0, prompts[:2])
    for window, prompt, beam in zip(windows, prompts, beams):
        options = DecodingOptions(language="en", fp16=False, beam_size=2, prompt=prompt or None)
        ref = whisper.decode(ref_model, window, options)
        assert beam["tokens"] == ref.tokens and beam["sum_logprob"] == pytest.approx(
            ref.avg_logprob * (len(ref.tokens) + 1), rel=1e-4
        )


def test_timestamp_rules_equal_openai_whisper():
    """Random logits and histories of text and timestamp tokens: the same logits masked as ApplyTimestampRules."""
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    ours = TimestampRules(WhisperTokens.from_tokenizer(_tokenizer()), max_initial_timestamp_index=50)
    ts, eot = tokenizer.timestamp_begin, tokenizer.eot
    generator = torch.Generator().manual_seed(0)
    for step in (0, 1, 2, 3, 5, 8):
        prompt = torch.tensor([[50258, 50259, 50359]] * 6)
        history = torch.randint(0, 300, (6, step), generator=generator)
        stamps = ts + torch.randint(0, 200, (6, step), generator=generator)
        history = torch.where(torch.rand(6, step, generator=generator) < 0.5, stamps, history)
        tokens = torch.cat([prompt, history], dim=1)
        logits = torch.randn(6, 51865, generator=generator) * 3
        logits[1, ts:] += 8  # a row whose timestamps dominate
        logits[2, eot] += 20
        expected = logits.clone()
        ApplyTimestampRules(tokenizer, 3, 50).apply(expected, tokens)
        assert torch.equal(ours(logits.clone(), tokens, step), expected), step


def _tokenizer():
    from mmformer.convert.openai_whisper import openai_tokenizer

    return openai_tokenizer(51865)


def test_dtw_equals_openai_whisper():
    generator = torch.Generator().manual_seed(0)
    for shape in ((1, 1), (3, 40), (12, 300), (25, 25)):
        x = torch.randn(*shape, generator=generator)
        x[:, 5:7] = 0.0  # ties
        ours = dtw(x.double().numpy())
        ref = openai_dtw(x)
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1]), shape


def test_options_follow_openai_whisper_and_name_bad_values():
    signature = inspect.signature(whisper.transcribe).parameters
    defaults = TranscribeOptions()
    for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
                 "condition_on_previous_text", "initial_prompt", "carry_initial_prompt", "word_timestamps",
                 "prepend_punctuations",
                 "append_punctuations", "clip_timestamps", "hallucination_silence_threshold"):  # fmt: skip
        assert getattr(defaults, name) == signature[name].default, name
    assert defaults.temperature == signature["temperature"].default
    assert TranscribeOptions(temperature=0).temperature == (0.0,)
    assert TranscribeOptions(clip_timestamps="1.5,4").clip_seconds() == [1.5, 4.0]
    for bad, match in (
        (dict(temperature=-1), "temperature: expected a number >= 0"),
        (dict(task="summarise"), "task: expected one of"),
        (dict(beam_size=0), "beam_size: expected None or an int >= 1, got 0"),
        (dict(clip_timestamps="a,b"), "clip_timestamps"),
        (dict(word_timestamps=True, without_timestamps=True), "word_timestamps=True needs timestamp tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            TranscribeOptions(**bad)
    with pytest.raises(TypeError, match="unknown transcribe option"):
        TranscribeOptions.build(beam_width=3)
    result = {"compression_ratio": 3.0, "avg_logprob": -0.5, "no_speech_prob": 0.0}
    assert needs_fallback(result, defaults)
    assert not needs_fallback({**result, "compression_ratio": 1.0}, defaults)
    assert not needs_fallback(
        {**result, "avg_logprob": -2.0, "compression_ratio": 1.0, "no_speech_prob": 0.9}, defaults
    )


def test_cross_attention_scores_are_the_scaled_query_key_products(make_model_config):
    """The opt-in collector keeps q·kᵀ/√hs of the chosen heads (grouped-query heads read their key head), against a
    float64 product of the layer's own projections; collecting changes no logit."""
    from mmformer.layers.attention import CrossAttentionScores
    from mmformer.model import MultimodalTransformer

    model = MultimodalTransformer(make_model_config(stack=dict(n_kv_heads=2))).double().eval()
    memory = torch.randn(2, 7, 16, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 9, 4], [1, 3, 3, 8]])
    collector = CrossAttentionScores({0: [1, 3], 1: [0]})
    with torch.no_grad():
        logits = model.decode(ids, memory, cross_scores=collector)
        assert torch.equal(logits, model.decode(ids, memory))
        block = model.stack("decoder").blocks[0]
        x = block.attn(model.text_embed(ids), causal=True)  # the input of block 0's cross-attention sublayer
        cross = block.cross_attn.fn
        q = cross.q(block.cross_attn.norm(x)).view(2, 4, 4, 4).transpose(1, 2)  # (B, nh, T, hs)
        k, _ = cross._memory_heads(cross._memory_kv(memory))  # (B, nkv, S, hs)
    expected = torch.stack([q[:, h] @ k[:, h // 2].transpose(-1, -2) / 2.0 for h in (1, 3)], dim=1)  # √hs = 2
    assert sorted(collector.scores) == [0, 1] and collector.scores[1].shape == (2, 1, 4, 7)
    assert (collector.scores[0].double() - expected).abs().max() <= 1e-6 * expected.abs().max()
