"""VAD-batched long-form transcription (issue #25) on the shipped digits model: recordings of test-split utterances
with pauses and background noise, built here (seeded); many files decoded from one queue; the writers' formats."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import soundfile as sf
import torch
from torchmetrics.functional.text import word_error_rate

from mmformer import load_pretrained
from mmformer.longform import TranscribeOptions, VadOptions, decoding_options, transcribe_files
from mmformer.longform.vad import Window, cut_and_merge, speech_regions, window_samples
from mmformer.longform.whisper_decode import _Sampler
from mmformer.longform.writers import to_json, to_srt, to_tsv, to_txt, to_vtt, write_result

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository: the recording is built by one function
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def model():
    return load_pretrained(ROOT / "data" / "digits_model").eval()


@pytest.fixture(scope="module")
def recording():
    return digits_recording(50, seed=1)  # ~100 s, -60 dBFS white noise


def _cut(wave, truth):
    return [wave[round(t["start"] * RATE) : round(t["end"] * RATE)] for t in truth]


def _wer(hyp: str, truth: list[dict]) -> float:
    return float(word_error_rate(hyp, " ".join(t["text"] for t in truth)))


# ---------------------------------------------------------------------- options and windows
@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 1.5), ("min_silence_ms", -1), ("speech_pad_ms", 2.5), ("trim_db", 0), ("max_window_s", 0),
     ("merge", "yes"), ("neg_threshold", 0.9)],
)  # fmt: skip
def test_vad_options_refuse_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        VadOptions(**{field: value})


def test_cut_and_merge_cuts_long_regions_and_merges_neighbours_up_to_the_window():
    regions = [(0, 100), (150, 200), (260, 600), (700, 720)]
    merged = cut_and_merge(regions, file=3, max_samples=300, merge=True)
    assert all(w.samples <= 300 and w.file == 3 for w in merged)
    # (260, 600) is 340 samples: cut into two equal pieces; a window grows while it spans at most 300 samples
    assert merged == [
        Window(3, 0, 200, ((0, 100), (150, 200))),
        Window(3, 260, 430, ((260, 430),)),
        Window(3, 430, 720, ((430, 600), (700, 720))),
    ]
    alone = cut_and_merge(regions, file=0, max_samples=300, merge=False)
    assert [(w.start, w.end) for w in alone] == [(0, 100), (150, 200), (260, 430), (430, 600), (700, 720)]


def test_transcribe_options_map_onto_decoding_options(model):
    greedy = decoding_options(model, TranscribeOptions(temperature=0.0))
    assert not greedy.sample and greedy.max_new_tokens == model.config.text.max_tokens
    sampled = decoding_options(model, TranscribeOptions(temperature=0.4))
    assert sampled.sample and sampled.temperature == 0.4
    with pytest.raises(ValueError, match=r"temperature: needs a Whisper checkpoint .*; got \(0\.4, 0\.6\)"):
        decoding_options(model, TranscribeOptions(temperature=(0.4, 0.6)))  # a fallback schedule: never run here
    with pytest.raises(ValueError, match="task"):
        decoding_options(model, TranscribeOptions(task="translate"))  # the digits model has no task tokens


# ---------------------------------------------------------------------- the digits recording
def test_vad_finds_every_utterance_within_0_2_s(recording):
    wave, truth = recording
    regions = speech_regions(wave, RATE, VadOptions())
    assert len(regions) == len(truth)
    starts = torch.tensor([r[0] / RATE - t["start"] for r, t in zip(regions, truth)])
    ends = torch.tensor([r[1] / RATE - t["end"] for r, t in zip(regions, truth)])
    assert starts.abs().max() < 0.2 and ends.abs().max() < 0.2, (starts, ends)


def test_vad_path_segments_and_wer_on_a_digits_recording(model, recording):
    """Segments fall on the utterances (within 0.2 s); the WER stays near the clips' own (issue #25: within +0.01 of
    one by one, tested below)."""
    wave, truth = recording
    result = transcribe_files(model, [wave], vad=True)[0]
    segments = result["segments"]
    assert len(segments) == len(truth)
    for segment, t in zip(segments, truth):
        assert abs(segment["start"] - t["start"]) < 0.2 and abs(segment["end"] - t["end"]) < 0.2, (segment, t)
    one_by_one = _wer(" ".join(model.transcribe(_cut(wave, truth))), truth)
    vad = _wer(result["text"], truth)
    assert one_by_one < 0.03
    assert vad < 0.05, (vad, one_by_one)


def test_vad_path_wer_within_0_01_of_one_by_one(model, recording):
    wave, truth = recording
    one_by_one = _wer(" ".join(model.transcribe(_cut(wave, truth))), truth)
    assert _wer(transcribe_files(model, [wave], vad=True)[0]["text"], truth) <= one_by_one + 0.01


def test_the_shipped_model_does_not_read_the_silence_around_speech(model):
    """Why the VAD path can match the clips: the shipped model was trained with silence around its speech (issue #26's
    recipe). Measured on these 30 clips: as cut 0.000, 20 ms of extra silence before each 0.014 (one word of 70),
    0.5 s 0.057; the model before it went from 0.015 to 0.36 with 20 ms (and, on the issue's figures, to 0.575 with
    0.3 s and 1.057 with 1 s around each clip)."""
    wave, truth = digits_recording(30, seed=2, noise=0.0)
    clips = _cut(wave, truth)
    as_cut = _wer(" ".join(model.transcribe(clips)), truth)
    assert as_cut < 0.05
    for lead, bound in ((RATE // 50, as_cut + 0.02), (RATE // 2, 0.1)):
        late = _wer(" ".join(model.transcribe([torch.cat([torch.zeros(lead), c]) for c in clips])), truth)
        assert late <= bound, (lead, as_cut, late)


def test_a_file_longer_than_the_trained_clips_is_cut_at_its_speech(model):
    """The digits model's position table reaches 16 s, its clips (and ``model.transcribe``'s cut) 8 s: a 10-16 s
    file read whole lost most of its words (a 15-s file gave three of its sixteen digits); by default a file longer
    than the processor's ``max_seconds`` goes through the VAD path."""
    wave, truth = digits_recording(6, seed=7, pause=(0.5, 1.5))
    assert model.processor.audio.max_seconds * RATE < wave.shape[0] <= 16 * RATE, wave.shape[0] / RATE
    default = transcribe_files(model, [wave])[0]
    assert default == transcribe_files(model, [wave], vad=True)[0]
    assert _wer(default["text"], truth) < 0.1, (default["text"], truth)


