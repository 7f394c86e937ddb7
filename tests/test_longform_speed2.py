"""VAD-batched long-form speed, round 2 (issue #25): the phases of a long-form run are profiler ranges, so its wall
time splits into VAD, log-mel, encoder, decoding and word alignment (``benchmarks.longform --profile-batch-sizes``)
without changing any result; one batch holding every window of the queue gives what smaller batches give."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmformer.longform import TranscribeOptions, VadOptions, transcribe_files
from mmformer.longform.batched import PHASES

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording, phase_split  # noqa: E402


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.convert.openai_whisper import from_openai_whisper

    return from_openai_whisper(save_pt(random_whisper(seed=0), tmp_path_factory.mktemp("whisper") / "tiny.pt"))


def test_phase_split_of_a_whisper_run_covers_every_phase_and_changes_nothing(whisper_model):
    wave = digits_recording(30, seed=120)[0]  # ~55 s: two packed windows
    options = TranscribeOptions(temperature=0.0, language="en", word_timestamps=True)
    plain = transcribe_files(whisper_model, [wave], options=options, vad=VadOptions(), batch_size=4)
    profiled = []
    split = phase_split(
        lambda: profiled.append(transcribe_files(whisper_model, [wave], options=options, vad=True, batch_size=4))
    )
    assert profiled[0] == plain and plain[0]["segments"]
    assert set(split) == {"wall_s", "other_s", *(f"{phase}_s" for phase in PHASES)}
    phases = [split[f"{phase}_s"] for phase in PHASES]
    assert all(seconds > 0 for seconds in phases), split
    assert sum(phases) <= split["wall_s"] and split["other_s"] == pytest.approx(split["wall_s"] - sum(phases))


def test_phase_split_of_a_model_trained_here_counts_its_generate_as_decoding():
    """A model trained here decodes through ``generate`` (its features and encoder inside): the decode range holds
    them; the Whisper-only ranges stay empty."""
    from mmformer import load_pretrained

    model = load_pretrained(ROOT / "data" / "digits_model").eval()
    wave = digits_recording(12, seed=121)[0]
    split = phase_split(lambda: transcribe_files(model, [wave], vad=True, batch_size=4))
    assert split["vad_s"] > 0 and split["decode_s"] > 0
    assert split["log_mel_s"] == split["encoder_s"] == split["word_timestamps_s"] == 0.0
    assert split["vad_s"] + split["decode_s"] <= split["wall_s"]


def test_one_batch_of_the_whole_queue_equals_small_batches(whisper_model, monkeypatch):
    """transcribe_files' default batch of 16 holds every window of the queue (two files): one round of decoder
    steps, the same transcripts as batches of two (the decoder's floats to 1e-5: a batch's size changes kernels)."""
    import mmformer.longform.batched as batched

    files = [digits_recording(40, seed=122)[0], digits_recording(36, seed=123, offset=5)[0]]  # ~70 s each
    options = TranscribeOptions(temperature=0.0, language="en")
    small = transcribe_files(whisper_model, files, options=options, vad=True, batch_size=2)
    sizes = []
    decode = batched.decode_windows_whisper

    def counted(model, windows, waves, **kwargs):
        sizes.append(len(windows))
        return decode(model, windows, waves, **kwargs)

    monkeypatch.setattr(batched, "decode_windows_whisper", counted)
    import mmformer.longform.pipeline as pipeline

    monkeypatch.setattr(pipeline, "decode_windows_whisper", counted)
    whole = transcribe_files(whisper_model, files, options=options, vad=True)
    assert len(sizes) == 1 and sizes[0] >= 3  # every window of both files in one batch
    for a, b in zip(whole, small):
        assert a["text"] == b["text"] and len(a["segments"]) == len(b["segments"])
        for x, y in zip(a["segments"], b["segments"]):
            assert (x["tokens"], x["start"], x["end"]) == (y["tokens"], y["start"], y["end"])
            assert x["avg_logprob"] == pytest.approx(y["avg_logprob"], rel=1e-5)
