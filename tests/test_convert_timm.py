"""timm VisionTransformer converter: logits and pre-logit features equal timm's (float32, 1e-4), state dicts by
architecture name, the processor from timm's data config, and refusals that name what is wrong. Models are built
locally with random weights; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_

from mmformer.convert import from_timm_vit
from mmformer.convert.common import UnsupportedModelError

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

timm = pytest.importorskip("timm")

TOL = 1e-4
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)  # VisionTransformer kwargs


def tiny_vit(**overrides) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return randomize_(VisionTransformer(**{**TINY, **overrides}))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def pre_logits(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def test_vit_small_patch16_224_parity():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = from_timm_vit(ref)
    stack = ours.config.stacks["vision"]
    assert (stack.width, stack.depth, stack.n_heads, stack.norm_eps) == (384, 12, 6, 1e-6)
    assert "text" not in ours.config.routes and ours.text_embed is None
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = ref.forward_features(x)
        tokens, _ = ours.encode_image_tokens(x)
        assert max_diff(tokens[:, 0], ref.forward_head(features, pre_logits=True)) < TOL  # pooled pre-logits
        assert max_diff(ours.image_proj(tokens[:, 0]), ref.forward_head(features)) < TOL  # = encode_image's logits
    image = ours.processor.image
    assert image.image_size == (224, 224) and image.mean == (0.5, 0.5, 0.5) and image.std == (0.5, 0.5, 0.5)
    assert image.interpolation == "bicubic" and ours.processor.tokenizer is None


def test_depth4_logits_pre_logits_and_state_dict_file(tmp_path):
    ref = randomize_(timm.create_model("vit_small_patch16_224", pretrained=False, depth=4, img_size=64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = ref(x)
        ours = from_timm_vit(ref)
        assert ours.config.embed_dim == 1000 and ours.config.projection_bias
        assert max_diff(ours.encode_image(x, normalize=False), logits) < TOL
        path = tmp_path / "vit.pth"
        torch.save(ref.state_dict(), path)
        from_file = from_timm_vit(path, model_name="vit_small_patch16_224", depth=4, img_size=64)
        assert max_diff(from_file.encode_image(x, normalize=False), logits) < TOL
        ref.reset_classifier(0)  # head-less: encode_image gives the pre-logit features
        headless = from_timm_vit(ref)
        assert headless.config.embed_dim is None
        assert max_diff(headless.encode_image(x, normalize=False), pre_logits(ref, x)) < TOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(qkv_bias=False, qk_norm=True),
        dict(no_embed_class=True, pre_norm=True, act_layer="quick_gelu"),
        dict(class_token=False, global_pool="avg", fc_norm=False),
        dict(pos_embed="none", final_norm=False),
        dict(class_token=True, global_pool="avg", fc_norm=False, pool_include_prefix=True),
    ],
    ids=["qk-norm, no qkv bias", "no_embed_class, pre-norm, quickgelu", "avg pool", "no positions", "avg with cls"],
)
def test_variants(overrides):
    ref = tiny_vit(**overrides)
    ours = from_timm_vit(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours.encode_image(x, normalize=False), ref(x)) < TOL


def test_state_dict_mismatches_are_listed():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10)
    state = dict(ref.state_dict())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 192)
    state["blocks.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        from_timm_vit(state, model_name="vit_tiny_patch16_224", depth=2)
    message = str(err.value)
    assert "blocks.1.mlp.fc1.weight (100, 192) → blocks.1.mlp.fc1.weight: expected (768, 192), got (100, 192)" in (
        message
    )
    assert "source keys with no place in the VisionTransformer: ['blocks.1.extra.weight']" in message
    with pytest.raises(ValueError, match="model_name"):
        from_timm_vit(ref.state_dict())


@pytest.mark.parametrize(
    "overrides, feature",
    [
        # register tokens, fc_norm, patch-average pooling, layer scale and the MAP head are supported now:
        # tests/test_convert_timm_variants.py
        (dict(global_pool="max", fc_norm=False), "global_pool='max'"),
        (dict(class_token=False, global_pool=""), "global_pool=''"),
        (dict(global_pool="map", pool_include_prefix=True), "reading the prefix tokens"),
    ],
)
def test_unsupported_features_are_named(overrides, feature):
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(UnsupportedModelError, match=feature):
        from_timm_vit(VisionTransformer(**{**TINY, **overrides}))


def test_other_timm_architectures_are_unsupported_not_type_errors():
    """A timm model of another architecture (Eva, as a timm Hub repository may hold) is refused as unsupported, the
    error every converter raises for what it cannot reproduce; a non-model stays a TypeError."""
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=0)
    with pytest.raises(UnsupportedModelError, match="the timm architecture Eva"):
        from_timm_vit(eva)
    with pytest.raises(TypeError, match="expected a timm VisionTransformer"):
        from_timm_vit(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "data",
    [{}, dict(crop_pct=0.875), dict(crop_pct=1.0), dict(crop_pct=1.0, crop_mode="squash")],
    ids=["vit_tiny's crop_pct 0.9", "crop_pct 0.875", "no border", "squash"],
)
def test_the_processor_gives_timms_own_pixels(data):
    """The processor's pixels are those of timm's eval transform (``create_transform(**resolve_data_config(...))``,
    which resizes the shortest edge to ``floor(size / crop_pct)`` and center-crops), to a uint8 step."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, pretrained_cfg_overlay=data)
    transform = create_transform(**resolve_data_config({}, model=ref))
    processor = from_timm_vit(ref).processor
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 64), (80, 120), (300, 200)]
    ]
    expected = torch.stack([transform(image) for image in images])
    step = 1 / 255 / min(processor.image.std)  # one uint8 step, normalised
    assert max_diff(processor(images=images)["pixel_values"], expected) <= step


def test_a_crop_mode_without_equivalent_warns():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                            pretrained_cfg_overlay=dict(crop_mode="border", crop_pct=0.95))  # fmt: skip
    with pytest.warns(UserWarning, match="crop_mode='border' with crop_pct=0.95"):
        assert from_timm_vit(ref).processor.image.resize == "shortest"