def test_many_files_batched_equal_file_by_file(model):
    """Eight recordings decoded from one queue (batch 16) give each file the text and segments it gets alone."""
    files = [digits_recording(6, seed=10 + i, offset=6 * i)[0] for i in range(8)]
    together = transcribe_files(model, files, vad=True, batch_size=16)
    alone = [transcribe_files(model, [f], vad=True, batch_size=16)[0] for f in files]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["segments"] for r in together] == [r["segments"] for r in alone]


@pytest.mark.parametrize("vad", [True, False])
def test_a_window_shorter_than_the_stft_centring_transcribes_alone_as_in_a_batch(model, vad):
    """A recording whose last window (or whole self) is shorter than n_fft / 2 samples (200 here) stopped the whole
    run with "audio: needs at least 201 samples" at batch size 1, and was transcribed beside longer windows: now the
    same text at every batch size, and the files batched with it are transcribed."""
    window = window_samples(model, VadOptions(), RATE)  # the longest window the model reads
    speech = digits_recording(3, seed=4)[0]
    tail = torch.cat([speech, torch.zeros(window - len(speech) % window), 0.01 * torch.ones(100)])  # a 100-sample tail
    files = [speech[:100], tail, speech]
    one_by_one = transcribe_files(model, files, vad=vad, batch_size=1)
    together = transcribe_files(model, files, vad=vad, batch_size=16)
    assert [r["text"] for r in one_by_one] == [r["text"] for r in together]
    assert together[2]["text"] and "error" not in together[0]


@pytest.mark.parametrize("kind", ["silence", "white noise"])
def test_silence_and_noise_give_no_words(model, kind):
    gen = torch.Generator().manual_seed(0)
    wave = torch.zeros(60 * RATE) if kind == "silence" else 0.1 * torch.randn(60 * RATE, generator=gen)
    seconds = []
    result = transcribe_files(model, [wave], progress=lambda s, total: seconds.append((s, total)))[0]
    assert result["text"] == "" and result["segments"] == []
    assert abs(sum(s for s, _ in seconds) - 60.0) < 1e-6 and seconds[0][1] == 60.0


