"""save_pretrained / load_pretrained: exact round trips, safe loading, atomic saves, Lightning checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import mmformer.io.pretrained as pretrained
from mmformer import MultimodalTransformer, load_pretrained, save_pretrained
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.io.auto import load_processor
from mmformer.preprocess.processor import ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer

TEXTS = ["zero one two three", "four five six", "seven eight nine", "a photo of a digit", "the sound of a number"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300, max_length=16)


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    fields = dict(
        stacks={"shared": StackConfig(width=32, depth=2, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        audio=AudioConfig(n_mels=16, n_fft=64, hop_length=32, max_frames=200),
        text=TextConfig(vocab_size=vocab_size, max_length=16),
        embed_dim=16,
    )
    return ModelConfig(**{**fields, **overrides})


def make_model(tokenizer: Tokenizer, seed: int = 0, **overrides) -> MultimodalTransformer:
    torch.manual_seed(seed)
    model = MultimodalTransformer(tiny_config(tokenizer.vocab_size, **overrides)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5 + seed)  # not the init value, so that a lost tensor would show
    model.processor = Processor(tokenizer, image=ImageProcessorConfig(image_size=16))
    return model


def inputs(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = tokenizer(["zero one two", "a photo of a digit"])
    return {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
        "audio": torch.randn(2, 800, generator=g),
        "audio_lengths": torch.tensor([800, 500]),
        **batch,
    }


@torch.no_grad()
def outputs(model: MultimodalTransformer, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    memory, mask = model.encode_image_tokens(x["pixel_values"])
    return {
        "image": model.encode_image(x["pixel_values"]),
        "audio": model.encode_audio(x["audio"], x["audio_lengths"]),
        "text": model.encode_text(x["input_ids"], x["attention_mask"]),
        "logits": model.decode(x["input_ids"], memory, mask, x["attention_mask"]),
        "scale": model.logit_scale.detach().clone(),
    }


def assert_same_outputs(a: MultimodalTransformer, b: MultimodalTransformer, x: dict[str, torch.Tensor]) -> None:
    out_a, out_b = outputs(a, x), outputs(b, x)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key


def assert_same_state(a: MultimodalTransformer, b: MultimodalTransformer) -> None:
    """Cheaper than comparing outputs, for tests about where the weights come from."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert b.lm_head.weight is b.text_embed.tokens.weight


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- format version
# The config fields of each format_version (pretrained.FORMAT_VERSION): an older mmformer refuses a config.json key it
# does not know, so a folder with a new field must say it is newer (a 2044eaf reader met TextConfig.extra_eos_ids in a
# folder marked 2 and failed on it as an unknown key, not as a newer format).
CONFIG_FIELDS = {
    3: {
        "StackConfig": "width depth n_heads head_size n_kv_heads mlp mlp_ratio mlp_hidden n_experts experts_top_k norm "
        "norm_eps norm_placement final_norm parallel bias qkv_bias qk_norm attn_scale position rope_theta rope_scaling "
        "relative_buckets relative_max_distance dropout attn_dropout drop_path cross_attention multiway "
        "gradient_checkpointing layer_scale cross_mlp cross_memory_norm",
        "ImageConfig": "image_size patch_size channels class_token position patch_bias pre_norm n_registers pool "
        "pool_norm resampler_queries resampler_width resampler_heads",
        "AudioConfig": "sample_rate n_mels n_fft hop_length max_frames conv_stride position pool pad_to_seconds",
        "TextConfig": "vocab_size max_length position pad_id bos_id eos_id extra_eos_ids mask_id n_segments embed_norm "
        "embed_norm_eps causal pool fixed_length attend_padding legacy_cls_mask",
        "GenerationConfig": "suppress_tokens begin_suppress_tokens language_ids task_ids language task "
        "no_timestamps_id alignment_heads",
        "ModelConfig": "stacks routes image audio text embed_dim projection_bias logit_scale_init logit_bias_init "
        "tie_lm_head mlm_head ctc_head projections decoder_input generation",
    },
}


