"""Whisper as Whisper runs, on real speech (the espeak-ng digits clips): log-mel features equal
``WhisperFeatureExtractor``'s (audio padded or cut to 30 s), generated ids equal Hugging Face's ``generate`` with a
real Whisper generation config (prompt with a detected or chosen language and task, no timestamps, suppressed
tokens), and audio longer than 30 s is transcribed window by window, all of it.

The model is a tiny random-weight Whisper with the real vocabulary (51865 tokens) so that the checkpoint's token ids
apply; its generation config is openai/whisper-tiny's (languages in Whisper's order from 50259, tasks, the
no-timestamps token, and OpenAI's non-speech ``suppress_tokens``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES  # noqa: E402

from mmformer.convert.hf_whisper import from_hf_whisper  # noqa: E402
from mmformer.data.collate import pad_audio  # noqa: E402
from mmformer.preprocess.processor import Processor  # noqa: E402

CLIPS = Path(__file__).resolve().parents[1] / "data" / "digits" / "audio" / "test"
FEATURE_TOL = 1e-4
SR = 16000
WINDOW = 30 * SR
# openai/whisper-tiny's generation_config.json: suppress_tokens (OpenAI's non-speech tokens) and the special ids
SUPPRESS = [
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359, 503, 522, 542, 873,
    893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268, 3536, 3846, 3961, 4183, 4667, 6585, 6647,
    7273, 9061, 9383, 10428, 10929, 11938, 12033, 12331, 12562, 13793, 14157, 14635, 15265, 15618, 16553, 16604, 18362,
    18956, 20075, 21675, 22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425, 49870,
    50254, 50258, 50358, 50359, 50360, 50361, 50362,
]  # fmt: skip
EOS, START, NO_TIMESTAMPS = 50257, 50258, 50363
GENERATION = dict(
    begin_suppress_tokens=[220, EOS],
    bos_token_id=EOS,
    decoder_start_token_id=START,
    eos_token_id=EOS,
    pad_token_id=EOS,
    forced_decoder_ids=[[1, None], [2, 50359]],
    is_multilingual=True,
    lang_to_id={f"<|{code}|>": 50259 + i for i, code in enumerate(list(LANGUAGES)[:99])},
    task_to_id={"transcribe": 50359, "translate": 50358},
    max_initial_timestamp_index=50,
    max_length=448,
    no_timestamps_token_id=NO_TIMESTAMPS,
    return_timestamps=False,
    suppress_tokens=SUPPRESS,
)


@pytest.fixture(scope="module")
def hf() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_source_positions=1500, max_target_positions=448, pad_token_id=EOS,
                           bos_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=START)  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "model.encoder.embed_positions.weight":
                p.copy_(
                    1 + 0.1 * torch.randn_like(p)
                    if p.ndim == 1 and name.endswith("weight")
                    else 0.3 * torch.randn_like(p)
                )
    model.generation_config = GenerationConfig(**GENERATION)
    return model


@pytest.fixture(scope="module")
def model(hf):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from mmformer.preprocess.tokenizer import Tokenizer

    ours = from_hf_whisper(hf)
    backend = Backend(models.WordLevel({f"t{i}": i for i in range(51865)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ours.processor.tokenizer = Tokenizer(
        backend, max_length=448, pad_token=f"t{EOS}", bos_token=None, eos_token=f"t{EOS}"
    )
    return ours


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor()  # Whisper's defaults: 80 mel bins, 16 kHz, 30 s chunks


@pytest.fixture(scope="module")
def clips() -> list[torch.Tensor]:
    processor = Processor()
    return [processor.load_audio(CLIPS / f"{i:06d}.flac") for i in (2, 5, 9)]


@pytest.fixture(scope="module")
def long_clip() -> torch.Tensor:
    """45 s of real speech: test clips one after another."""
    processor, parts, total, i = Processor(), [], 0, 0
    while total < 45 * SR:
        parts.append(processor.load_audio(CLIPS / f"{i:06d}.flac"))
        total, i = total + parts[-1].shape[0], i + 1
    return torch.cat(parts)[: 45 * SR]


def features(extractor: WhisperFeatureExtractor, waves: list[torch.Tensor]) -> torch.Tensor:
    return extractor([w.numpy() for w in waves], sampling_rate=SR, return_tensors="pt").input_features


def hf_ids(hf, feats: torch.Tensor, **options) -> torch.Tensor:
    """Hugging Face Whisper's generate (its prompt, language detection and logits processors); new tokens only."""
    return hf.generate(feats, max_new_tokens=10, **options)