def test_unreadable_files_are_reported_by_name_and_the_others_transcribed(model, tmp_path):
    good = tmp_path / "good.flac"
    sf.write(good, digits_recording(3, seed=3)[0].numpy(), RATE)
    corrupt, empty = tmp_path / "corrupt.flac", tmp_path / "empty.wav"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    sf.write(empty, torch.zeros(0).numpy(), RATE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = transcribe_files(model, [corrupt, good, empty, torch.zeros(0)], vad=True)
    assert "corrupt.flac" in results[0]["error"] and "empty.wav" in results[2]["error"]
    assert "inputs[3]" in results[3]["error"]
    assert "error" not in results[1] and len(results[1]["segments"]) == 3
    assert sum("corrupt.flac" in str(w.message) or "empty.wav" in str(w.message) for w in caught) == 2
    with pytest.raises(TypeError, match="inputs"):
        transcribe_files(model, str(good))
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        transcribe_files(model, [torch.zeros(2, 100)])


def test_waveform_arrays_are_read_as_model_transcribe_reads_them(model):
    """int16 PCM scaled by the processor's rule and arrays recorded at another rate (``sample_rate``) resampled: the
    text of a short recording is ``model.transcribe``'s (issue 3 of the bug hunt: int16 arrays were refused, and
    arrays had no rate)."""
    from mmformer.data.io import resample

    wave = digits_recording(2, seed=5)[0]  # a few seconds: decoded whole, as model.transcribe decodes it
    pcm = (wave * 32767).round().to(torch.int16)
    assert transcribe_files(model, [pcm.numpy()]) == transcribe_files(model, [pcm.float() / 32768])
    assert transcribe_files(model, [pcm])[0]["text"] == model.transcribe([pcm])[0] != ""
    low = (resample(wave, RATE, 8000) * 32767).round().to(torch.int16)
    assert transcribe_files(model, [low], sample_rate=8000)[0]["text"] == model.transcribe([low], sample_rate=8000)[0]
    for bad in (0, 16000.5, "16k"):
        with pytest.raises(ValueError, match="sample_rate"):
            transcribe_files(model, [wave], sample_rate=bad)
    with pytest.raises(ValueError, match="sample_rate: cannot resample 44101 Hz"):
        transcribe_files(model, [wave], sample_rate=44101)
    with pytest.raises(TypeError, match=r"inputs\[0\].*int16"):
        transcribe_files(model, [pcm.int()])  # int32: no scale is known


@pytest.mark.slow
def test_three_minutes_of_digits(model):
    """The issue's recording: ~3.5 min of test-split utterances with 0.3-2 s pauses over noise."""
    wave, truth = digits_recording(100, seed=0)
    assert wave.shape[0] / RATE > 180
    result = transcribe_files(model, [wave], vad=True)[0]
    assert len(result["segments"]) == len(truth)
    for segment, t in zip(result["segments"], truth):
        assert abs(segment["start"] - t["start"]) < 0.2 and abs(segment["end"] - t["end"]) < 0.2
    one_by_one = _wer(" ".join(model.transcribe(_cut(wave, truth))), truth)
    assert _wer(result["text"], truth) <= one_by_one + 0.01  # measured 0.0147 (one by one 0.0098)


# ---------------------------------------------------------------------- writers
RESULT = {
    "text": " Hello there. Two",
    "language": "en",
    "segments": [
        {"id": 0, "seek": 0, "start": 0.5, "end": 2.25, "text": " Hello there.", "tokens": [1, 2]},
        {"id": 1, "seek": 0, "start": 3601.0, "end": 3603.5, "text": " Two --> three", "tokens": [3]},
    ],
}
WORDS = [
    [{"word": " Hello", "start": 0.6, "end": 1.0, "probability": 0.9},
     {"word": " there.", "start": 1.1, "end": 2.2, "probability": 0.8}],
    [{"word": " Two", "start": 3601.2, "end": 3602.0, "probability": 0.7},
     {"word": " three", "start": 3602.5, "end": 3603.4, "probability": 0.6}],
]  # fmt: skip


def _with_words():
    result = json.loads(json.dumps(RESULT))
    for segment, words in zip(result["segments"], WORDS):
        segment["words"] = words
    return result


def _with_a_wordless_segment():
    """Word timestamps where a segment has none (openai-whisper's transcribe blanks some, and a word spanning two
    segments leaves one empty), and one whose word list is absent: its writers give them no cue."""
    result = _with_words()
    blank = {"id": 2, "seek": 0, "start": 3604.0, "end": 3605.0, "text": "", "tokens": [], "words": []}
    absent = {"id": 3, "seek": 0, "start": 3606.0, "end": 3607.0, "text": " four", "tokens": [4], "words": []}
    result["segments"][1:1] = [blank]
    result["segments"].append(absent)
    return result


@pytest.mark.parametrize("words", [False, True, "some segments without"])
def test_writers_match_openai_whisper(words):
    whisper_utils = pytest.importorskip("whisper.utils")
    result = {False: lambda: RESULT, True: _with_words, "some segments without": _with_a_wordless_segment}[words]()
    ours = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}
    for name, write in ours.items():
        buffer = io.StringIO()
        whisper_utils.get_writer(name, ".").write_result(result, buffer)
        assert write(result) == buffer.getvalue(), name


