"""VAD-batched long-form speed (issue #25): Silero's probabilities from its sequence model (one session call per 512
frames) equal the frame-by-frame model's; packed windows (pauses cut, faster-whisper's collect_chunks) fit the model
and map their times back onto the file's timeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmformer.longform import TranscribeOptions, VadOptions, transcribe_files
from mmformer.longform.batched import _unpack_times
from mmformer.longform.vad import (
    VAD_FRAME,
    Window,
    cut_and_merge,
    silero_model,
    silero_package,
    speech_probabilities,
    speech_regions,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository: the recording is built by one function
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

RATE = 16000


# ---------------------------------------------------------------------- Silero's probabilities
def _frame_by_frame(wave: torch.Tensor) -> np.ndarray:
    """Silero's stock ONNX wrapper frame after frame, as its get_speech_timestamps runs it (the last frame padded)."""
    model = silero_model()
    model.reset_states()
    x = torch.nn.functional.pad(wave, (0, -wave.shape[0] % VAD_FRAME))
    return np.array([model(x[i : i + VAD_FRAME], RATE).item() for i in range(0, x.shape[0], VAD_FRAME)])


def test_sequence_model_gives_the_frame_by_frame_probabilities_and_timestamps():
    """The sequence model runs the same network with its frame loop inside: bit-identical here (max abs diff 0.0 on
    5 min of digits; the bound leaves room for another CPU's kernels), and the speech timestamps are identical."""
    silero_package()
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    wave = digits_recording(30, seed=60, noise=0.003)[0]  # ~60 s
    ours = np.array(speech_probabilities([wave])[0])
    theirs = _frame_by_frame(wave)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-5
    kwargs = dict(threshold=0.5, sampling_rate=RATE, min_speech_duration_ms=100, min_silence_duration_ms=250,
                  speech_pad_ms=0, audio_length_samples=wave.shape[0])  # fmt: skip
    stamps = get_speech_timestamps_from_probs(list(ours), **kwargs)
    assert stamps == get_speech_timestamps_from_probs(list(theirs), **kwargs) and len(stamps) >= 25


def test_the_vad_leaves_torch_threads_as_they_were():
    """silero-vad's import sets torch's threads to 1 for the whole process; through mmformer it does not (checked in a
    fresh process: the import happens once per process)."""
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from mmformer.longform.vad import speech_regions\n"
        "speech_regions(torch.randn(16000) * 0.01, 16000)\n"
        "print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split()[-1] == "2", out.stdout + out.stderr


