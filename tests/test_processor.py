"""Processor: every input form gives the same tensors, resampling, persistence and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mmformer.data import SampleError
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer

TEXTS = ["four two nine", "a photo of a cat", "seven", "one two three four", "a dog on the grass"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 4, vocab_size=300, max_length=16)


@pytest.fixture
def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # (H, W, C), not square


def small(**image) -> Processor:
    return Processor(image=ImageProcessorConfig(image_size=16, **image))


# ---------------------------------------------------------------------- images
def test_image_inputs_give_the_same_pixel_values(tmp_path, picture):
    path = tmp_path / "picture.png"
    Image.fromarray(picture).save(path)
    chw = torch.from_numpy(picture).permute(2, 0, 1)  # (C, H, W)
    processor = small()
    reference = processor(images=[Image.fromarray(picture)])["pixel_values"]
    assert reference.shape == (1, 3, 16, 16) and reference.dtype == torch.float32
    for form in (chw, chw.float() / 255, picture, str(path), path):
        torch.testing.assert_close(processor(images=[form])["pixel_values"], reference, atol=0, rtol=0)
    # the dataset pipeline and the file loader are the same pipeline
    torch.testing.assert_close(processor.image_transform()(Image.fromarray(picture)), reference[0], atol=0, rtol=0)
    torch.testing.assert_close(processor.load_image(path), reference[0], atol=0, rtol=0)


def test_image_batches_and_single_items(picture):
    processor = small()
    chw = torch.from_numpy(picture).permute(2, 0, 1)
    one = processor(images=chw)["pixel_values"]  # a single item is a batch of one
    assert one.shape == (1, 3, 16, 16)
    batch = processor(images=torch.stack([chw, chw.flip(-1)]))["pixel_values"]  # (B, C, H, W)
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[0], one[0])


def test_matches_clip_preprocessing(picture):
    """Resize-shortest + center-crop + CLIP normalisation, numerically what open_clip feeds its models."""
    open_clip = pytest.importorskip("open_clip")
    pil = Image.fromarray(picture)
    expected = open_clip.image_transform(32, is_train=False)(pil)
    got = Processor(image=ImageProcessorConfig(image_size=32))(images=pil)["pixel_values"][0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (dict(image_size=(8, 24)), (3, 8, 24)),
        (dict(image_size=(24, 8)), (3, 24, 8)),
        (dict(image_size=(8, 24), resize="exact"), (3, 8, 24)),
        (dict(image_size=12, channels=1), (1, 12, 12)),
    ],
)
def test_image_sizes_and_channels(picture, config, shape):
    out = Processor(image=ImageProcessorConfig(**config))(images=[picture, picture[..., 0]])["pixel_values"]
    assert out.shape == (2, *shape)
    assert torch.isfinite(out).all()


def test_grayscale_input_to_rgb_and_rgb_to_grayscale(picture):
    gray = picture[..., 0]
    rgb = small()(images=gray)["pixel_values"]
    assert rgb.shape == (1, 3, 16, 16)
    mean, std = torch.tensor(ImageProcessorConfig().mean), torch.tensor(ImageProcessorConfig().std)
    unnormalised = rgb[0] * std[:, None, None] + mean[:, None, None]
    torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)  # the 3 channels are equal
    single = small(channels=1)
    torch.testing.assert_close(
        single(images=Image.fromarray(picture))["pixel_values"],
        single(images=Image.fromarray(picture).convert("L"))["pixel_values"],
    )


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (
            [np.zeros((8, 8, 3), np.uint8)] * 2 + [{"a": 1}],
            TypeError,
            r"images\[2\]: expected PIL image, tensor \(C,H,W\), numpy array or path; got dict",
        ),
        (
            [torch.zeros(5, 8, 8)],
            ValueError,
            r"images\[0\]: expected a tensor \(C, H, W\) with C in 1, 3, 4.*\(5, 8, 8\)",
        ),
        ([np.zeros((3, 8, 8), np.uint8)], ValueError, r"images\[0\]: expected a numpy image \(H, W, C\).*\(3, 8, 8\)"),
        (
            [torch.full((3, 8, 8), 255.0)],
            ValueError,
            r"images\[0\]: expected float pixels in \[0, 1\]; got values in \[255, 255\]",
        ),
        ([torch.zeros(3, 8, 8, dtype=torch.int32)], TypeError, r"images\[0\]: expected uint8 or float pixels.*int32"),
        ([], ValueError, r"images: expected at least one item; got an empty list"),
    ],
)
def test_image_errors_name_the_item(images, error, match):
    with pytest.raises(error, match=match):
        small()(images=images)


def test_corrupt_image_file_raises_sample_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(SampleError, match="broken.png"):
        small()(images=[str(bad)])
    with pytest.raises(SampleError, match=r"missing\.png: file not found"):
        small().load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=r": a folder, not a file"):  # a folder passed for a file
        small().load_image(tmp_path)


# ---------------------------------------------------------------------- audio
def test_audio_resampled_and_padded():
    processor = Processor()
    t = torch.arange(8000) / 8000
    one_second_8k = torch.sin(2 * torch.pi * 440 * t)
    half_second_8k = one_second_8k[:4000].numpy()
    out = processor(audio=[one_second_8k, half_second_8k], sampling_rate=8000)
    assert out["audio"].shape == (2, 16000) and out["audio"].dtype == torch.float32
    assert out["audio_lengths"].tolist() == [16000, 8000] and out["audio_lengths"].dtype == torch.long
    assert (out["audio"][1, 8000:] == 0).all()
    # still a 440 Hz tone after resampling: the spectrum peaks at 440 Hz (1 Hz bins over 1 s)
    assert torch.fft.rfft(out["audio"][0]).abs().argmax().item() == 440


def test_audio_files_decoded_to_mono_and_resampled(tmp_path):
    stereo = np.stack([np.full(4000, 0.5), np.full(4000, -0.1)], axis=1).astype(np.float32)  # (S, C) at 8 kHz
    soundfile.write(tmp_path / "stereo.flac", stereo, 8000)
    soundfile.write(tmp_path / "tone.wav", np.full(16000, 0.25, np.float32), 16000)
    out = Processor()(audio=[tmp_path / "stereo.flac", str(tmp_path / "tone.wav")])
    assert out["audio_lengths"].tolist() == [8000, 16000]
    assert out["audio"][0, 1000:7000].mean().item() == pytest.approx(0.2, abs=1e-3)  # the average of both channels
    single = Processor()(audio=np.zeros(800, np.float32), sampling_rate=16000)  # one waveform = a batch of one
    assert single["audio"].shape == (1, 800)
    batch = Processor()(audio=torch.zeros(3, 800), sampling_rate=16000)  # (B, S)
    assert batch["audio"].shape == (3, 800)
    int16 = Processor()(audio=np.full(10, 16384, np.int16), sampling_rate=16000)["audio"]
    torch.testing.assert_close(int16, torch.full((1, 10), 0.5))
    keep = Processor(audio=AudioProcessorConfig(mono=False))  # channels kept: (B, C, S)
    out = keep(audio=[tmp_path / "stereo.flac"])
    assert out["audio"].shape == (1, 2, 8000) and out["audio"][0, :, 1000:7000].mean(-1).tolist() == pytest.approx(
        [0.5, -0.1], abs=1e-3
    )
    assert keep(audio=[np.zeros((2, 400), np.float32), np.zeros(800, np.float32)], sampling_rate=16000)[
        "audio"
    ].shape == (2, 2, 800)


def test_long_audio_truncated_with_a_warning_naming_the_item():
    processor = Processor(audio=AudioProcessorConfig(max_seconds=0.5))
    with pytest.warns(UserWarning, match=r"audio\[1\]: 1\.0 s of audio is longer than max_seconds=0\.5"):
        out = processor(audio=[np.zeros(4000, np.float32), np.zeros(16000, np.float32)], sampling_rate=16000)
    assert out["audio_lengths"].tolist() == [4000, 8000]


@pytest.mark.parametrize(
    ("audio", "rate", "error", "match"),
    [
        (
            [np.zeros(10, np.float32)],
            None,
            ValueError,
            r"audio\[0\]: sampling_rate is required.*got sampling_rate=None",
        ),
        (
            [np.zeros((2, 10), np.float32)],
            16000,
            ValueError,
            r"audio\[0\]: expected a waveform \(S,\); got .*\(2, 10\)",
        ),
        ([np.zeros(0, np.float32)], 16000, ValueError, r"audio\[0\]: expected a non-empty waveform"),
        ([np.zeros(4, np.float32), 3], 16000, TypeError, r"audio\[1\]: expected a 1-D waveform .* got int"),
        ([np.array([0.0, np.nan])], 16000, ValueError, r"audio\[0\]: waveform contains NaN"),
        ([np.zeros(4, np.float32)], 0, ValueError, r"sampling_rate: expected a positive int \(Hz\); got 0"),
        ([], 16000, ValueError, r"audio: expected at least one item"),
    ],
)
def test_audio_errors(audio, rate, error, match):
    with pytest.raises(error, match=match):
        Processor()(audio=audio, sampling_rate=rate)


def test_samples_by_channels_arrays_are_refused_naming_the_fix():
    """soundfile reads a stereo file as (S, C): taken as a (B, S) batch it gave S one-sample waveforms per channel.
    The error says what is taken where the array was given: a mono processor takes no (C, S) waveform (a bare one is
    a batch, a list item is refused), and a list item is no batch."""
    stereo = np.random.default_rng(0).normal(0, 0.1, (8000, 2)).astype(np.float32)  # soundfile's layout
    fix = r"; got shape \(8000, 2\), which looks like \(samples, channels\).*`x\.mean\(axis=1\)`.*file's path"
    whole, item = r"audio: expected a waveform \(S,\)", r"audio\[0\]: expected a waveform \(S,\)"
    for audio, expected in ((stereo, rf"{whole}, a batch \(B, S\) or a list of waveforms"),
                            (torch.from_numpy(stereo), rf"{whole}, a batch \(B, S\) or a list of waveforms"),
                            ([stereo], item)):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{expected}{fix}"):
            Processor()(audio=audio, sampling_rate=8000)
    channels = Processor(audio=AudioProcessorConfig(mono=False))  # keeping channels takes (C, S), not (S, C)
    with pytest.raises(ValueError, match=rf"^{whole} or \(C, S\), a batch \(B, C, S\) or a list of waveforms{fix}"):
        channels(audio=stereo, sampling_rate=8000)
    with pytest.raises(ValueError, match=rf"^{item} or \(C, S\){fix}"):
        channels(audio=[stereo], sampling_rate=8000)
    assert channels(audio=[stereo.T.copy()], sampling_rate=8000)["audio"].shape == (1, 2, 16000)  # as it says
    downmixed = Processor()(audio=stereo.mean(axis=1), sampling_rate=8000)  # the fix the message names
    assert downmixed["audio"].shape == (1, 16000)
    batch = Processor()(audio=stereo.T.copy(), sampling_rate=8000)  # (B, S) batches still work, also B > columns
    assert batch["audio"].shape == (2, 16000)
    assert Processor()(audio=np.zeros((20, 9), np.float32), sampling_rate=16000)["audio"].shape == (20, 9)


def test_sampling_rate_accepts_numpy_ints_and_whole_floats():
    wave = np.sin(np.arange(800) / 7).astype(np.float32)
    expected = Processor()(audio=wave, sampling_rate=8000)["audio"]
    for rate in (np.int64(8000), np.int32(8000), 8000.0, np.float32(8000.0)):  # soundfile/librosa/metadata forms
        torch.testing.assert_close(Processor()(audio=wave, sampling_rate=rate)["audio"], expected, atol=0, rtol=0)
    for rate in (8000.5, True, "8000", float("nan")):
        with pytest.raises(ValueError, match=r"sampling_rate: expected a positive int \(Hz\)"):
            Processor()(audio=wave, sampling_rate=rate)


def test_corrupt_audio_file_raises_sample_error(tmp_path):
    soundfile.write(tmp_path / "ok.flac", np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    data = (tmp_path / "ok.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match="cut.flac"):
        Processor()(audio=[tmp_path / "cut.flac"])


# ---------------------------------------------------------------------- text
def test_text(tokenizer):
    processor = Processor(tokenizer)
    out = processor(text=["four two nine", "seven"])
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 2
    assert out["attention_mask"].dtype == torch.bool
    assert out["attention_mask"][0].all() and not out["attention_mask"][1].all()  # the shorter row is padded
    assert tokenizer.decode(out["input_ids"][0]) == "four two nine"
    assert processor(text="seven")["input_ids"].shape[0] == 1  # a single string is a batch of one
    assert processor(text=TEXTS, text_max_length=3)["input_ids"].shape == (len(TEXTS), 3)
    with pytest.raises(TypeError, match=r"text\[1\]: expected str; got int"):
        processor(text=["ok", 5])
    with pytest.raises(ValueError, match="text: this Processor has no tokenizer"):
        Processor()(text=["hello"])
    with pytest.raises(ValueError, match="expected at least one of images=, audio=, text="):
        processor()


# ---------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tmp_path, tokenizer, picture):
    processor = Processor(
        tokenizer,
        ImageProcessorConfig(image_size=(16, 24), mean=(0.5,), std=(0.25,), interpolation="bilinear"),
        AudioProcessorConfig(sample_rate=8000, max_seconds=None),
    )
    (tmp_path / "model.safetensors").write_bytes(b"weights the user saved")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights the user saved"  # other files untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ]
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["audio"]["sample_rate"] == 8000

    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.image == processor.image and loaded.audio == processor.audio
    inputs = dict(images=[picture], audio=[np.ones(800, np.float32)], text=TEXTS, sampling_rate=16000)
    expected, got = processor(**inputs), loaded(**inputs)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])

    processor.save_pretrained(tmp_path)  # saving again replaces its own files only
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["image"]["sharpen"] = True
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"image: unknown settings \['sharpen'\]"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Processor.from_pretrained(tmp_path / "nowhere")


def test_from_pretrained_without_config_warns_and_uses_defaults(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    with pytest.warns(UserWarning, match="preprocessor_config.json not found"):
        loaded = Processor.from_pretrained(tmp_path)
    assert loaded.image == ImageProcessorConfig() and loaded.tokenizer.vocab_size == tokenizer.vocab_size


def test_a_model_folder_without_mmformer_settings_is_refused_naming_the_loader(tmp_path):
    """A timm folder (or Hugging Face's, open_clip's) holds no mmformer processor settings: its processor comes from
    converting the model (64 px and timm's statistics here), not from 224-px CLIP defaults; this class sits below
    the loaders, so it names the one that reads every format."""
    timm = pytest.importorskip("timm")
    from mmformer.io.auto import load_processor

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=1)
    timm.models.save_for_hf(vit.eval(), tmp_path)
    loader = r"load it with mmformer\.io\.auto\.load_processor\(FOLDER\)"
    with pytest.raises(ValueError, match=rf"holds a model \(config\.json\) but no preprocessor_config\.json.*{loader}"):
        Processor.from_pretrained(tmp_path)
    assert load_processor(tmp_path).image.image_size == (64, 64)  # what the message sends the user to
    # a Hugging Face image processor's preprocessor_config.json is not read as mmformer's (it gave CLIP defaults)
    hf = {"crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "processor_class": "CLIPProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=rf"preprocessor_config\.json: not mmformer's processor settings.*{loader}"):
        Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=0), r"image_size: expected a positive int or \(H, W\); got 0"),
        (dict(resize="crop"), r"resize: expected 'shortest' or 'exact'; got 'crop'"),
        (dict(channels=4), r"channels: expected 1 \(grayscale\) or 3 \(RGB\); got 4"),
        (dict(mean=(0.5, 0.5)), r"mean: expected 1 or channels=3 values; got \(0.5, 0.5\)"),
        (dict(std=(0.0,)), r"std: expected positive values"),
        (dict(interpolation="lanczos"), r"interpolation: expected one of"),
    ],
)
def test_image_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig(**kwargs)


def test_audio_config_validation():
    with pytest.raises(ValueError, match=r"sample_rate: expected a positive int \(Hz\); got 0"):
        AudioProcessorConfig(sample_rate=0)
    with pytest.raises(ValueError, match=r"max_seconds: expected a positive number or None; got -1"):
        AudioProcessorConfig(max_seconds=-1)
