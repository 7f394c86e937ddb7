"""bf16 on CPUs with AMX: the choice follows the CPU's flags and says why; under autocast the towers stay within bf16
tolerance of a float64 reference (bf16 runs on any CPU, slowly where it has no AMX); the speed target (≥ 1.5×
float32 at ViT-B/32 size) is measured only where the CPU has AMX bf16, and skipped with the reason elsewhere.

Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-8 ≈ 0.004 per operation); through two blocks the
L2-normalised embeddings and the decoder logits stay within 0.05 of float64, float32 within 1e-4.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import TINY_AUDIO, TINY_IMAGE, TINY_STACK, TINY_TEXT

from mmformer.compress import cpu_precision
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.model import MultimodalTransformer

AMX_CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"  # noqa: E501
EPYC_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"
ZEN4_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 avx512_vnni\n"


def tiny() -> MultimodalTransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        stacks={"shared": StackConfig(**{**TINY_STACK, "width": 32, "cross_attention": True})},
        image=ImageConfig(**TINY_IMAGE),
        audio=AudioConfig(**TINY_AUDIO),
        text=TextConfig(**TINY_TEXT),
        embed_dim=16,
    )
    return MultimodalTransformer(config).eval()


def outputs(model: MultimodalTransformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels, audio = torch.randn(3, 3, 16, 16, generator=g), 0.3 * torch.randn(3, 1200, generator=g)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])
    lengths = torch.tensor([1200, 900, 1000])
    pixels, audio = pixels.to(dtype), audio.to(dtype)
    memory, memory_mask = model.encode_audio_tokens(audio, lengths)
    out = {
        "image": model.encode_image(pixels),
        "audio": model.encode_audio(audio, lengths),
        "text": model.encode_text(ids, ids != 0),
        "logits": model.decode(ids[:, :3], memory, memory_mask),
    }
    return {k: v.double() for k, v in out.items()}


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    def use(text: str) -> None:
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(cpu_precision, "CPUINFO", tmp_path / "cpuinfo")
        cpu_precision.cpu_flags.cache_clear()

    yield use
    cpu_precision.cpu_flags.cache_clear()


def test_bf16_is_chosen_by_the_cpus_amx_and_the_choice_says_why(cpuinfo):
    cpuinfo(AMX_CPUINFO)
    report = cpu_precision.cpu_report()
    assert report["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and report["fast_bf16"] and report["fast_int8"]
    assert {"amx_bf16", "avx512_vnni"} <= set(report["flags"])
    assert report["capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu_precision.bf16_choice() == (True, "bf16 autocast on: this CPU has AMX bf16 tiles")
    with cpu_precision.inference_autocast() as (on, _):
        assert on and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    cpuinfo(EPYC_CPUINFO)
    on, why = cpu_precision.bf16_choice()
    assert not on and "AMD EPYC 7B13" in why and "no AMX bf16" in why
    assert not cpu_precision.cpu_report()["fast_int8"]
    with cpu_precision.inference_autocast() as (on, _):
        assert not on and not torch.is_autocast_enabled("cpu")
    # AVX-512 BF16 without AMX: off by default (decoding steps run slower), the reason says where it pays
    cpuinfo(ZEN4_CPUINFO)
    on, why = cpu_precision.bf16_choice()
    assert not on and "AMD EPYC 9B14" in why and "AVX-512 BF16" in why and "enabled=True" in why
    assert cpu_precision.cpu_report()["fast_int8"] and not cpu_precision.cpu_report()["fast_bf16"]
    assert cpu_precision.bf16_choice(True)[0] and not cpu_precision.bf16_choice(False)[0]


def test_bf16_autocast_stays_within_bf16_tolerance_of_float64():
    model = tiny()
    with torch.no_grad():
        reference = outputs(model.double(), torch.float64)
        float32 = outputs(model.float(), torch.float32)
    with cpu_precision.inference_autocast(enabled=True) as (on, _):
        assert on
        bf16 = outputs(model, torch.float32)
    for name, expected in reference.items():
        assert float((float32[name] - expected).abs().max()) <= 1e-4, name
        diff = float((bf16[name] - expected).abs().max())
        assert 0 < diff <= 0.05, (name, diff)  # it ran in bf16, within bf16's rounding


@pytest.mark.slow
def test_bf16_is_faster_than_float32_at_vit_b32_size_where_the_cpu_has_amx():
    """Target ≥ 1.5× float32 for the image encoder at ViT-B/32 (224 px, width 768, 12 blocks), batch 8."""
    on, why = cpu_precision.bf16_choice()
    if not on:
        print(f"skipped: {why}")
        pytest.skip(why)
    model = MultimodalTransformer(
        ModelConfig(
            stacks={"vision": StackConfig(width=768, depth=12, n_heads=12, mlp_ratio=4.0)},
            routes={"image": "vision"},
            image=ImageConfig(image_size=[224, 224], patch_size=32),
            audio=None,
            text=TextConfig(vocab_size=64, max_length=8),
            embed_dim=512,
        )
    ).eval()
    pixels = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def seconds(enabled: bool) -> float:
        with cpu_precision.inference_autocast(enabled):
            model.encode_image(pixels)
            start = time.perf_counter()
            for _ in range(5):
                model.encode_image(pixels)
        return (time.perf_counter() - start) / 5

    speedup = seconds(False) / seconds(True)
    print(f"bf16 vs float32 at ViT-B/32: {speedup:.2f}x on {cpu_precision.cpu_model()}")
    assert speedup >= 1.5, speedup
