"""The config knobs public checkpoints need (layer scale, registers, attention pooling, CoCa's resampler and decoder
layout, SigLIP's and CoCa's text, Whisper's window and generation rules): validated with errors that name the field,
saved and loaded exactly, and decoding through the shared KV cache equal to decoding without it."""

from __future__ import annotations

import pytest
import torch

from mmformer import MultimodalTransformer
from mmformer.config import AudioConfig, GenerationConfig, ImageConfig, ModelConfig, StackConfig, TextConfig


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StackConfig(width=16, n_heads=4, layer_scale=float("nan")), "StackConfig.layer_scale must be"),
        (lambda: StackConfig(width=16, n_heads=4, parallel=True, layer_scale=0.1), "needs parallel=False"),
        (lambda: StackConfig(width=16, n_heads=4, cross_mlp=True), "need cross_attention=True"),
        (lambda: ImageConfig(image_size=16, patch_size=4, pool="max"), "ImageConfig.pool must be one of"),
        (lambda: ImageConfig(image_size=16, patch_size=4, n_registers=-1), "ImageConfig.n_registers must be >= 0"),
        (lambda: ImageConfig(image_size=16, patch_size=4, resampler_queries=4, pool="mean"), "needs pool='cls'"),
        (lambda: ImageConfig(image_size=16, patch_size=4, class_token=False), "needs class_token=True"),
        (lambda: AudioConfig(pad_to_seconds=31.0), "fit max_frames=3000"),
        (lambda: AudioConfig(pad_to_seconds=-1.0), "AudioConfig.pad_to_seconds must be None or > 0"),
        (lambda: TextConfig(legacy_cls_mask=True), "legacy_cls_mask=True needs pool='append_cls'"),
        (lambda: GenerationConfig(language_ids={"en": 5}, language="de"), "GenerationConfig.language must be one of"),
        (lambda: GenerationConfig(task_ids={"transcribe": 5}, task="dance"), "GenerationConfig.task must be one of"),
    ],
)
def test_knob_errors_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_model_level_checks(make_model_config, make_stack_config):
    with pytest.raises(ValueError, match=r"projections\['text'\] must be one of"):
        make_model_config(projections={"text": "conv"})
    with pytest.raises(ValueError, match=r"projections\['image'\]='none' needs its features as wide as embed_dim"):
        make_model_config(projections={"image": "none"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_model_config(generation=GenerationConfig(suppress_tokens=[3, 99]))
    with pytest.raises(ValueError, match="decoder_input='text' runs the text stack and then the decoder stack"):
        make_model_config(decoder_input="text")  # one shared stack for text and decoder


def coca_like(make_stack_config) -> ModelConfig:
    """A tiny CoCa-shaped config: resampler, appended class token with the legacy mask, decoder reading the text."""
    return ModelConfig(
        stacks={
            "vision": make_stack_config(final_norm=False, layer_scale=0.5),
            "text": make_stack_config(),
            "decoder": make_stack_config(cross_attention=True, cross_mlp=True, cross_memory_norm=True),
        },
        routes={"image": "vision", "text": "text", "decoder": "decoder"},
        image=ImageConfig(image_size=16, patch_size=4, n_registers=2, resampler_queries=5, resampler_width=16),
        audio=None,
        text=TextConfig(
            vocab_size=32,
            max_length=10,
            bos_id=1,
            eos_id=2,
            causal=True,
            pool="append_cls",
            fixed_length=True,
            legacy_cls_mask=True,
        ),  # fmt: skip
        embed_dim=8,
        projections={"text": "mlp"},
        decoder_input="text",
        tie_lm_head=False,
        generation=GenerationConfig(suppress_tokens=[5], begin_suppress_tokens=[2]),
    )


def test_save_and_load_round_trip(make_stack_config, tmp_path):
    model = MultimodalTransformer(coca_like(make_stack_config)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.generation.suppress_tokens == [5]
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 32, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))


def test_decoder_continuing_the_text_stack_cached_equals_uncached(make_stack_config):
    torch.manual_seed(0)
    model = MultimodalTransformer(coca_like(make_stack_config)).eval()
    pixels = torch.randn(3, 3, 16, 16)
    cached = model.generate(image=pixels, max_new_tokens=6)
    assert torch.equal(cached, model.generate(image=pixels, max_new_tokens=6, use_cache=False))
    assert cached.shape[1] <= 9  # the decoder's positions end one before the appended class token's
    assert not torch.isin(cached[:, 1:], torch.tensor([5])).any() and not (cached[:, 1] == 2).any()
    beams = model.generate(image=pixels, max_new_tokens=6, num_beams=3)
    assert torch.equal(beams, model.generate(image=pixels, max_new_tokens=6, num_beams=3, use_cache=False))


def test_every_new_parameter_gets_a_gradient(make_stack_config):
    model = MultimodalTransformer(coca_like(make_stack_config)).train()
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 32, (2, 6))
    memory, mask = model.encode_image_tokens(pixels)
    loss = model.pool_image(memory).sum() + model.encode_text(ids).sum() + model.decode(ids, memory, mask).sum()
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None and n not in ("logit_scale",)]
    assert silent == []
