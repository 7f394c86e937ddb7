"""OpenAI CLIP / open_clip and Hugging Face CLIP converters: parity with the public implementations (float32,
1e-4), the tokenizer, file loading, and refusals that name what is wrong. Every model is built locally with random
weights; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from helpers import randomize_

from mmformer.convert import from_hf_clip, from_open_clip
from mmformer.convert.common import UnsupportedModelError, load_state_dict

open_clip = pytest.importorskip("open_clip")

TOL = 1e-4
TEXTS = ["a photo of a cat", "a diagram", "an extremely long caption that goes on and on, well past sixteen tokens"]
SMALL = dict(  # a small open_clip config: 32×32 images in 8×8 patches, 16 text positions, CLIP's vocabulary
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_clip_parity(ours, ref, pixels: torch.Tensor, ids: torch.Tensor) -> None:
    """encode_image / encode_text (unnormalised) and the zero-shot logits agree with open_clip's."""
    with torch.no_grad():
        img, txt = ref.encode_image(pixels), ref.encode_text(ids)
        assert max_diff(ours.encode_image(pixels, normalize=False), img) < TOL
        assert max_diff(ours.encode_text(ids, normalize=False), txt) < TOL
        ref_logits = (
            ref.logit_scale.exp() * ref.encode_image(pixels, normalize=True) @ ref.encode_text(ids, normalize=True).T
        )
        logits = ours.logit_scale.exp() * ours.encode_image(pixels) @ ours.encode_text(ids).T
        assert max_diff(logits, ref_logits) < TOL


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    return randomize_(open_clip.CLIP(**SMALL))


@pytest.fixture(scope="module")
def small_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32), open_clip.tokenize(TEXTS[:2], context_length=16)


# ---------------------------------------------------------------------------------------------------- open_clip
def test_open_clip_vit_b32_parity():
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    ours = from_open_clip(ref)
    pixels = torch.randn(2, 3, 224, 224)
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS[:2])
    assert ours.config.stacks["vision"].n_heads == 12 and ours.config.stacks["text"].n_heads == 8
    assert ours.config.text.causal and ours.config.image.pre_norm and not ours.config.image.patch_bias
    with torch.no_grad():
        img, txt = ref.encode_image(pixels), ref.encode_text(ids)
        our_img, our_txt = ours.encode_image(pixels, normalize=False), ours.encode_text(ids, normalize=False)
        assert max_diff(our_img, img) < TOL
        assert max_diff(our_txt, txt) < TOL
        normed = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        ref_logits = ref.logit_scale.exp() * normed(img) @ normed(txt).T
        logits = ours.logit_scale.exp() * normed(our_img) @ normed(our_txt).T
        assert max_diff(logits, ref_logits) < TOL
    assert torch.equal(ours.processor.tokenizer(TEXTS[:2], padding="max_length")["input_ids"], ids)


@pytest.mark.numerics
def test_open_clip_small_parity_and_processor(small_clip, small_inputs):
    ours = from_open_clip(small_clip)
    assert_clip_parity(ours, small_clip, *small_inputs)
    tokenizer = ours.processor.tokenizer
    assert tokenizer is not None and tokenizer.max_length == 16
    expected = open_clip.tokenize(TEXTS, context_length=16)  # the third text is cut, keeping its end-of-text token
    assert torch.equal(tokenizer(TEXTS, padding="max_length")["input_ids"], expected)
    image = ours.processor.image
    assert image.image_size == (32, 32) and image.interpolation == "bicubic" and image.resize == "shortest"
    assert image.mean == open_clip.OPENAI_DATASET_MEAN and image.std == open_clip.OPENAI_DATASET_STD
    # Our tokenizer's batch padded to the longest row, with its mask, pools the same end-of-text states.
    batch = tokenizer(TEXTS)
    with torch.no_grad():
        ours_txt = ours.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)
        assert max_diff(ours_txt, small_clip.encode_text(expected)) < TOL


