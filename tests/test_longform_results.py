"""``transcribe_files(on_result=...)``: each input's result handed on as soon as it is complete, so that a caller (the
``transcribe`` command) writes it while the others are decoded and an interruption keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmformer import load_pretrained
from mmformer.generation.options import DecodingOptions
from mmformer.longform import transcribe_files

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"


@pytest.fixture(scope="module")
def model():
    return load_pretrained(DIGITS.parent / "digits_model").eval()


@pytest.mark.parametrize("vad", [None, True])
def test_each_result_is_handed_on_once_as_soon_as_its_input_is_done(model, tmp_path, vad):
    """Four short clips and an unreadable file, one window per batch: every input's result comes once, the very dict
    returned for it (the error one first, before any decoding), and the first clip's before the last window is
    decoded (it came only with the returned list, after all of them)."""
    clips = [str(DIGITS / "audio" / "test" / f"00000{i}.flac") for i in range(4)]
    (tmp_path / "bad.flac").write_bytes(b"not audio")
    inputs = [clips[0], clips[1], str(tmp_path / "bad.flac"), clips[2], clips[3]]
    events = []
    with pytest.warns(UserWarning, match="bad.flac"):
        results = transcribe_files(
            model,
            inputs,
            DecodingOptions(do_sample=False),
            vad=vad,
            batch_size=1,
            progress=lambda seconds, total: events.append(("decoded", None, None)),
            on_result=lambda index, result: events.append(("result", index, result)),
        )
    handed = [(index, result) for kind, index, result in events if kind == "result"]
    assert sorted(index for index, _ in handed) == list(range(len(inputs)))
    assert all(result is results[index] for index, result in handed)
    assert handed[0] == (2, results[2]) and "bad.flac" in results[2]["error"] and events[0][0] == "result"
    decoded = [i for i, (kind, _, _) in enumerate(events) if kind == "decoded"]
    first_clip = next(i for i, (kind, index, _) in enumerate(events) if kind == "result" and index != 2)
    assert len(decoded) == 4 and first_clip < decoded[-1], [kind for kind, _, _ in events]
    with pytest.warns(UserWarning, match="bad.flac"):
        expected = transcribe_files(model, inputs, DecodingOptions(do_sample=False), vad=vad, batch_size=1)
    assert results == expected  # handing results on changes none of them