def test_subtitles_parse_and_agree_with_the_json(model, tmp_path):
    import srt
    import webvtt

    wave, truth = digits_recording(8, seed=4)  # "zero six seven one" pauses 0.3 s inside: two segments
    result = transcribe_files(model, [wave], vad=True)[0]
    paths = write_result(result, tmp_path / "talk", "all")
    assert [p.name for p in paths] == ["talk.txt", "talk.json", "talk.srt", "talk.vtt", "talk.tsv"]
    stored = json.loads((tmp_path / "talk.json").read_text())
    assert stored == result and len(stored["segments"]) >= len(truth) - 1
    subs = list(srt.parse((tmp_path / "talk.srt").read_text()))
    cues = list(webvtt.read(str(tmp_path / "talk.vtt")))
    for segment, sub, cue in zip(stored["segments"], subs, cues, strict=True):
        assert sub.content == cue.text == segment["text"]
        assert abs(sub.start.total_seconds() - segment["start"]) < 1e-3
        assert abs(sub.end.total_seconds() - segment["end"]) < 1e-3
        assert abs(cue.start_in_seconds + cue.start_time.milliseconds / 1000 - segment["start"]) < 1e-3
    assert (tmp_path / "talk.txt").read_text().splitlines() == [s["text"] for s in stored["segments"]]
    with pytest.raises(ValueError, match="formats"):
        write_result(result, tmp_path / "x", ["docx"])


# ---------------------------------------------------------------------- a Whisper checkpoint
@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.convert.openai_whisper import from_openai_whisper

    return from_openai_whisper(save_pt(random_whisper(seed=0), tmp_path_factory.mktemp("whisper") / "tiny.pt"))


PROBABILITIES = ("avg_logprob", "no_speech_prob", "probability")  # the float32 model's own numbers


def _rounded(results: list[dict]) -> list[dict]:
    """Results without their probabilities (ids, texts, times: what a rounding difference must not change)."""
    strip = lambda d: {k: v for k, v in d.items() if k not in PROBABILITIES}  # noqa: E731
    return [
        {**strip(r), "segments": [{**strip(s), "words": [strip(w) for w in s.get("words", [])]} for s in r["segments"]]}
        for r in results
    ]


def _probabilities(results: list[dict]) -> list[float]:
    """Every probability and log-probability of the results, in order (per segment, then its words)."""
    return [
        item[k]
        for r in results
        for s in r["segments"]
        for item in [s, *s.get("words", [])]
        for k in PROBABILITIES
        if k in item and item[k] is not None
    ]


