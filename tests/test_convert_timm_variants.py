"""timm ViT variants beyond the classic one: DINOv2-style (register tokens, layer scale, class and registers without
positions), SigLIP-style (no class token, attention-pooling head, or average pooling), ``fc_norm`` after average
pooling, and the position table resampled to other image sizes as timm does — each to 1e-4 against timm on tiny
random-weight models."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.convert.timm_vit import from_timm_vit  # noqa: E402

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-4
BASE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
VARIANTS = {
    "dinov2-registers": dict(reg_tokens=4, init_values=1e-5, no_embed_class=True),
    "registers-with-positions": dict(reg_tokens=2, init_values=0.1),
    "avg-fc-norm-registers": dict(reg_tokens=2, global_pool="avg", init_values=1e-5, no_embed_class=True),
    "siglip-map": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "siglip-gap": dict(class_token=False, global_pool="avg", fc_norm=False),
}


def vit(**kwargs) -> torch.nn.Module:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **{**BASE, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():  # every weight random: layer scales, registers, the MAP head too
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_timm(variant):
    torch.manual_seed(0)
    ref = vit(**VARIANTS[variant])
    model = from_timm_vit(ref)
    image = model.config.image
    assert image.n_registers == ref.num_reg_tokens and image.pool_norm == (
        not isinstance(ref.fc_norm, torch.nn.Identity)
    )
    assert (model.config.stacks["vision"].layer_scale is not None) == ("init_values" in VARIANTS[variant])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.encode_image(pixels, normalize=False) - ref(pixels)).abs().max().item() < ATOL
        features = ref.forward_head(ref.forward_features(pixels), pre_logits=True)
    headless = from_timm_vit(vit(**{**VARIANTS[variant], "num_classes": 0}))
    assert headless.config.embed_dim is None and features.shape[-1] == 32


@pytest.mark.parametrize("variant", ["dinov2-registers", "registers-with-positions", "siglip-map"])
def test_positions_resample_to_other_sizes_as_timm(variant):
    """Our table resampled at run time equals timm's dynamic_img_size, and timm's own resampling on load."""
    torch.manual_seed(0)
    ref = vit(dynamic_img_size=True, **VARIANTS[variant])
    model = from_timm_vit(ref)
    for size in ((48, 40), (24, 24)):
        pixels = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert (model.encode_image(pixels, normalize=False) - ref(pixels)).abs().max().item() < ATOL


def test_checkpoint_loaded_at_another_size(tmp_path):
    """``timm.create_model(img_size=48)`` resamples a 32-pixel checkpoint's table on load; so does mmformer when
    the 32-pixel conversion reads 48-pixel images."""
    torch.manual_seed(0)
    headless = dict(VARIANTS["dinov2-registers"], num_classes=0)  # timm drops a head of another class count on load
    small = vit(**headless)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, tmp_path / "model.safetensors")
    kwargs = {**BASE, **headless, "img_size": 48}
    big = timm.create_model(
        "vit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
        **kwargs,
    ).eval()  # fmt: skip
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        reference = big(pixels)
        assert (from_timm_vit(small).encode_image(pixels, normalize=False) - reference).abs().max().item() < ATOL
        assert (from_timm_vit(big).encode_image(pixels, normalize=False) - reference).abs().max().item() < ATOL


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [(dict(global_pool="max"), "global_pool='max'"), (dict(class_token=False, global_pool="avg", fc_norm=True,
      final_norm=False), None)],
)  # fmt: skip
def test_unsupported_pooling_is_named(kwargs, feature):
    ref = vit(**kwargs)
    if feature is None:  # fc_norm without a final norm: supported
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert (from_timm_vit(ref).encode_image(pixels, normalize=False) - ref(pixels)).abs().max() < ATOL
        return
    with pytest.raises(UnsupportedModelError, match=feature):
        from_timm_vit(ref)


def test_one_channel_model_converts_with_averaged_statistics():
    """A 1-channel ViT (``in_chans=1``: grayscale, medical, spectrogram fine-tunes) died in the processor: timm's
    ``resolve_data_config`` gives its RGB mean/std whatever ``in_chans`` is. The processor now normalises with their
    averages, says so in a warning, and the model equals timm's."""
    torch.manual_seed(0)
    stats = dict(mean=(0.1, 0.2, 0.6), std=(0.2, 0.3, 0.4))
    ref = vit(in_chans=1, pretrained_cfg_overlay=stats)
    with pytest.warns(UserWarning, match=r"1-channel model .*\(0\.1, 0\.2, 0\.6\).*averages 0\.3 / 0\.3"):
        model = from_timm_vit(ref)
    assert model.config.image.channels == 1
    image = model.processor.image
    assert image.channels == 1 and image.mean == pytest.approx((0.3,)) and image.std == pytest.approx((0.3,))
    pixels = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (model.encode_image(pixels, normalize=False) - ref(pixels)).abs().max().item() < ATOL
    gray = torch.full((1, 32, 32), 0.6)  # a grayscale image: one normalised channel
    assert torch.allclose(model.processor(images=[gray])["pixel_values"], torch.ones(1, 1, 32, 32))
