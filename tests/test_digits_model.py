"""The trained demo model (data/digits_model, from `make demo`) on the digits test split, through the public API:
ZeroShotClassifier, caption and transcribe reach the demo's targets."""

from pathlib import Path

import pytest

from mmformer.demo import evaluate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results():
    return evaluate(ROOT / "data" / "digits_model", ROOT / "data" / "digits" / "test.jsonl")


def test_zero_shot_classifies_test_images_and_audio(results):
    assert results["n_single"] == 200
    assert results["image_zeroshot_acc"] >= 0.90
    assert results["audio_zeroshot_acc"] >= 0.80


def test_captions_and_transcripts_of_the_test_split(results):
    assert results["n_test"] == 400
    assert results["caption_cer"] <= 0.10
    assert results["speech_wer"] <= 0.25
