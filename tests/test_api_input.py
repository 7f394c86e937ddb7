"""Bad API input gets a ValueError/TypeError that names the argument, what was expected and what was received.

Complements the error tests next to each feature (``test_model.py``: ranks, channels, lengths past the position
tables; ``test_processor.py``, ``test_tokenizer.py``, ``test_zeroshot.py``, ``test_generation.py``: their own
arguments) with what those leave out: tensors on another device (a ``meta`` tensor stands in for "the other device"
on a CPU-only machine), dtypes, empty batches, frame counts, sample-rate mismatches, and text beyond the context
length, which is truncated with a warning where a user hands in text and refused where they hand in token ids.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from mmformer.generation.decoding import generate
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import ZeroShotClassifier

D, V = 16, 32  # tiny_model: width 16, 32-token vocabulary, 16 text positions, 8 kHz audio, 8 mel bins, 128 frames


@pytest.fixture
def processor() -> Processor:
    """A word-level tokenizer over the tiny model's 32 ids (<pad> <bos> <eos> w3 … w31), 16×16 images, 8 kHz."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, V)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer = Tokenizer(backend, max_length=16, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    return Processor(tokenizer, image=ImageProcessorConfig(image_size=16), audio=AudioProcessorConfig(sample_rate=8000))


def words(n: int) -> str:
    return " ".join(f"w{3 + i % 29}" for i in range(n))


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------------------------------- devices
def test_inputs_on_another_device_than_the_model_are_named(tiny_model):
    m, ids = tiny_model, torch.ones(1, 4, dtype=torch.long)
    on_meta = r"expected a tensor on the model's device \(cpu\), got one on meta"
    with pytest.raises(ValueError, match="pixel_values: " + on_meta):
        m.encode_image(meta(1, 3, 16, 16))
    with pytest.raises(ValueError, match="audio: " + on_meta):
        m.encode_audio(meta(1, 800))
    with pytest.raises(ValueError, match="audio_features: " + on_meta):
        m.encode_audio(audio_features=meta(1, 8, 20))
    with pytest.raises(ValueError, match="input_ids: " + on_meta):
        m.encode_text(meta(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: " + on_meta):
        m.encode_text(ids, meta(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory: " + on_meta):
        m.decode(ids, meta(1, 3, D))
    with pytest.raises(ValueError, match="memory_mask: " + on_meta):
        m.decode(ids, torch.randn(1, 3, D), meta(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="audio_lengths: " + on_meta):
        m.encode_audio(torch.randn(2, 800), meta(2, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values: " + on_meta):
        generate(m, image=meta(1, 3, 16, 16))
    cpu_lengths = m.encode_audio(torch.randn(2, 800), [800, 400])  # lengths are metadata: a list or any device
    assert cpu_lengths.shape == (2, 8)

    m.to("meta")  # the model elsewhere, the inputs on the CPU
    on_cpu = r"expected a tensor on the model's device \(meta\), got one on cpu"
    with pytest.raises(ValueError, match="pixel_values: " + on_cpu):
        m.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input_ids: " + on_cpu):
        m.encode_text(ids)
    with pytest.raises(ValueError, match="audio: " + on_cpu):
        m.encode_audio(torch.randn(1, 800))


def test_processor_refuses_meta_tensors(processor):
    with pytest.raises(ValueError, match=r"images\[0\]: expected a tensor with data; got a meta tensor of shape"):
        processor(images=[meta(3, 16, 16)])
    with pytest.raises(ValueError, match=r"audio\[0\]: expected a waveform with data; got a meta tensor"):
        processor(audio=[meta(800)], sampling_rate=8000)


# ---------------------------------------------------------------------------------------------------- dtypes, shapes
def test_model_dtype_shape_and_empty_batch_errors(tiny_model):
    m, ids = tiny_model, torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pixel_values: expected at least one 4×4 patch, got 0×0"):
        m.encode_image(torch.randn(1, 3, 0, 0))
    with pytest.raises(ValueError, match=r"audio: expected at least one waveform, got shape \(0, 800\)"):
        m.encode_audio(torch.randn(0, 800))
    with pytest.raises(TypeError, match="audio_lengths: expected integer counts, got dtype torch.float32"):
        m.encode_audio(torch.randn(2, 800), torch.tensor([800.0, 400.0]))
    with pytest.raises(TypeError, match="audio_features: expected a float tensor of log-mel features, got torch.int64"):
        m.encode_audio(audio_features=torch.zeros(1, 8, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"feature_lengths: expected shape \(2,\), one per row; got \(1,\)"):
        m.encode_audio(audio_features=torch.randn(2, 8, 20), feature_lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"feature_lengths: expected values in \[1, 20\], got \[30, 5\]"):
        m.encode_audio(audio_features=torch.randn(2, 8, 20), feature_lengths=torch.tensor([30, 5]))
    with pytest.raises(TypeError, match=r"attention_mask: expected a bool tensor \(B, T\).*got list"):
        m.encode_text(ids, [[1, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match=r"segment_ids: expected the shape of input_ids \(2, 4\), got \(2, 3\)"):
        m.encode_text(ids, segment_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"segment_ids: expected ids in \[0, 1\) \(TextConfig.n_segments=0\), got"):
        m.encode_text(ids, segment_ids=torch.ones(2, 4, dtype=torch.long))  # this model has no segment table
    with pytest.raises(TypeError, match="memory: expected float encoder token states, got torch.int64"):
        m.decode(ids, torch.ones(2, 3, D, dtype=torch.long))
    memory = torch.randn(2, 3, D)
    with torch.no_grad():  # float64 memory is cast like float64 pixels are, not refused deep inside a matmul
        torch.testing.assert_close(m.decode(ids, memory.double()), m.decode(ids, memory))


def test_generate_input_errors(tiny_model):
    image = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"generate: expected at least one image or waveform, got a batch of 0"):
        generate(tiny_model, image=torch.randn(0, 3, 16, 16))
    with pytest.raises(TypeError, match=r"prompt_ids: expected integer ids \(B, P\) or \(P,\).*got str"):
        generate(tiny_model, image=image, prompt_ids="hello")
    with pytest.raises(TypeError, match=r"pixel_values: expected a float tensor .*got torch.uint8"):
        generate(tiny_model, image=torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixel_values: expected 3 channels, got shape \(1, 1, 16, 16\)"):
        generate(tiny_model, image=torch.randn(1, 1, 16, 16))
    assert generate(tiny_model, image=image, prompt_ids=[1, 5], max_new_tokens=2).shape[1] <= 4  # lists are fine


def test_processor_pixel_errors(processor):
    with pytest.raises(ValueError, match=r"images\[1\]: expected finite pixel values; got NaN or infinity"):
        processor(images=[torch.rand(3, 8, 8), torch.full((3, 8, 8), float("nan"))])
    with pytest.raises(
        ValueError, match=r"images\[0\]: expected an image of at least 1×1 pixels; got ndarray of shape"
    ):
        processor(images=[np.zeros((0, 0, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\]: expected an image of at least 1×1 pixels; got a 0×5 image"):
        processor(images=[Image.new("RGB", (0, 5))])
    with pytest.raises(TypeError, match=r"images\[0\]: expected uint8 or float pixels; got ndarray .*uint16"):
        processor(images=[np.zeros((4, 4, 3), np.uint16)])  # 16-bit arrays: ambiguous range, refused (files are read)


# ---------------------------------------------------------------------------------------------------- sample rates
def test_sample_rate_errors(tiny_model, processor):
    wave = np.zeros(800, np.float32)
    with pytest.raises(ValueError, match=r"sampling_rate: expected a positive int \(Hz\); got True"):
        processor(audio=[wave], sampling_rate=True)
    with pytest.raises(ValueError, match=r"sample_rate: expected a positive int \(Hz\); got True"):
        AudioProcessorConfig(sample_rate=True)
    with pytest.raises(ValueError, match=r"sampling_rate: cannot resample 8001 Hz to 8000 Hz: .*\(gcd 1\)"):
        processor(audio=[wave], sampling_rate=8001)  # would need a 64-million-phase filter: refused at once
    assert processor(audio=[wave], sampling_rate=44100)["audio"].shape == (1, 146)  # usual rates resample

    tiny_model.processor = Processor(processor.tokenizer)  # 16 kHz audio settings for an 8 kHz model
    with pytest.raises(ValueError, match="processor: its audio sample_rate 16000 differs from the model's 8000"):
        tiny_model.transcribe([wave], sample_rate=8000, max_new_tokens=2)

    clf = ZeroShotClassifier(tiny_model, processor, ["w3", "w4"])
    with pytest.raises(ValueError, match=r"sampling_rate: only used with modality='audio'; got sampling_rate=8000"):
        clf.predict(torch.randn(1, 3, 16, 16), sampling_rate=8000)
    with pytest.raises(ValueError, match=r"lengths: only used with modality='audio'"):
        clf.predict(torch.randn(1, 3, 16, 16), lengths=torch.tensor([1]))


def test_zero_shot_refuses_a_tokenizer_bigger_than_the_model(tiny_model):
    tokenizer = Tokenizer.train(["a photo of a cat", "a dog"] * 3, vocab_size=300, max_length=16)
    with pytest.raises(ValueError, match=r"processor: its tokenizer has \d+ token ids but the model's .* has 32"):
        ZeroShotClassifier(tiny_model, Processor(tokenizer), ["cat", "dog"])


# ---------------------------------------------------------------------------------------------------- long text
def test_text_beyond_the_context_is_truncated_with_a_warning(processor):
    with pytest.warns(UserWarning, match=r"1 of 2 texts are longer than the context length of 16 tokens .*text\[1\]"):
        out = processor(text=[words(3), words(20)])
    assert out["input_ids"].shape == (2, 16)
    assert out["input_ids"][1, -1].item() == 2 and out["attention_mask"][1].all()  # cut, eos kept last
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = processor(text=[words(14)])  # bos + 14 + eos = 16: fits exactly, no warning, no change
        assert fits["input_ids"].shape == (1, 16)
        asked = processor(text=[words(20)], text_max_length=8)  # an explicit length is a request, not a surprise
        assert asked["input_ids"].shape == (1, 8)
    torch.testing.assert_close(out["input_ids"][1], processor.tokenizer([words(20)])["input_ids"][0])
    with pytest.raises(ValueError, match=r"text\[1\]: expected valid Unicode text; got .* surrogate '\\udce9' at char"):
        processor(text=["w3", "caf\udce9"])  # bytes decoded with surrogateescape: refused before the tokenizer


def test_zero_shot_prompts_beyond_the_context_warn(tiny_model, processor):
    clf = ZeroShotClassifier(tiny_model, processor, ["w3", words(30)], ["w5 {}"])
    with pytest.warns(UserWarning, match=r"1 of 2 texts are longer than the context length of 16 .*prompt\[1\]"):
        probs = clf.predict_proba(torch.randn(2, 3, 16, 16))
    assert probs.shape == (2, 2)


def test_token_ids_beyond_the_position_table_are_refused_not_truncated(tiny_model, make_model_config):
    sinusoidal = MultimodalTransformer(make_model_config(text={"position": "sinusoidal"})).eval()
    for model in (tiny_model, sinusoidal):  # learned and sinusoidal tables (test_model.py covers the learned one)
        with pytest.raises(ValueError, match=r"input_ids: expected at most 16 tokens \(TextConfig.max_length"):
            model.encode_text(torch.ones(1, 17, dtype=torch.long))