def test_a_new_config_field_comes_with_a_new_format_version():
    """The fields every config class has equal those recorded for the current format_version: a field added (or
    removed) without raising pretrained.FORMAT_VERSION and recording its fields here fails."""
    import dataclasses
    import inspect

    import mmformer.config as config_module

    fields = {
        name: " ".join(f.name for f in dataclasses.fields(cls))
        for name, cls in vars(config_module).items()
        if inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__
    }
    recorded = CONFIG_FIELDS.get(pretrained.FORMAT_VERSION)
    assert fields == recorded, (
        f"the config's fields changed: raise pretrained.FORMAT_VERSION (now {pretrained.FORMAT_VERSION}) and record "
        f"them in CONFIG_FIELDS: {fields}"
    )


def test_a_folder_of_a_newer_format_is_refused_as_newer(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["format_version"] = pretrained.FORMAT_VERSION + 1
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"format_version {pretrained.FORMAT_VERSION + 1} was written by a newer"):
        load_pretrained(tmp_path / "model")
    config["format_version"] = 2  # the folders before it load as they are
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    load_pretrained(tmp_path / "model")


# ---------------------------------------------------------------------------------------------------- round trips
def test_round_trip_reproduces_outputs_and_keeps_the_head_tied(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(pretrained.OWN_FILES)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["format_version"] == pretrained.FORMAT_VERSION
    stored = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    assert "lm_head.weight" not in stored and "text_embed.tokens.weight" in stored  # the tied head, stored once

    loaded = load_pretrained(tmp_path / "model")
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.text_embed.tokens.weight
    assert_same_outputs(model, loaded, inputs(tokenizer))

    # the processor came back: same tokens and the same image settings
    assert loaded.processor.image == model.processor.image and loaded.processor.audio == model.processor.audio
    ids = loaded.processor(text=TEXTS)["input_ids"]
    assert torch.equal(ids, model.processor(text=TEXTS)["input_ids"])
    assert MultimodalTransformer.from_pretrained(tmp_path / "model").config == model.config


def test_round_trip_untied_head_bias_and_ctc(tokenizer, tmp_path):
    model = make_model(tokenizer, seed=1, tie_lm_head=False, logit_bias_init=-3.0, ctc_head=True)
    model.processor = None
    save_pretrained(model, tmp_path / "m")
    assert not any(name in os.listdir(tmp_path / "m") for name in pretrained.PROCESSOR_FILES)
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.processor is None
    assert loaded.lm_head.weight is not loaded.text_embed.tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.ctc_head.weight, model.ctc_head.weight) and loaded.logit_bias.item() == -3.0
    assert_same_outputs(model, loaded, inputs(tokenizer))