def text_of(ids: torch.Tensor) -> str:
    ids = ids.tolist()
    return " ".join(f"t{i}" for i in ids[: ids.index(EOS) if EOS in ids else len(ids)])


def test_features_equal_whisper_feature_extractor(model, extractor, clips, long_clip):
    audio, lengths = pad_audio(clips)  # a padded batch of 0.4–1.2 s clips
    ours = model.audio_embed.features(audio, lengths)
    reference = features(extractor, clips)
    assert ours.shape == reference.shape == (3, 80, 3000)
    assert (ours - reference).abs().max().item() < FEATURE_TOL
    # 45 s: Whisper cuts to 30 s; the windows transcription uses are the first 30 s and the 15 s after them
    long = model.audio_embed.features(long_clip[None])
    assert (long - features(extractor, [long_clip])).abs().max().item() < FEATURE_TOL
    tail = model.audio_embed.features(long_clip[None, WINDOW:])
    assert (tail - features(extractor, [long_clip[WINDOW:]])).abs().max().item() < FEATURE_TOL


def test_digits_features_are_unchanged_without_a_window(clips):
    """mmformer's own models (pad_to_seconds=None) keep their length-following features."""
    from mmformer.config import AudioConfig
    from mmformer.embedders.audio import LogMel

    audio, lengths = pad_audio(clips)
    feats = LogMel(AudioConfig())(audio, lengths)
    assert feats.shape[-1] == audio.shape[-1] // 160 + 1


def test_converted_config_follows_the_checkpoint(model):
    gen = model.config.generation
    assert model.config.audio.pad_to_seconds == 30.0 and model.processor.audio.max_seconds is None
    assert gen.language is None and gen.task == "transcribe" and gen.no_timestamps_id == NO_TIMESTAMPS
    assert gen.language_ids["en"] == 50259 and gen.task_ids == {"transcribe": 50359, "translate": 50358}
    assert gen.suppress_tokens == SUPPRESS and gen.begin_suppress_tokens == [220, EOS]


@pytest.mark.parametrize(
    "options",
    [{}, dict(language="de", task="translate"), dict(language="en", num_beams=3)],
    ids=["detected-language", "german-translate", "english-beams"],
)
def test_ids_equal_hf_generate(hf, model, extractor, clips, options):
    audio, lengths = pad_audio(clips)
    ours = model.generate(audio=audio, audio_lengths=lengths, max_new_tokens=10, **options)
    reference = hf_ids(hf, features(extractor, clips), **options)
    language = GENERATION["lang_to_id"][f"<|{options['language']}|>"] if "language" in options else None
    task = 50358 if options.get("task") == "translate" else 50359
    assert ours[:, 0].eq(START).all() and ours[:, 2].eq(task).all() and ours[:, 3].eq(NO_TIMESTAMPS).all()
    if language is not None:
        assert ours[:, 1].eq(language).all()
    assert torch.equal(ours[:, 4 : 4 + reference.shape[1]], reference)
    assert not torch.isin(ours[:, 4:], torch.tensor(SUPPRESS)).any()


def test_45_seconds_are_transcribed_window_by_window(hf, model, extractor, long_clip):
    text = model.transcribe([long_clip], sample_rate=SR, max_new_tokens=10, language="en")[0]
    windows = [long_clip[:WINDOW], long_clip[WINDOW:]]
    expected = [text_of(hf_ids(hf, features(extractor, [w]), language="en")[0]) for w in windows]
    assert text == " ".join(expected)
    assert len(expected[0].split()) > 0 and len(expected[1].split()) > 0  # both windows said something
    # a batch mixing a long and a short clip: the short one has one window, the long one two
    short = long_clip[: 3 * SR]
    texts = model.transcribe([short, long_clip], sample_rate=SR, max_new_tokens=10, language="en")
    assert texts[1] == text
    assert texts[0] == text_of(hf_ids(hf, features(extractor, [short]), language="en")[0])