@pytest.mark.numerics
def test_open_clip_state_dict_file(small_clip, small_inputs, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(small_clip.state_dict(), path)
    ours = from_open_clip(path, model_cfg=SMALL)  # the config gives what shapes cannot: 2 text heads, GELU
    assert_clip_parity(ours, small_clip, *small_inputs)
    assert ours.config == from_open_clip(small_clip).config
    # Without a config, OpenAI's conventions hold, as in open_clip's build_model_from_openai_state_dict, with a warning.
    with pytest.warns(UserWarning, match="OpenAI CLIP's defaults"):
        openai = from_open_clip(path).config
    assert openai.stacks["text"].n_heads == 1 and openai.stacks["vision"].n_heads == 2
    assert openai.stacks["text"].mlp == openai.stacks["vision"].mlp == "quickgelu"
    from safetensors.torch import save_file

    save_file(small_clip.state_dict(), tmp_path / "model.safetensors")
    assert from_open_clip(tmp_path, model_cfg=SMALL).config == ours.config  # a directory with model.safetensors


@pytest.mark.numerics
@pytest.mark.parametrize(
    "vision, text, kwargs",
    [
        (dict(no_ln_pre=True, final_ln_after_pool=True), dict(no_causal_mask=True, pool_type="eos", eos_id=49407), {}),
        ({}, dict(pool_type="first"), dict(quick_gelu=True)),
        (dict(norm_kwargs={"eps": 1e-6}), dict(pool_type="last", norm_kwargs={"eps": 1e-6}), {}),
    ],
    ids=["no-ln-pre, bidirectional eos pooling", "quickgelu, first-token pooling", "eps 1e-6, last-token pooling"],
)
def test_open_clip_variants(vision, text, kwargs):
    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16, **vision),
        text_cfg=dict(context_length=8, vocab_size=49408, width=32, heads=2, layers=1, **text),
        **kwargs,
    )
    ref = randomize_(open_clip.CLIP(**cfg))
    ours = from_open_clip(ref)
    ids = open_clip.tokenize(TEXTS[:2], context_length=8)
    assert_clip_parity(ours, ref, torch.randn(2, 3, 16, 16), ids)
    assert_clip_parity(from_open_clip(ref.state_dict(), model_cfg=cfg), ref, torch.randn(2, 3, 16, 16), ids)


@pytest.mark.filterwarnings("ignore:open_clip. a state dict without an open_clip config:UserWarning")
def test_open_clip_wrong_shape_and_extra_key_are_listed(small_clip):
    state = dict(small_clip.state_dict())
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    state[key] = torch.zeros(200, 64)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.weight \(200, 64\)") as err:
        from_open_clip(state)
    assert "expected (256, 64), got (200, 64)" in str(err.value)
    state = dict(small_clip.state_dict(), **{"visual.mystery.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"source keys with no place.*visual\.mystery\.weight"):
        from_open_clip(state)
    state = {k: v for k, v in small_clip.state_dict().items() if k not in ("ln_final.bias", "visual.ln_post.bias")}
    with pytest.raises(ValueError) as err:
        from_open_clip(state)
    assert "source keys missing: ['visual.ln_post.bias'] (needed for stacks.vision.norm.bias)" in str(err.value)
    assert "source keys missing: ['ln_final.bias'] (needed for stacks.text.norm.bias)" in str(err.value)


@pytest.mark.parametrize(
    "vision, text, feature",
    [
        (dict(attentional_pool="parallel", attn_pooler_heads=2, attn_pooler_queries=4), {}, "attentional pooling"),
        (dict(pool_type="avg"), {}, "pool_type='avg'"),
        (dict(ls_init_value=0.1), {}, "layer scale"),
        (dict(qk_norm=True), {}, "custom attention blocks"),
        ({}, dict(proj_bias=True), "text projection with bias"),
    ],
)
def test_open_clip_unsupported_features_are_named(vision, text, feature):
    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16, **vision),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1, **text),
    )
    ref = open_clip.CLIP(**cfg)
    with pytest.raises(UnsupportedModelError, match=feature):
        from_open_clip(ref)
    with pytest.raises(UnsupportedModelError):
        from_open_clip(ref.state_dict(), model_cfg=cfg)


