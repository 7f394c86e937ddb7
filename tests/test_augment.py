"""Training augmentation (mmformer.data.augment): off in evaluation, on in training, reproducible and resumable,
its parameters validated; the loader's log-mel features are the model's own; an augmented ``fit`` resumes exactly.

The data: 10 samples of a 16×16 image and a 0.1-0.2 s tone at 8 kHz, in batches of 4 (3 batches an epoch).
"""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import soundfile
import torch
from cli_helpers import fit_in_process, max_diff, merge, model_weights, tiny_config, write_config
from PIL import Image
from torchaudio.functional import add_noise as torchaudio_add_noise

from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.data import Collator, MultimodalDataModule
from mmformer.data.augment import (
    AudioAugmentConfig,
    AugmentConfig,
    Augmenter,
    FeatureCollator,
    ImageAugmentConfig,
    SpecAugment,
    add_noise,
    change_speed,
    pad_silence,
    pitch_shift,
)
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.tasks import MultimodalTask

RATE, N = 8000, 10
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEL = dict(sample_rate=RATE, n_mels=8, n_fft=64, hop_length=16, max_frames=256)  # the tiny model's log-mel
AUGMENT = AugmentConfig(  # everything on, every time, so that every sample is augmented
    audio=AudioAugmentConfig(
        speed_prob=1.0,
        pitch_prob=1.0,
        noise_prob=1.0,
        noise_snr_db=(10.0, 30.0),
        gain_prob=1.0,
        freq_masks=1,
        freq_mask_bins=2,
        time_masks=2,
        time_mask_frames=4,
    ),
    image=ImageAugmentConfig(affine_prob=1.0, degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), blur_prob=0.5),
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``train.jsonl`` and ``val.jsonl`` over 10 image + tone samples."""
    root = tmp_path_factory.mktemp("augment-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / f"{i}.png")
        t = np.arange(int(RATE * (0.1 + 0.01 * i))) / RATE
        soundfile.write(root / f"{i}.flac", (0.5 * np.sin(2 * math.pi * (300 + 50 * i) * t)).astype(np.float32), RATE)
        rows.append({"image": f"{i}.png", "audio_filepath": f"{i}.flac", "text": f"{WORDS[i]} {WORDS[(3 * i) % 10]}"})
    for split in ("train", "val"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def task() -> MultimodalTask:
    config = ModelConfig(
        stacks={"shared": StackConfig(width=16, depth=1, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8, channels=1),
        audio=AudioConfig(**MEL),
        text=TextConfig(vocab_size=300, max_length=8),
        embed_dim=8,
    )
    return MultimodalTask(config, generation={"evaluate": False})


def datamodule(data, tmp_path, augment: AugmentConfig | None = AUGMENT, **kwargs) -> MultimodalDataModule:
    """A data module on ``data``, attached to a trainer that holds the tiny model (whose log-mel SpecAugment
    masks)."""
    settings = dict(batch_size=4, image_size=16, image_mean=[0.5], image_std=[0.5], image_channels=1, sample_rate=RATE)
    dm = MultimodalDataModule(
        train=str(data / "train.jsonl"),
        val=str(data / "val.jsonl"),
        vocab_size=300,
        tokenizer_cache_dir=str(tmp_path / "tokenizers"),
        augment=augment,
        **{**settings, **kwargs},
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task())
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def epoch(loader, e: int, stop: int | None = None) -> list[dict]:
    loader.sampler.set_epoch(e)  # as Lightning does before each epoch
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == stop:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    """Batches with the same keys and bit-identical tensors."""
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b)
    )


def by_source(batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each sample's (pixels, log-mel over its real frames)."""
    out = {}
    for b in batches:
        for i, source in enumerate(b["source"]):
            out[source] = (b["pixel_values"][i], b["audio_features"][i, :, : b["feature_lengths"][i]])
    return out


# ---------------------------------------------------------------------- the loaders
def test_evaluation_batches_are_never_augmented(data, tmp_path):
    dm = datamodule(data, tmp_path)
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    plain = list(datamodule(data, tmp_path, augment=None).val_dataloader())
    assert same(first, second) and same(first, plain)  # bit-identical, and as without augmentation
    assert "audio" in first[0] and "audio_features" not in first[0]  # waveforms: the model computes its log-mel


