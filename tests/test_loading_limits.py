"""Loading neither trusts a config nor wastes memory: the model is built on the meta device and checked against the
weights file's header before anything is allocated (mmformer/io/weights.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import mmformer
from mmformer import ModelConfig, MultimodalTransformer
from mmformer.config import AudioConfig, ImageConfig, StackConfig, TextConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        stacks={"shared": StackConfig(width=32, depth=2, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        audio=AudioConfig(n_mels=16, n_fft=64, hop_length=32, max_frames=200),
        text=TextConfig(vocab_size=64, max_length=16),
        embed_dim=16,
    )
    return ModelConfig(**{**fields, **overrides})


def inflate(directory: Path, **stack) -> None:
    """Edit a saved model's config.json as a broken or malicious repository could."""
    config = json.loads((directory / "config.json").read_text())
    config["stacks"]["shared"].update(stack)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    MultimodalTransformer(tiny_config()).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_inflated_config_is_refused_fast_without_allocating(saved):
    """Width 8192 and depth 64 (51.5 G parameters) against a 0.3 MB file: refused in under a second with the size
    summary, in a process whose address space may grow by the weights' size only (RLIMIT_AS)."""
    inflate(saved, width=8192, depth=64, n_heads=64)
    weights_bytes = (saved / "model.safetensors").stat().st_size
    script = textwrap.dedent(
        f"""
        import json, resource, time
        import mmformer.io.auto, mmformer.preprocess.processor  # every module loading needs, imported before the limit
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        limit = vm + {weights_bytes} + 64 * 2**20  # what is mapped now, the weights, and room for Python objects
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        start = time.perf_counter()
        try:
            mmformer.io.auto.load_pretrained({str(saved)!r})
            result = {{"error": None}}
        except Exception as e:
            result = {{"error": type(e).__name__, "message": str(e)}}
        result["seconds"] = time.perf_counter() - start
        print(json.dumps(result))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] == "ValueError", result
    assert result["seconds"] < 1.0, result
    assert "config declares at least 43 G parameters; model.safetensors holds 49.2 k" in result["message"], result


def test_a_config_declaring_more_blocks_is_refused_before_it_is_built(saved):
    """Even the meta-device build would take seconds here: a lower bound computed from the config refuses it first."""
    inflate(saved, depth=4096, width=65536, n_heads=64)  # building even on the meta device would take minutes
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"config declares at least 176 T parameters; model.safetensors holds 49.2 k.*max_parameters="
    ):
        mmformer.load_pretrained(saved)
    assert time.perf_counter() - start < 1.0


def test_missing_keys_are_listed_without_allocating_and_initialised_only_when_allowed(saved):
    with_ctc = tiny_config(ctc_head=True)
    with pytest.raises(ValueError, match=r"missing keys .*ctc_head\.bias, ctc_head\.weight.*\(config declares"):
        mmformer.load_pretrained(saved, config=with_ctc)
    reference = mmformer.load_pretrained(saved)
    with pytest.warns(UserWarning, match=r"missing keys \(initialised afresh\): ctc_head\.bias, ctc_head\.weight"):
        loaded = mmformer.load_pretrained(saved, config=with_ctc, strict=False)
    state = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key  # everything the file holds, as stored
    head = loaded.ctc_head.weight
    assert head.device.type == "cpu" and torch.isfinite(head).all() and head.abs().sum() > 0  # initialised afresh
    assert loaded.lm_head.weight is loaded.text_embed.tokens.weight  # ties survive assignment


def test_max_parameters_overrides_the_ceiling(saved):
    bigger = tiny_config(
        ctc_head=True, stacks={"shared": StackConfig(width=32, depth=3, n_heads=2, cross_attention=True)}
    )
    with pytest.raises(ValueError, match="more parameters than allowed"):
        mmformer.load_pretrained(saved, config=bigger, strict=False, max_parameters=1000)
    with pytest.warns(UserWarning, match="blocks.2"):
        model = mmformer.load_pretrained(saved, config=bigger, strict=False)  # room for new blocks by default
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_bf16_weights_load_into_the_requested_dtype(saved, tmp_path):
    model = mmformer.load_pretrained(saved)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    again = mmformer.load_pretrained(tmp_path / "bf16")  # stored bf16, cast to the default float32
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    kept = mmformer.load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    for key, value in model.state_dict().items():
        assert torch.equal(kept.state_dict()[key], value.to(torch.bfloat16)), key


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StackConfig(width=2**17, n_heads=2**7), r"StackConfig.width must be <= 65536"),
        (lambda: StackConfig(depth=10**6), r"StackConfig.depth must be <= 4096"),
        (lambda: TextConfig(vocab_size=10**9), r"TextConfig.vocab_size must be <= 16777216"),
        (lambda: TextConfig(max_length=10**9), r"TextConfig.max_length must be <= 1048576"),
        (lambda: AudioConfig(max_frames=10**9), r"AudioConfig.max_frames must be <= 16777216"),
        (lambda: ImageConfig(image_size=[2**20, 16], patch_size=16), r"ImageConfig.image_size \(each side\) must be"),
    ],
)
def test_absurd_sizes_are_refused_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_derived_constants_are_not_state():
    """Sinusoids, RoPE frequencies, ALiBi slopes, mel filters: computed where used, so the model holds no buffers
    and a meta-built model is complete once its weights are assigned."""
    config = tiny_config(
        stacks={"shared": StackConfig(width=32, depth=2, n_heads=2, position="rope", cross_attention=True)}
    )
    model = MultimodalTransformer(config)
    assert list(model.buffers()) == []
    assert not any("features" in key for key in model.state_dict())