def test_open_clip_custom_text_tower_state_dict_is_named():
    """A CustomTextCLIP module converts (tests/test_convert_open_clip_custom.py); its bare state dict, whose text
    tower's layout depends on the module, is refused naming the feature."""
    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    ref = open_clip.CustomTextCLIP(**cfg)
    with pytest.raises(UnsupportedModelError, match="custom text towers"):
        from_open_clip(ref.state_dict())


LAION_NAME = "mmformer-test-ViT-H-14-tiny"  # registered in open_clip's model configs by the fixture below


@pytest.fixture
def laion_clip(monkeypatch):
    """open_clip's ViT-H-14 (80-wide vision heads, GELU) shrunk to one block per tower, 28-pixel images and 32-wide text
    heads, registered under :data:`LAION_NAME` (as ``open_clip.add_model_config`` registers a JSON file; undone after
    the test) and built by ``open_clip.create_model``: a model whose heads and activation OpenAI's defaults get
    wrong, while its shapes still convert (320 = 5 × 64, 128 = 2 × 64)."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-H-14"))
    assert cfg["vision_cfg"]["head_width"] == 80 and not cfg.get("quick_gelu")
    cfg["embed_dim"] = 64
    cfg["vision_cfg"].update(image_size=28, layers=1, width=320)
    cfg["text_cfg"].update(context_length=16, layers=1, width=128, heads=4)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, LAION_NAME, cfg)
    torch.manual_seed(0)
    return cfg, randomize_(open_clip.create_model(LAION_NAME, pretrained=None))


def laion_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(2, 3, 28, 28), open_clip.tokenize(TEXTS[:2], context_length=16)


@pytest.mark.numerics
def test_open_clip_bare_state_dict_converts_by_its_architecture_name(laion_clip, tmp_path):
    """A LAION-style bare state dict (open_clip_pytorch_model.bin, no open_clip_config.json) converted silently with
    OpenAI's 64-wide heads and QuickGELU: 5 vision heads instead of 4, ~1e-3 off. Named as open_clip users name it
    (``model_name``, resolved by open_clip's own configs), it equals open_clip's model; unnamed, it warns."""
    cfg, ref = laion_clip
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: no warning
        ours = from_open_clip(path, model_name=LAION_NAME)
    stacks = ours.config.stacks
    assert (stacks["vision"].n_heads, stacks["text"].n_heads) == (4, 4)
    assert stacks["vision"].mlp == stacks["text"].mlp == "gelu"
    assert_clip_parity(ours, ref, *laion_inputs())
    assert ours.config == from_open_clip(ref).config == from_open_clip(path, model_cfg=cfg).config
    with pytest.warns(UserWarning, match=r"64-wide attention heads and QuickGELU.*--model-name.*model_name="):
        bare = from_open_clip(path)
    assert (bare.config.stacks["vision"].n_heads, bare.config.stacks["vision"].mlp) == (5, "quickgelu")
    with pytest.warns(UserWarning, match=r"defaults: 64-wide attention heads, which"):  # the activation was given
        from_open_clip(path, quick_gelu=False)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder's config: no warning
        assert from_open_clip(tmp_path).config == ours.config


@pytest.mark.numerics
def test_convert_command_takes_the_open_clip_architecture_by_flag(laion_clip, tmp_path):
    """``mmformer convert FILE --from open_clip --model-name NAME`` (the flag was refused but with --from timm_vit)
    gives open_clip's model; without the flag the warning names it."""
    from mmformer.cli.main import main
    from mmformer.io.auto import from_pretrained

    _, ref = laion_clip
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    main(["convert", str(path), "--from", "open_clip", "--model-name", LAION_NAME, "--out", str(tmp_path / "named")])
    ours = from_pretrained(tmp_path / "named")
    assert ours.config.stacks["vision"].n_heads == 4 and ours.config.stacks["vision"].mlp == "gelu"
    assert_clip_parity(ours, ref, *laion_inputs())
    with pytest.warns(UserWarning, match=r"OpenAI CLIP's defaults.*--from open_clip --model-name"):
        main(["convert", str(path), "--from", "open_clip", "--out", str(tmp_path / "bare")])
    with pytest.raises(
        SystemExit, match=r"--model-name: model_name: open_clip has no architecture 'ViT-H14'.*ViT-H-14"
    ):
        main(["convert", str(path), "--from", "open_clip", "--model-name", "ViT-H14", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--model-name: only for --from timm_vit or open_clip .*got --from hf_clip"):
        main(["convert", str(path), "--from", "hf_clip", "--model-name", LAION_NAME, "--out", str(tmp_path / "x")])


def test_open_clip_model_name_is_resolved_as_open_clip_does(laion_clip):
    """``model_name`` finds open_clip's config as ``create_model`` does (``/`` read as ``-``; a ``-quickgelu`` name has
    QuickGELU), and a name that is unknown, of another architecture or beside ``model_cfg`` is refused clearly."""
    from mmformer.convert.open_clip_config import named_config

    assert named_config("ViT-H/14") == open_clip.get_model_config("ViT-H-14")
    assert named_config("ViT-H-14-quickgelu")["quick_gelu"] and not named_config("ViT-H-14").get("quick_gelu")
    with pytest.raises(ValueError, match=r"no architecture 'vit-h-14-378'.*closest: ViT-H-14-378"):
        named_config("vit-h-14-378")
    with pytest.raises(ValueError, match=r"no -quickgelu config: model_name='ViT-B-16-plus-240', quick_gelu=True"):
        named_config("ViT-B-16-plus-240-quickgelu")
    with pytest.raises(ValueError, match="expected an open_clip architecture name .* got 'hf-hub:laion/x'"):
        named_config("hf-hub:laion/x")
    cfg, ref = laion_clip
    state = ref.state_dict()
    with pytest.raises(ValueError, match=r"model_name: open_clip's 'ViT-H-14' config does not fit .*vision_cfg\.width "
                       r"1280 vs 320, vision_cfg\.layers 32 vs 1.*text_cfg\.context_length 77 vs 16"):  # fmt: skip
        from_open_clip(state, model_name="ViT-H-14")
    with pytest.raises(ValueError, match="model_name / model_cfg: give one"):
        from_open_clip(state, model_name=LAION_NAME, model_cfg=cfg)
    with pytest.raises(ValueError, match="model_name: only used with a state dict"):
        from_open_clip(ref, model_name=LAION_NAME)


class Payload:
    """Stands for any object a pickle could smuggle in."""


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_unsafe_files_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(ValueError, match="never unpickles arbitrary objects"):
        load_state_dict(path)
    scripted = tmp_path / "scripted.pt"  # OpenAI's original .pt files are TorchScript archives
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(ValueError, match="TorchScript archive"):
        from_open_clip(scripted)
    with pytest.raises(TypeError, match="model_or_state_dict"):
        from_open_clip(42)


# ---------------------------------------------------------------------------------------------------- Hugging Face
def _hf_clip(eos_token_id: int):
    transformers = pytest.importorskip("transformers")
    text = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=998,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return randomize_(transformers.CLIPModel(config))


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5: a ModelOutput


@pytest.mark.numerics
@pytest.mark.parametrize("eos_token_id", [999, 2], ids=["eos-id", "legacy-argmax"])
def test_hf_clip_parity(eos_token_id, tmp_path):
    ref = _hf_clip(eos_token_id)
    ours = from_hf_clip(ref)
    assert ours.config.text.eos_id == 999  # legacy configs pool at the argmax id = the vocabulary's last one
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[998, 5, 6, 7, 999, 0, 0], [998, 9, 999, 0, 0, 0, 0]])  # right-padded with 0
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        ref_img = _features(ref.get_image_features(pixel_values=pixels))
        ref_txt = _features(ref.get_text_features(input_ids=ids, attention_mask=mask))
        assert max_diff(ours.encode_image(pixels, normalize=False), ref_img) < TOL
        assert max_diff(ours.encode_text(ids, mask, normalize=False), ref_txt) < TOL
        ref.save_pretrained(tmp_path)
        from_dir = from_hf_clip(tmp_path)
        assert max_diff(from_dir.encode_image(pixels, normalize=False), ref_img) < TOL
        assert max_diff(from_dir.encode_text(ids, mask, normalize=False), ref_txt) < TOL
    assert ours.processor.image.image_size == (32, 32) and ours.processor.tokenizer is None  # not CLIP's vocabulary


def test_hf_clip_mismatch_is_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _hf_clip(999)
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["text_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 32)
    state["text_model.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        from_hf_clip(tmp_path)
    message = str(err.value)
    assert "text_model.extra.weight" in message
    assert "text_model.encoder.layers.0.self_attn.k_proj.weight (64, 32)" in message
    assert "into stacks.text.blocks.0.attn.fn.qkv.weight" in message


def _hf_pil_image_processor(**settings):
    """Hugging Face's CLIP image processor that resizes with PIL, as mmformer's pipeline does (transformers 5's
    default one resizes tensors with torchvision, whose bicubic differs from PIL's by up to ~0.25 here)."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: CLIPImageProcessor itself resizes with PIL
        from transformers import CLIPImageProcessor as cls
    return cls(**settings)


@pytest.mark.parametrize(
    "settings",
    [
        dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=2),
        dict(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
    ],
)
def test_image_processor_resizes_then_crops_as_hugging_face(settings):
    """size.shortest_edge != crop_size: resize the short side to shortest_edge, then center-crop, the crop's offset
    rounded down (a margin of 39 columns: torchvision's CenterCrop would start one column later)."""
    from PIL import Image

    from mmformer.convert.hf_clip import image_settings
    from mmformer.preprocess.processor import ImageProcessorConfig, Processor

    reference = _hf_pil_image_processor(**settings)
    processor = Processor(image=ImageProcessorConfig(**image_settings(reference.to_dict())))
    rng = np.random.default_rng(0)
    for h, w in [(53, 97), (120, 45), (40, 79), (99, 99), (20, 20)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        expected = reference(images=[image], return_tensors="pt").pixel_values
        assert (processor(images=[image])["pixel_values"] - expected).abs().max() < 1e-5, (h, w)
    again = Processor.from_dict(processor.to_dict())
    assert (again.image.resize_size, again.image.crop_offset) == (processor.image.resize_size, "floor")
    saved_before = {k: v for k, v in processor.to_dict()["image"].items() if k not in ("resize_size", "crop_offset")}
    assert Processor.from_dict({"image": saved_before}).image.resize_size is None  # older saved configs still load


def test_hf_clip_reads_the_image_processor_transformers_5_saves(tmp_path):
    """transformers 5 saves a CLIPProcessor's image settings in processor_config.json ("image_processor"), with no
    preprocessor_config.json; the converted processor follows them (not OpenAI's defaults), and a folder with
    neither file warns, naming it."""
    import json
    import re

    from PIL import Image
    from transformers import CLIPProcessor, CLIPTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    settings = dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=2)
    reference = _hf_pil_image_processor(image_mean=[0.5] * 3, image_std=[0.5] * 3, **settings)
    folder = tmp_path / "clip"
    _hf_clip(999).save_pretrained(folder)
    CLIPProcessor(image_processor=reference, tokenizer=tokenizer).save_pretrained(folder)
    if (folder / "preprocessor_config.json").exists():
        pytest.skip("transformers < 5 saves preprocessor_config.json")
    processor = from_hf_clip(folder).processor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(53, 97), (40, 40)]]
    expected = reference(images=images, return_tensors="pt").pixel_values
    assert max_diff(processor(images=images)["pixel_values"], expected) < 1e-5
    (folder / "processor_config.json").unlink()
    with pytest.warns(UserWarning, match=re.escape(f"{folder}: no image processor settings")):
        assert from_hf_clip(folder).processor.image.std == open_clip.OPENAI_DATASET_STD


def test_hf_clip_tokenizer_cleans_text_as_hugging_face():
    """A Hugging Face CLIP checkpoint's tokenizer cleans text as its CLIPTokenizer (no HTML unescaping), not as
    open_clip (``&amp;`` stays five characters)."""
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, **small)
    vision = dict(image_size=16, patch_size=8, **small)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    tokenizer = from_hf_clip(transformers.CLIPModel(config)).processor.tokenizer
    assert tokenizer.encode("fish &amp; chips") != tokenizer.encode("fish & chips")
    assert tokenizer.encode("A  Photo") == tokenizer.encode("a photo")