def test_training_batches_are_augmented_differently_each_epoch_and_reproducibly(data, tmp_path):
    dm = datamodule(data, tmp_path)
    loader = dm.train_dataloader()
    epochs = [by_source(epoch(loader, e)) for e in (0, 1)]
    assert epochs[0].keys() == epochs[1].keys() and len(epochs[0]) == N
    for source, (pixels, features) in epochs[0].items():
        other_pixels, other_features = epochs[1][source]
        assert not torch.equal(pixels, other_pixels), source
        assert features.shape != other_features.shape or not torch.equal(features, other_features), source
    plain = datamodule(data, tmp_path, augment=None).train_dataloader()
    assert not torch.equal(epoch(plain, 0)[0]["pixel_values"], epoch(loader, 0)[0]["pixel_values"])

    # the same epoch again, from a fresh data module, or with 2 worker processes: the same batches
    again = epoch(loader, 0)
    assert same(again, epoch(datamodule(data, tmp_path).train_dataloader(), 0))
    assert same(again, epoch(datamodule(data, tmp_path, num_workers=2).train_dataloader(), 0))


def test_augmentation_leaves_the_global_random_state_alone(data, tmp_path):
    loader = datamodule(data, tmp_path).train_dataloader()  # no workers: augmentation runs in this process
    state = torch.get_rng_state()
    epoch(loader, 0)
    assert torch.equal(state, torch.get_rng_state())  # training's dropout stream is untouched


def test_resuming_mid_epoch_gives_the_same_augmented_batches(data, tmp_path):
    full = epoch(datamodule(data, tmp_path).train_dataloader(), 1)
    first = datamodule(data, tmp_path).train_dataloader()
    head = epoch(first, 1, stop=1)
    resumed = datamodule(data, tmp_path).train_dataloader()
    resumed.load_state_dict(first.state_dict())
    assert same(head + epoch(resumed, 1), full) and len(full) == 3