@pytest.mark.parametrize("words", [False, True])
def test_whisper_vad_windows_of_many_files_decode_together(whisper_model, words, monkeypatch):
    """VAD windows (merged up to 30 s) of two files in one queue give each file what it gets alone; segments lie on
    the file's timeline, with word timings when asked."""
    files = [digits_recording(n, seed=30 + n, offset=n)[0] for n in (24, 10)]
    options = TranscribeOptions(temperature=0.0, language="en", word_timestamps=words)
    margins = []  # each greedy step's top-2 logit margin (the ids chosen, after Whisper's rules)
    update = _Sampler.update

    def spy(self, runner, tokens, logits, sums):
        top = logits.float().topk(2, dim=-1).values  # (N, 2)
        margins.extend((top[:, 0] - top[:, 1])[tokens[:, -1] != self.eot].tolist())
        return update(self, runner, tokens, logits, sums)

    monkeypatch.setattr(_Sampler, "update", spy)
    spans = VadOptions(pack_gap_ms=None)  # whole spans: packed windows are tested in test_longform_speed.py
    together = transcribe_files(whisper_model, files, options=options, vad=spans, batch_size=4)
    alone = [transcribe_files(whisper_model, [f], options=options, vad=spans, batch_size=4)[0] for f in files]
    # ids, texts and times exactly equal: no greedy choice of this random model is a near-tie that float32 rounding
    # (another batch shape, another CPU's kernels: ~1e-6 of the logits) could flip ...
    assert min(margins) > 1e-4, f"a near-tie ({min(margins):.2e}) makes the ids depend on rounding"
    # ... and the probabilities equal up to that rounding: ~1e-7 of themselves under MKL_CBWR=COMPATIBLE, where 0.1%
    # of another window's encoder states leaking into a window (a batching bug) moves them by ~1.5e-5
    assert _rounded(together) == _rounded(alone)
    for mine, theirs in zip(_probabilities(together), _probabilities(alone), strict=True):
        assert mine == pytest.approx(theirs, rel=2e-6, abs=0)
    if words:
        assert sum(len(s["words"]) for r in together for s in r["segments"]) > 0
    for wave, result in zip(files, together):
        assert result["language"] == "en" and result["segments"]
        # openai-whisper's text: the tokens decoded, so its segments' texts back to back (no space added)
        assert result["text"] == "".join(segment["text"] for segment in result["segments"])
        for segment in result["segments"]:
            assert 0 <= segment["start"] < segment["end"] <= wave.shape[0] / RATE + 0.02
            assert {"avg_logprob", "no_speech_prob", "compression_ratio", "temperature"} <= set(segment)
            if words:
                assert all(segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"])
                values = [w[k] for w in segment["words"] for k in ("start", "end", "probability")]
                assert {type(v) for v in values} <= {float}, {type(v) for v in values}  # not NumPy's


@pytest.mark.parametrize(
    ("name", "value"),
    [("word_timestamps", True), ("clip_timestamps", "2,4"), ("initial_prompt", "nine"),
     ("hallucination_silence_threshold", 1.0)],
)  # fmt: skip
def test_options_a_path_would_ignore_are_refused_by_name(model, whisper_model, name, value):
    """A model trained here ignored Whisper's options, and the Whisper VAD path openai-whisper's sequential ones
    (clips, prompt, hallucination skips): the result came back as if they were not given."""
    wave = torch.zeros(RATE)
    with pytest.raises(ValueError, match=f"^{name}: needs a Whisper checkpoint"):
        transcribe_files(model, [wave], TranscribeOptions(**{name: value}))
    if name != "word_timestamps":  # the VAD path aligns words (test above)
        with pytest.raises(ValueError, match=f"^{name}: needs openai-whisper's sequential path"):
            transcribe_files(whisper_model, [wave], TranscribeOptions(**{name: value}), vad=True)
    assert transcribe_files(model, [wave], TranscribeOptions(clip_timestamps="0"))[0]["text"] == ""  # the default


def test_whisper_without_vad_is_openai_whispers_sequential_algorithm(whisper_model):
    from mmformer.longform.sequential import transcribe_sequential

    wave = digits_recording(12, seed=40)[0]
    options = TranscribeOptions(temperature=0.0, language="en")
    steps = []
    result = transcribe_files(
        whisper_model, [wave, wave[: RATE * 5]], options=options, progress=lambda *a: steps.append(a)
    )
    assert result[0] == transcribe_sequential(whisper_model, wave, options)
    total = (wave.shape[0] + 5 * RATE) / RATE
    assert {t for _, t in steps} == {total} and abs(sum(s for s, _ in steps) - total) < 0.02
    # DecodingOptions (what serving passes) map onto the same TranscribeOptions: greedy, English, no fallback
    short = decoding_options(whisper_model, options)
    assert transcribe_files(whisper_model, [wave], options=short)[0] == result[0]


def test_silero_frames_of_many_files_at_once_equal_silero_file_by_file():
    """The VAD of all inputs runs as one batch (a Silero state per file): each file's speech timestamps equal
    silero-vad's own get_speech_timestamps on it alone."""
    from mmformer.longform.vad import silero_model, silero_package, speech_regions_many

    get_speech_timestamps = silero_package().get_speech_timestamps

    waves = [digits_recording(n, seed=50 + n)[0] for n in (3, 9, 5)]
    options = VadOptions(trim_db=None, speech_pad_ms=30)
    ours = speech_regions_many(waves, RATE, options)
    for wave, regions in zip(waves, ours):
        theirs = get_speech_timestamps(wave, silero_model(), threshold=options.threshold, min_speech_duration_ms=
                                       options.min_speech_ms, min_silence_duration_ms=options.min_silence_ms,
                                       speech_pad_ms=options.speech_pad_ms)  # fmt: skip
        assert regions == [(s["start"], s["end"]) for s in theirs] and regions