def test_device_and_dtype_after_loading(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", device="cpu", dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = inputs(tokenizer)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x.double()).float(), model.encode_image(x), atol=1e-5, rtol=0)


def test_dtype_by_name(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path / "m")
    for name, dtype in (("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("float32", torch.float32)):
        assert load_pretrained(tmp_path / "m", dtype=name).logit_scale.dtype == dtype
    assert MultimodalTransformer.from_pretrained(tmp_path / "m", dtype="float64").logit_scale.dtype == torch.float64
    for bad in ("bf16", torch.int8, 16):
        with pytest.raises(TypeError, match=rf"dtype: expected a floating-point torch.dtype or its name .*{bad}"):
            load_pretrained(tmp_path / "m", dtype=bad)


def test_the_loaded_tokenizer_truncates_to_the_model_text_length(tokenizer, tmp_path):
    """A tokenizer saved with a longer default than the model's text table (77 vs 16, as a trained model's was) made
    ids encode_text refused ("expected at most 16 tokens"): a loaded model's processor truncates to the table."""
    model = make_model(tokenizer)
    model.processor = Processor(tokenizer.replace(max_length=77))
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="longer than the context length of 16 tokens"):
        batch = loaded.processor(text=[" ".join(TEXTS)])  # more than 16 tokens
    assert batch["input_ids"].shape == (1, 16)
    loaded.encode_text(batch["input_ids"], batch["attention_mask"])
    assert load_processor(tmp_path / "m").tokenizer.max_length == 16  # the processor alone: the same

    # a training checkpoint's processor (checkpoint["mmformer"], as MultimodalTask writes it) is fitted the same way
    model.processor.tokenizer.save(tmp_path / "tokenizer.json")  # the file text the task stores
    record = {"model_config": model.config.to_dict(), "tokenizer_json": (tmp_path / "tokenizer.json").read_text(),
              "preprocessor_config": model.processor.to_dict()}  # fmt: skip
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mmformer": record}, tmp_path / "task.ckpt")
    assert load_pretrained(tmp_path / "task.ckpt").processor.tokenizer.max_length == 16


def test_processor_settings_left_out_come_from_the_model(tokenizer, tmp_path):
    """Without preprocessor_config.json, a 16×32 grayscale model got 224-px RGB CLIP settings (and 16 kHz)."""
    image = ImageConfig(image_size=[16, 32], patch_size=8, channels=1)
    audio = AudioConfig(sample_rate=8000, n_mels=16, n_fft=64, hop_length=32, max_frames=200)
    model = make_model(tokenizer, image=image, audio=audio)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match="preprocessor_config.json not found"):
        loaded = load_pretrained(tmp_path / "m").processor
    assert loaded.image.image_size == (16, 32) and loaded.image.channels == 1 and loaded.audio.sample_rate == 8000
    assert loaded(images=torch.rand(3, 40, 50))["pixel_values"].shape == (1, 1, 16, 32)
    with pytest.warns(UserWarning, match="preprocessor_config.json not found"):
        assert load_processor(tmp_path / "m").image == loaded.image  # the processor alone: the same
    with pytest.raises(ValueError, match=r"holds a model \(config\.json\).*mmformer\.io\.auto\.load_processor"):
        Processor.from_pretrained(tmp_path / "m")  # without the model's config: refused, not CLIP's 224 px

    # a training checkpoint whose processor record leaves the settings out
    record = {"model_config": model.config.to_dict(), "preprocessor_config": {"processor_class": "Processor"}}
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mmformer": record}, tmp_path / "task.ckpt")
    assert load_pretrained(tmp_path / "task.ckpt").processor.image == loaded.image


# ---------------------------------------------------------------------------------------------------- compatibility
def test_weights_for_another_config_are_refused_listing_shapes(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["stacks"]["shared"]["width"] = 48
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for strict in (True, False):
        with pytest.raises(ValueError, match="different shape") as info:
            load_pretrained(tmp_path / "m", strict=strict)
        assert "audio_embed.conv1.weight: expected (48, 16, 3), found (32, 16, 3)" in str(info.value)
        assert str(tmp_path / "m") in str(info.value)


def test_missing_and_unexpected_keys_strict_and_not(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    with_ctc = tiny_config(tokenizer.vocab_size, ctc_head=True)
    with pytest.raises(ValueError, match=r"missing keys .*ctc_head\.bias, ctc_head\.weight.*strict=False"):
        load_pretrained(tmp_path / "m", config=with_ctc)
    with pytest.warns(UserWarning, match=r"missing keys .*ctc_head\.weight"):
        loaded = load_pretrained(tmp_path / "m", config=with_ctc, strict=False)
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():  # everything else was loaded
        assert torch.equal(loaded_state[key], value), key

    no_audio = tiny_config(tokenizer.vocab_size, audio=None, routes={"image": "shared", "text": "shared"})
    with pytest.raises(ValueError, match=r"unexpected keys .*audio_embed\.conv1\.weight"):
        load_pretrained(tmp_path / "m", config=no_audio)
    with pytest.warns(UserWarning, match=r"unexpected keys .*lm_head|unexpected keys .*audio_embed"):
        loaded = load_pretrained(tmp_path / "m", config=no_audio, strict=False)
    with torch.no_grad():
        x = inputs(tokenizer)
        assert torch.equal(loaded.encode_image(x["pixel_values"]), model.encode_image(x["pixel_values"]))


# ---------------------------------------------------------------------------------------------------- safety
class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if the pickle is ever executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_are_refused_without_running(tokenizer, tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(str(proof))))  # the payload is live: plain unpickling runs it
    assert proof.exists()

    marker = tmp_path / "marker"
    state = {"model." + k: v for k, v in make_model(tokenizer).state_dict().items()}
    zip_ckpt, legacy_ckpt, raw_pickle = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt", tmp_path / "raw.pt"
    torch.save({"state_dict": state, "hyper_parameters": {"x": Payload(str(marker))}}, zip_ckpt)
    torch.save({"state_dict": Payload(str(marker))}, legacy_ckpt, _use_new_zipfile_serialization=False)
    with open(raw_pickle, "wb") as f:
        pickle.dump({"state_dict": Payload(str(marker))}, f, protocol=2)
    for path in (zip_ckpt, legacy_ckpt, raw_pickle):
        with pytest.raises(ValueError, match="refused: this pickle is not weights-only") as info:
            load_pretrained(path)
        assert str(path) in str(info.value)
        assert not marker.exists()
    assert "open" in str(pytest.raises(ValueError, load_pretrained, zip_ckpt).value)  # says what it refused


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    noise = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
    noise = b"\x13" + noise[1:]  # not a pickle/zip/safetensors start by chance
    text = "this is a text file, not a checkpoint\n" * 20
    cases = {"noise.ckpt": noise, "noise.bin": noise, "notes.txt": text.encode(), "empty.pt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a checkpoint.*expected a directory written by save_pretrained") as e:
            load_pretrained(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    (tmp_path / "noise.safetensors").write_bytes(noise)
    with pytest.raises(ValueError, match="noise.safetensors: not a valid safetensors file"):
        load_pretrained(tmp_path / "noise.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path / "folder")


def test_safetensors_with_a_lying_header_is_refused(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path / "good")
    raw = (tmp_path / "good" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    lies = {
        "offsets": {**header, key: {**header[key], "data_offsets": [0, 10**9]}},
        "shape": {**header, key: {**header[key], "shape": [4096, 4096]}},
    }
    variants = {name: _with_header(h, raw[8 + n :]) for name, h in lies.items()}
    variants["length"] = struct.pack("<Q", 10**12) + raw[8:]  # header size beyond the file
    variants["truncated"] = raw[: len(raw) // 2]
    for name, data in variants.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        (folder / "model.safetensors").write_bytes(data)
        for target in (folder, folder / "model.safetensors"):
            with pytest.raises(ValueError, match="not a valid safetensors file") as info:
                load_pretrained(target)
            assert str(folder / "model.safetensors") in str(info.value), name


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ---------------------------------------------------------------------------------------------------- atomic saves
def test_interrupted_save_leaves_the_previous_model(tokenizer, tmp_path, monkeypatch):
    good = make_model(tokenizer, seed=0)
    target = tmp_path / "model"
    good.save_pretrained(target)
    (target / "README.md").write_text("my notes")
    before = digest(target)
    real_save_file = safetensors.torch.save_file

    def fails_halfway(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)  # a partly written file ...
        raise OSError("No space left on device")  # ... then the failure

    monkeypatch.setattr(safetensors.torch, "save_file", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        make_model(tokenizer, seed=1).save_pretrained(target)
    monkeypatch.undo()

    assert digest(target) == before
    assert os.listdir(tmp_path) == ["model"]  # no staging folder left behind
    assert_same_state(good, load_pretrained(target))


def test_failed_swap_restores_the_previous_model(tokenizer, tmp_path, monkeypatch):
    good = make_model(tokenizer, seed=0)
    target = tmp_path / "model"
    good.save_pretrained(target)
    before = digest(target)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder moving into place
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        make_model(tokenizer, seed=1).save_pretrained(target)
    monkeypatch.undo()
    assert digest(target) == before and os.listdir(tmp_path) == ["model"]
    assert_same_state(good, load_pretrained(target))


def test_save_replaces_the_model_and_keeps_other_files(tokenizer, tmp_path, monkeypatch):
    target = tmp_path / "model"
    (target / "logs").mkdir(parents=True)
    (target / "README.md").write_text("model card")
    (target / "logs" / "train.log").write_text("step 1")
    os.chmod(target, 0o750)
    make_model(tokenizer, seed=0).save_pretrained(target)
    new = make_model(tokenizer, seed=1)
    new.save_pretrained(target)
    assert (target / "README.md").read_text() == "model card"
    assert (target / "logs" / "train.log").read_text() == "step 1"
    assert os.stat(target).st_mode & 0o777 == 0o750
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert_same_state(new, load_pretrained(target))

    # Hugging Face's pattern: the processor saved on its own, then the weights; the processor files stay
    (tmp_path / "hf").mkdir()
    new.processor.save_pretrained(tmp_path / "hf")
    new.processor = None
    new.save_pretrained(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(pretrained.OWN_FILES)
    assert load_pretrained(tmp_path / "hf").processor.tokenizer.vocab_size == tokenizer.vocab_size
    # ... but a model saved over another model does not take that model's processor (its tokenizer's ids would mean
    # other tokens to the new weights)
    new.save_pretrained(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert load_pretrained(tmp_path / "hf").processor is None
    shutil.rmtree(tmp_path / "hf")

    with pytest.raises(FileExistsError, match="already holds a saved model and overwrite=False"):
        save_pretrained(new, target, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="got an existing file"):
        save_pretrained(new, tmp_path / "file")
    monkeypatch.chdir(target)
    with pytest.raises(ValueError, match="current working directory"):
        save_pretrained(new, ".")
    with pytest.raises(TypeError, match="model: expected mmformer.MultimodalTransformer"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


# ---------------------------------------------------------------------------------------------------- other formats
def test_lightning_checkpoint_loads(tokenizer, tmp_path):
    model = make_model(tokenizer)
    cfg = model.config
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["loss.weight"] = torch.ones(3)  # another submodule of the LightningModule: not the model's
    # the layout MultimodalTask writes: the model under "model.", its config under checkpoint["mmformer"]
    path = tmp_path / "task.ckpt"
    hparams = {"model": cfg.to_dict(), "lr": 1e-3}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "mmformer": {"model_config": cfg.to_dict()}}, path)
    assert_same_state(model, load_pretrained(path))

    # a config anywhere else is not searched for: the one key our checkpoints carry, or config=
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "noconfig.ckpt")
    with pytest.raises(ValueError, match=r"noconfig.ckpt: found no model config.*checkpoint\['mmformer'\]"):
        load_pretrained(tmp_path / "noconfig.ckpt")
    assert_same_state(model, load_pretrained(tmp_path / "noconfig.ckpt", config=cfg))
    torch.save({"state_dict": {"net.w": torch.ones(2)}}, tmp_path / "other.ckpt")  # not an mmformer model
    with pytest.raises(ValueError, match="holds no 'model.' keys"):
        load_pretrained(tmp_path / "other.ckpt", config=cfg)


def test_weights_files_next_to_a_config(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    # a bare safetensors file beside config.json, under another name
    (tmp_path / "bare").mkdir()
    shutil.copy(tmp_path / "m" / "config.json", tmp_path / "bare" / "config.json")
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "bare" / "weights.safetensors")
    assert_same_state(model, load_pretrained(tmp_path / "bare" / "weights.safetensors"))
    # alone, it still carries its config in the safetensors metadata
    (tmp_path / "bare" / "config.json").unlink()
    assert_same_state(model, load_pretrained(tmp_path / "bare" / "weights.safetensors"))
    # a plain torch state dict beside a config.json
    shutil.copy(tmp_path / "m" / "config.json", tmp_path / "bare" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bare" / "pytorch_model.bin")
    assert_same_state(model, load_pretrained(tmp_path / "bare" / "pytorch_model.bin"))
    assert_same_state(model, load_pretrained(tmp_path / "m" / "config.json"))


def test_a_killed_saves_folders_are_deleted_by_the_next_save(tokenizer, tmp_path):
    """SIGTERM or SIGKILL mid-save skips the clean-up: its staging folder (``.NAME.PID.tmp-*``) stayed beside the
    target for good (a 145 MB one after an export). The next save deletes those of processes that no longer run; a
    previous version moved aside (``.old-*``) only where the target exists (else it is that version's only copy),
    and nothing of a save still running (this process's, or a live process's) nor what a user put there."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    target = tmp_path / "model"
    names = {
        f".model.{gone.pid}.tmp-a1": False,  # a killed save's unfinished folder: deleted
        f".model.{gone.pid}.old-b2": True,  # the killed save's previous version, no target yet: kept
        f".model.{os.getpid()}.tmp-c3": True,  # a save of this process still running
        f".model.{os.getppid()}.tmp-d4": True,  # of a live process
        ".model.tmp-e5": True,  # an older mmformer's name: whose it is is unknown
        ".other.1.tmp-f6": True,  # another target's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 16)
    make_model(tokenizer, seed=0).save_pretrained(target)
    assert {n: (tmp_path / n).is_dir() for n in names} == names
    make_model(tokenizer, seed=1).save_pretrained(target)  # the target exists now: the dead save's old folder goes
    assert not (tmp_path / f".model.{gone.pid}.old-b2").exists()
    kept = [n for n, kept in names.items() if kept and ".old-" not in n]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *kept])