def test_loader_features_are_the_models_own(data, tmp_path):
    """Without masks, the loader's log-mel batch trains exactly as the waveform batch does (the same losses)."""
    dm = datamodule(data, tmp_path, augment=None)
    samples = [dm.datasets["train"][i] for i in range(4)]
    waves = Collator(dm.tokenizer)(samples)
    collate = FeatureCollator(Collator(dm.tokenizer), AudioConfig(**MEL), AUGMENT.audio)
    collate.spec_augment = lambda features: features  # no masks
    features = collate(samples)
    assert "audio" not in features and features["audio_features"].shape[:2] == (4, MEL["n_mels"])
    model = dm.trainer.lightning_module
    wave_parts, _ = model._losses(waves)
    feature_parts, _ = model._losses(features)
    assert wave_parts.keys() == feature_parts.keys() >= {"speech", "contrastive_audio"}
    for name, value in wave_parts.items():
        torch.testing.assert_close(feature_parts[name], value, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- the augmentations
def test_speed_and_pitch_do_what_they_say():
    t = torch.arange(RATE) / RATE
    tone = torch.sin(2 * math.pi * 440 * t)

    def peak(wave: torch.Tensor) -> float:  # the dominant frequency in Hz
        return float(torch.fft.rfft(wave).abs().argmax()) * RATE / wave.shape[-1]

    faster = change_speed(tone, 1.25)  # tempo and pitch together
    assert faster.shape[-1] == RATE * 4 // 5 and peak(faster) == pytest.approx(550, abs=3)
    octave = pitch_shift(tone, RATE, 12.0)  # pitch only
    assert octave.shape == tone.shape and peak(octave) == pytest.approx(880, abs=3)
    assert peak(pitch_shift(tone, RATE, -5.0)) == pytest.approx(440 * 2 ** (-5 / 12), abs=4)


def test_augmenter_is_a_pure_function_of_its_seed():
    processor = Processor(audio=AudioProcessorConfig(sample_rate=RATE))
    augment = Augmenter(AUGMENT, processor)
    sample = {"image": torch.rand(3, 16, 16), "audio": torch.rand(RATE // 4) - 0.5, "text": "one", "source": "a"}
    kept = {k: v.clone() for k, v in sample.items() if isinstance(v, torch.Tensor)}
    a, b, c = augment(sample, 7), augment(sample, 7), augment(sample, 8)
    assert all(torch.equal(a[k], b[k]) for k in kept) and a["augment_seed"] == 7
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["audio"], c["audio"])
    assert all(torch.equal(sample[k], v) for k, v in kept.items())  # the input (maybe a cached sample) is untouched
    assert a["text"] == "one" and a["source"] == "a"
    # no noise, no gain: the waveform is only slowed down / sped up, by at most 10 %
    quiet = Augmenter(AugmentConfig(audio={"speed_prob": 1.0, "speed": (0.9, 1.1)}), processor)
    assert 0.9 <= sample["audio"].shape[0] / quiet(sample, 3)["audio"].shape[0] <= 1.1


def test_silence_around_the_speech_keeps_the_speech_and_its_snr():
    processor = Processor(audio=AudioProcessorConfig(sample_rate=RATE, max_seconds=1.0))
    speech = torch.sin(2 * math.pi * 440 * torch.arange(RATE // 4) / RATE)  # 0.25 s, mean square 0.5
    pad = AugmentConfig(audio={"pad_prob": 1.0, "pad_seconds": (0.1, 0.3), "noise_prob": 1.0, "noise_snr_db": (20, 20)})
    lengths = set()
    for seed in range(20):
        wave = Augmenter(pad, processor)({"audio": speech}, seed)["audio"]
        lengths.add(wave.shape[-1])
        assert RATE // 4 + 2 * RATE // 10 <= wave.shape[-1] <= RATE // 4 + 2 * RATE * 3 // 10
        # the noise is 20 dB below the speech's power, not below the power of speech and silence together: the
        # silence before the speech carries noise at 0.5 / 100
        lead = wave[: RATE // 10]
        assert lead.pow(2).mean().item() == pytest.approx(0.005, rel=0.25)
    assert len(lengths) > 10  # each side's length is drawn
    # a speech clip is never cut to fit the longest input: the silence shrinks instead
    long = torch.ones(RATE - 100)
    assert torch.equal(pad_silence(long, 300, 300, max_samples=RATE), torch.cat([torch.zeros(100), long]))
    assert pad_silence(long, 30, 40, max_samples=RATE).shape[-1] == RATE - 30


def test_add_noise_is_torchaudios_where_the_wave_is_all_speech():
    g = torch.Generator().manual_seed(0)
    wave, noise = torch.randn(2, 1000, generator=g), torch.randn(2, 1000, generator=g)
    ours = add_noise(wave, noise, 15.0, wave.pow(2).mean(-1, keepdim=True))
    torch.testing.assert_close(ours, torchaudio_add_noise(wave, noise, torch.tensor([15.0, 15.0])))


def test_a_speechless_sample_is_background_an_empty_text_and_a_blank_image():
    processor = Processor(
        audio=AudioProcessorConfig(sample_rate=RATE), image=ImageProcessorConfig(mean=(0.5,), std=(0.5,))
    )
    sample = {"image": torch.rand(3, 16, 16), "audio": torch.rand(RATE // 4) - 0.5, "text": "one two", "source": "a"}
    config = {"empty_prob": 0.3, "empty_seconds": (0.5, 0.5), "noise_prob": 0.5, "noise_snr_db": (10, 10)}
    augment = Augmenter(AugmentConfig(audio=config), processor)
    out = [augment(sample, seed) for seed in range(200)]
    empty = [o for o in out if o["text"] == ""]
    assert 40 <= len(empty) <= 80  # about 30 %
    for o in empty:
        assert o["audio"].shape[-1] == RATE // 2
        assert torch.equal(o["image"], torch.full_like(sample["image"], -1.0))  # black, normalised
    noisy = [o for o in empty if o["audio"].abs().max() > 0]
    assert 0 < len(noisy) < len(empty)  # silence or noise at the speech's would-be SNR
    power = sample["audio"].pow(2).mean().item() / 10
    assert all(o["audio"].pow(2).mean().item() == pytest.approx(power, rel=0.2) for o in noisy)
    kept = [o for o in out if o["text"] != ""]
    assert all(o["text"] == "one two" and torch.equal(o["image"], sample["image"]) for o in kept)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"audio": {"noise_snr_db": (-5, 10)}}, r"augment.audio.noise_snr_db: expected SNRs in dB .* in \[0, inf\]"),
        ({"audio": {"noise_snr_db": (20, 10)}}, r"noise_snr_db: expected a range \[low, high\] with low <= high"),
        ({"audio": {"noise_snr_db": 10}}, r"noise_snr_db: expected a range \[low, high\]"),
        ({"audio": {"speed_prob": 1.5}}, r"augment.audio.speed_prob: expected a probability in \[0, 1\]; got 1.5"),
        ({"image": {"blur_prob": -0.1}}, r"augment.image.blur_prob: expected a probability in \[0, 1\]"),
        ({"audio": {"speed": (0.0, 1.1)}}, r"augment.audio.speed: expected speed factors in \[0.5, 2\]"),
        ({"audio": {"pitch_semitones": (-24, 0)}}, r"pitch_semitones: expected semitones in \[-12, 12\]"),
        ({"audio": {"gain_db": (float("nan"), 1)}}, r"gain_db: expected a finite number"),
        ({"audio": {"freq_masks": 2, "freq_mask_bins": 0}}, r"freq_mask_bins: expected a mask width >= 1"),
        ({"audio": {"time_masks": -1}}, r"augment.audio.time_masks: expected an int >= 0; got -1"),
        ({"audio": {"time_mask_max_fraction": 0}}, r"time_mask_max_fraction: expected a fraction in \(0, 1\]"),
        ({"image": {"degrees": 200}}, r"augment.image.degrees: expected a rotation range in \[0, 180\]"),
        ({"image": {"translate": (0.1, 1.5)}}, r"augment.image.translate: expected .* in \[0, 1\]"),
        ({"image": {"scale": (0, 1)}}, r"augment.image.scale: expected scale factors > 0"),
        ({"image": {"blur_kernel": 4}}, r"augment.image.blur_kernel: expected an odd int >= 1"),
        ({"image": {"elastic_sigma": 0}}, r"elastic_sigma: expected alpha >= 0 and sigma > 0"),
        ({"audio": {"snr": (1, 2)}}, r"augment.audio: unknown settings \['snr'\]"),
        ({"audio": {"pad_prob": 2}}, r"augment.audio.pad_prob: expected a probability in \[0, 1\]; got 2"),
        ({"audio": {"pad_seconds": (-1, 1)}}, r"augment.audio.pad_seconds: expected lengths in seconds in \[0, inf\]"),
        ({"audio": {"empty_seconds": (0, 1)}}, r"augment.audio.empty_seconds: expected lengths in seconds \(> 0\)"),
    ],
)
def test_bad_settings_are_refused_by_name(config, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**config)


def test_masks_wider_than_the_models_input_are_refused():
    mel = AudioConfig(**MEL)
    with pytest.raises(ValueError, match=r"freq_mask_bins: expected a frequency mask at most as wide as the model's "):
        SpecAugment(AudioAugmentConfig(freq_masks=1, freq_mask_bins=9), mel)
    with pytest.raises(ValueError, match=r"time_mask_frames: expected a time mask at most as long as the model's max"):
        SpecAugment(AudioAugmentConfig(time_masks=1, time_mask_frames=257), mel)


def test_spec_augment_needs_the_models_features(data, tmp_path):
    cache = str(tmp_path / "tokenizers")
    alone = MultimodalDataModule(train=str(data / "train.jsonl"), augment=AUGMENT, tokenizer_cache_dir=cache)
    alone.setup("fit")
    with pytest.raises(ValueError, match="SpecAugment .* must be attached to a Trainer fitting a model .*no trainer"):
        alone.train_dataloader()
    other_rate = datamodule(data, tmp_path, sample_rate=16000)
    with pytest.raises(ValueError, match="sample_rate=16000 differs from the model's audio.sample_rate=8000"):
        other_rate.train_dataloader()
    with pytest.raises(TypeError, match="augment: expected an AugmentConfig, a dict or None; got str"):
        MultimodalDataModule(augment="strong")


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_augmented_fit_resumes_mid_epoch_exactly(data, tmp_path):
    """``mmformer fit`` with every augmentation on (SpecAugment in the loader): stopped after 4 steps (batch 1 of
    epoch 1) and resumed to 8, it ends with the weights of the uninterrupted run."""
    overrides = {
        "model": {
            "model": {
                "routes": {"image": "shared", "audio": "shared", "text": "shared", "decoder": "shared"},
                "audio": MEL,
            }
        },
        "data": {
            "train": str(data / "train.jsonl"),
            "modalities": ["image", "audio"],
            "sample_rate": RATE,
            "augment": json.loads(json.dumps(AUGMENT.to_dict())),  # YAML lists for the tuples
        },
    }

    def run(root, *args):
        config = tiny_config(root, data / "train.jsonl", **overrides)
        return fit_in_process(write_config(root / "config.yaml", config), *args)

    reference = model_weights(run(tmp_path / "reference").model)
    run(tmp_path / "resumed", "--trainer.max_steps", "4")
    resumed = run(tmp_path / "resumed", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8
    assert max_diff(model_weights(resumed.model), reference) <= 1e-6
    # without augmentation the run ends elsewhere: the comparison can tell
    plain = tiny_config(tmp_path / "plain", data / "train.jsonl", **merge(overrides, {"data": {"augment": None}}))
    assert max_diff(model_weights(fit_in_process(write_config(tmp_path / "plain.yaml", plain)).model), reference) > 1e-4