def test_files_on_threads_equal_files_alone():
    waves = [digits_recording(n, seed=70 + n)[0] for n in (2, 7, 4)]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the files run on two threads
    try:
        together = speech_probabilities(waves)
    finally:
        torch.set_num_threads(torch_threads)
    assert together == [speech_probabilities([w])[0] for w in waves]
    assert [len(p) for p in together] == [-(-w.shape[0] // VAD_FRAME) for w in waves]


# ---------------------------------------------------------------------- packed windows
@pytest.mark.parametrize("value", [-1, 2.5, "400"])
def test_pack_gap_refuses_bad_values_by_name(value):
    with pytest.raises(ValueError, match="pack_gap_ms"):
        VadOptions(pack_gap_ms=value)
    assert VadOptions(pack_gap_ms=None).pack_gap(RATE) is None and VadOptions(pack_gap_ms=250).pack_gap(8000) == 2000


def test_packing_cuts_pauses_to_the_gap_and_fits_the_window():
    regions = [(0, 100), (400, 500), (520, 600), (1000, 1290)]
    windows = cut_and_merge(regions, file=2, max_samples=300, merge=True, gap=40)
    # (0,100)+(400,500): pause 300 cut to 40 (20 kept after, 20 before): 240 samples; (520,600) would make 340;
    # (520,600)+(1000,1290): 80 + 40 + 290 > 300
    assert windows == [
        Window(2, 0, 500, ((0, 100), (400, 500)), ((0, 120), (380, 500))),
        Window(2, 520, 600, ((520, 600),)),
        Window(2, 1000, 1290, ((1000, 1290),)),
    ]
    assert [w.samples for w in windows] == [240, 80, 290]
    wave = torch.arange(1300, dtype=torch.float32)
    assert torch.equal(windows[0].audio(wave), torch.cat([wave[0:120], wave[380:500]]))
    assert torch.equal(windows[1].audio(wave), wave[520:600])
    # a pause no longer than the gap stays whole: one span, the window a span of the file
    close = cut_and_merge([(0, 100), (130, 200)], file=0, max_samples=300, merge=True, gap=40)
    assert close == [Window(0, 0, 200, ((0, 100), (130, 200)))] and close[0].samples == 200
    # without a gap: whisperX's spans, pauses kept
    assert cut_and_merge(regions, 2, 300, True) == cut_and_merge(regions, 2, 300, True, None)
    assert [w.samples for w in cut_and_merge(regions, 2, 300, True)] == [100, 200, 290]


def test_packed_window_times_map_back_to_the_file():
    w = Window(0, 0, 500, ((0, 100), (400, 500)), ((0, 120), (380, 500)))
    rate = 100  # one sample = 10 ms
    assert w.file_time(0.5, rate) == pytest.approx(0.5)  # in the first span
    assert w.file_time(1.3, rate) == pytest.approx(3.9)  # 10 samples into the second span (input 120 = file 380)
    assert w.file_time(1.2, rate) == pytest.approx(3.8)  # the border: a start lies in the later span ...
    assert w.file_time(1.2, rate, end=True) == pytest.approx(1.2)  # ... an end in the earlier one
    assert w.file_time(9.0, rate) == pytest.approx(5.0)  # past the input: the last span's end
    segments = [{"start": 0.1, "end": 1.3, "words": [
        {"word": " a", "start": 0.1, "end": 0.5}, {"word": " b", "start": 1.15, "end": 1.4},
        {"word": " c", "start": 1.1, "end": 1.25}]}]  # fmt: skip
    _unpack_times(w, segments, rate)
    words = segments[0]["words"]
    assert [(x["start"], x["end"]) for x in words] == [(0.1, 0.5), (3.8, 4.0), (1.1, 1.2)]  # " b": middle in span 2
    assert (segments[0]["start"], segments[0]["end"]) == (0.1, 1.2)  # from its words
    no_words = [{"start": 0.1, "end": 1.3}]
    _unpack_times(w, no_words, rate)
    assert no_words == [{"start": 0.1, "end": 3.9}]


def _locate(needle: torch.Tensor, haystack: torch.Tensor) -> int:
    """The sample where ``needle`` occurs in ``haystack`` (exactly: both are cut from one noisy recording)."""
    hits = (haystack[: haystack.shape[0] - needle.shape[0] + 1] == needle[0]).nonzero().flatten().tolist()
    found = [i for i in hits if torch.equal(haystack[i : i + needle.shape[0]], needle)]
    assert len(found) == 1, found
    return found[0]


def test_utterance_times_found_in_packed_inputs_map_back_within_0_2_s():
    """A recording with known utterance times, packed as the Whisper path packs it (30-s windows, default gap): each
    utterance found in its window's input (by its own samples), its input start and end quantized to Whisper's
    20 ms and mapped back, as a segment and as a word, lands within 0.2 s of the truth."""
    wave, truth = digits_recording(60, seed=80)  # ~2 min: several packed windows, each holding many pauses cut
    options = VadOptions()
    limit = 30 * RATE
    windows = cut_and_merge(speech_regions(wave, RATE, options), 0, limit, True, options.pack_gap(RATE))
    assert len(windows) >= 3 and all(0 < w.samples <= limit for w in windows)
    assert sum(bool(w.pieces) for w in windows) >= 2
    for w in windows:  # every speech region lies whole inside one span of its window
        assert all(any(a <= s and e <= b for a, b in w.spans) for s, e in w.regions)
    checked = 0
    for t in truth:
        start, end = round(t["start"] * RATE), round(t["end"] * RATE)
        middle = (start + end) // 2
        holder = [w for w in windows if any(a <= middle - 32 and middle + 32 <= b for a, b in w.spans)]
        assert len(holder) == 1, t
        w = holder[0]
        at = _locate(wave[middle - 32 : middle + 32], w.audio(wave)) + 32  # the middle's sample in the input
        quantized = [round((at + offset) / RATE / 0.02) * 0.02 for offset in (start - middle, end - middle)]
        segment = {"start": max(quantized[0], 0.0), "end": min(quantized[1], w.samples / RATE)}
        word = {"word": " x", "start": segment["start"], "end": segment["end"]}
        both = [dict(segment), {**segment, "words": [word]}]
        _unpack_times(w, both, RATE)
        for s in both:
            assert abs(s["start"] - t["start"]) < 0.2 and abs(s["end"] - t["end"]) < 0.2, (s, t, w)
        checked += 1
    assert checked == len(truth)


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.convert.openai_whisper import from_openai_whisper

    return from_openai_whisper(save_pt(random_whisper(seed=0), tmp_path_factory.mktemp("whisper") / "tiny.pt"))


FLOATS = ("avg_logprob", "no_speech_prob", "probability")  # a batch's size moves them by ~1e-7 (other kernels)


def _close(ours: dict, theirs: dict) -> None:
    """Equal results but for the decoder's floats, which agree to 1e-5 relative."""
    assert ours["text"] == theirs["text"] and len(ours["segments"]) == len(theirs["segments"])
    for a, b in zip(ours["segments"], theirs["segments"]):
        for x, y in [(a, b), *zip(a.get("words", []), b.get("words", []), strict=True)]:
            assert {k: v for k, v in x.items() if k not in (*FLOATS, "words")} == {
                k: v for k, v in y.items() if k not in (*FLOATS, "words")
            }
            assert [x[k] for k in FLOATS if k in x] == pytest.approx([y[k] for k in FLOATS if k in y], rel=1e-5)


def test_whisper_packed_windows_of_two_files_map_onto_each_files_speech(whisper_model):
    """Through transcribe_files (random weights, word timestamps): fewer windows than spans of the file; two files
    in one queue get what each gets alone; every segment and word time on its file's timeline inside a span its
    window read (none in a pause cut out)."""
    files = [digits_recording(40, seed=90)[0], digits_recording(36, seed=91, offset=7)[0]]  # ~70 s each
    options = TranscribeOptions(temperature=0.0, language="en", word_timestamps=True)
    vad = VadOptions()
    together = transcribe_files(whisper_model, files, options=options, vad=vad, batch_size=4)
    alone = [transcribe_files(whisper_model, [f], options=options, vad=vad, batch_size=4)[0] for f in files]
    for ours, theirs in zip(together, alone):
        _close(ours, theirs)
    for wave, result in zip(files, together):
        regions = speech_regions(wave, RATE, vad)
        packed = cut_and_merge(regions, 0, 30 * RATE, True, vad.pack_gap(RATE))
        assert len(packed) < len(cut_and_merge(regions, 0, 30 * RATE, True)) and result["segments"]
        spans = [(a / RATE, b / RATE) for w in packed for a, b in w.spans]

        def inside(t: float, spans: list = spans) -> bool:
            return any(a - 1e-3 <= t <= b + 1e-3 for a, b in spans)

        for segment in result["segments"]:
            assert segment["start"] <= segment["end"] and inside(segment["start"]) and inside(segment["end"])
            for word in segment["words"]:
                assert segment["start"] <= word["start"] <= word["end"] <= segment["end"]
                assert inside(word["start"]) and inside(word["end"])
        starts = [s["start"] for s in result["segments"]]
        assert starts == sorted(starts) and any(s["words"] for s in result["segments"])
