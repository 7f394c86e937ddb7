"""Config validation names the offending field and value; ModelConfig round-trips through JSON and YAML."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mmformer import MultimodalTransformer
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(width=16, n_heads=3), r"StackConfig.n_heads \(3\) must divide StackConfig.width \(16\)"),
        (dict(n_heads=4, n_kv_heads=3), r"StackConfig.n_kv_heads \(3\) must divide StackConfig.n_heads \(4\)"),
        (dict(width=16, n_heads=4, n_kv_heads=0), r"StackConfig.n_kv_heads must be > 0, got 0"),
        (dict(width=12, n_heads=4, position="rope"), r"RoPE needs an even head size; StackConfig.width / n_heads = 3"),
        (dict(parallel=True, norm_placement="post"), r"StackConfig.parallel=True needs norm_placement='pre'"),
        (dict(parallel=True, cross_attention=True), r"StackConfig.parallel=True needs .*cross_attention=False"),
        (
            dict(mlp="tanh"),
            r"StackConfig.mlp must be one of \['gelu', 'gelu_tanh', 'quickgelu', 'relu', .*\], got 'tanh'",
        ),
        (dict(position="rope", rope_scaling={"rope_type": "yarn"}), r"StackConfig.rope_scaling must be None or a dict"),
        (dict(position="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"needs numbers for \['low_f"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_scaling needs position='rope'"),
        (dict(position="t5", relative_buckets=2), r"StackConfig.relative_buckets must be >= 4, got 2"),
        (dict(norm="batchnorm"), r"StackConfig.norm must be one of .*got 'batchnorm'"),
        (dict(norm_placement="middle"), r"StackConfig.norm_placement must be one of .*got 'middle'"),
        (
            dict(position="learned"),
            r"StackConfig.position must be one of \['none', 'rope', 'alibi', 't5'\], got 'learned'",
        ),
        (dict(n_experts=4, experts_top_k=5), r"StackConfig.experts_top_k must be in \[1, n_experts=4\], got 5"),
        (dict(n_experts=4, experts_top_k=0), r"StackConfig.experts_top_k must be in \[1, n_experts=4\], got 0"),
        (dict(dropout=1.0), r"StackConfig.dropout must be in \[0, 1\), got 1.0"),
        (dict(drop_path=-0.1), r"StackConfig.drop_path must be in \[0, 1\), got -0.1"),
        (dict(width=0), r"StackConfig.width must be > 0, got 0"),
        (dict(mlp_ratio=0.0), r"StackConfig.mlp_ratio must be > 0, got 0.0"),
        (dict(multiway=["video"]), r"StackConfig.multiway entries must be one of \['image', 'audio', 'text'\]"),
    ],
)
def test_stack_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StackConfig(**kwargs)


def test_stack_config_derives_heads_and_widths():
    cfg = StackConfig(width=48, n_heads=6, n_kv_heads=None, mlp_ratio=2.5)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == (6, 8, 120)
    assert StackConfig(width=48, n_heads=6, n_kv_heads=1).n_kv_heads == 1  # MQA
    assert StackConfig(width=48, n_heads=6, mlp_hidden=7).hidden_dim == 7


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (
            ImageConfig,
            dict(image_size=[30, 32], patch_size=8),
            r"ImageConfig.patch_size \(8\) must divide the image height \(30\)",
        ),
        (ImageConfig, dict(image_size=32, patch_size=6), r"ImageConfig.patch_size \(6\) must divide the image height"),
        (ImageConfig, dict(image_size=[32, 33], patch_size=8), r"must divide the image width \(33\)"),
        (ImageConfig, dict(image_size=[32]), r"ImageConfig.image_size must be \(H, W\) > 0, got \[32\]"),
        (ImageConfig, dict(pool="cls", class_token=False), r"ImageConfig.pool='cls' needs class_token=True"),
        (ImageConfig, dict(position="sinusoidal"), r"ImageConfig.position must be one of \['learned', 'none'\]"),
        (AudioConfig, dict(hop_length=0), r"AudioConfig.hop_length must be > 0, got 0"),
        (AudioConfig, dict(position="rope"), r"AudioConfig.position must be one of"),
        (TextConfig, dict(vocab_size=10, eos_id=10), r"TextConfig.eos_id must be in \[0, vocab_size=10\), got 10"),
        (
            TextConfig,
            dict(pool="min"),
            r"TextConfig.pool must be one of \['eot', 'mean', 'cls', 'max', 'last', 'append_cls'\], got 'min'",
        ),
        (TextConfig, dict(max_length=0), r"TextConfig.max_length must be > 0, got 0"),
    ],
)
def test_modality_config_errors_name_the_field(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_image_size_int_means_square():
    cfg = ImageConfig(image_size=32, patch_size=8)
    assert cfg.image_size == [32, 32] and cfg.grid == (4, 4) and cfg.n_tokens == 17


def _stacks(**kwargs) -> dict[str, StackConfig]:
    return {"a": StackConfig(width=16, n_heads=2, cross_attention=True), **kwargs}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(routes={"image": "nope"}), r"ModelConfig.routes\['image'\] = 'nope' is not one of stacks \['a'\]"),
        (dict(routes={"video": "a"}), r"ModelConfig.routes keys must be one of .*got 'video'"),
        (dict(stacks={}, routes={}), r"ModelConfig.stacks must name at least one stack"),
        (dict(routes={"image": "a"}, image=None), r"ModelConfig.routes has 'image' but ModelConfig.image is None"),
        (dict(routes={"image": "a"}, mlm_head=True), r"ModelConfig.mlm_head=True needs a text route"),
        (dict(routes={"decoder": "a"}, text=TextConfig(eos_id=None)), r"a decoder needs TextConfig.bos_id"),
        (
            dict(stacks=_stacks(b=StackConfig(width=32)), routes={"image": "a", "text": "b"}, embed_dim=None),
            r"ModelConfig.embed_dim=None needs equal stack widths per modality",
        ),
        (
            dict(stacks=_stacks(b=StackConfig(width=32, cross_attention=True)), routes={"text": "a", "decoder": "b"}),
            r"the text and decoder routes share the token embedding, so their widths must match",
        ),
        (dict(routes={"text": "a"}, ctc_head=True), r"ModelConfig.ctc_head=True needs an audio route"),
        (  # cross-attention has no memory projection: the wider image tokens failed in the first decoding step
            dict(stacks=_stacks(b=StackConfig(width=24, n_heads=2)), routes={"image": "b", "decoder": "a"}),
            r"ModelConfig.stacks\['a'\].width \(16\), the decoder's, must equal the width of the image and audio token "
            r"states its cross-attention reads .*got \{'image': 24\}",
        ),
        (
            dict(
                stacks=_stacks(b=StackConfig(width=8, n_heads=2)), routes={"image": "a", "audio": "b", "decoder": "a"}
            ),
            r"ModelConfig.stacks\['a'\].width \(16\), the decoder's, .*got \{'image': 16, 'audio': 8\}",
        ),
        (  # the odd width failed when the model was built (layers/positions.py)
            dict(stacks=_stacks(b=StackConfig(width=33, n_heads=1)), routes={"audio": "b"}),
            r"AudioConfig.position='sinusoidal' needs an even width >= 4 for the audio route's tokens, got "
            r"ModelConfig.stacks\['b'\].width=33",
        ),
        (  # no text route: the text embedding is the decoder's; width 2 has one timescale (a division by zero)
            dict(
                stacks={"b": StackConfig(width=2, n_heads=1)},
                routes={"decoder": "b"},
                text=TextConfig(position="sinusoidal"),
            ),
            r"TextConfig.position='sinusoidal' needs an even width >= 4 for the decoder route's tokens, got "
            r"ModelConfig.stacks\['b'\].width=2",
        ),
        (  # without embed_dim the model built no projection at all: the requested one was dropped silently
            dict(routes={"text": "a", "audio": "a"}, embed_dim=None, projections={"audio": "mlp"}),
            r"ModelConfig.projections\['audio'\]='mlp' needs embed_dim .*got embed_dim=None",
        ),
        (
            dict(routes={"text": "a"}, embed_dim=None, projections={"text": "linear"}),
            r"ModelConfig.projections\['text'\]='linear' needs embed_dim",
        ),
        (  # a decoder of depth 0 has no cross-attention: it ignored its memory
            dict(
                stacks=_stacks(b=StackConfig(width=16, n_heads=2, depth=0, cross_attention=True)),
                routes={"image": "a", "decoder": "b"},
            ),
            r"ModelConfig.stacks\['b'\].depth must be > 0 for routes \['decoder'\], got 0",
        ),
        (
            dict(stacks=_stacks(b=StackConfig(width=16, n_heads=2, depth=0)), routes={"text": "b", "image": "b"}),
            r"ModelConfig.stacks\['b'\].depth must be > 0 for routes \['text', 'image'\], got 0",
        ),
    ],
)
def test_model_config_errors_name_the_field(kwargs, message):
    kwargs = {"stacks": _stacks(), **kwargs}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def _memory_widths_config(**changes) -> ModelConfig:
    """An image tower of width 24 and a width-16 decoder."""
    stacks = {"vision": StackConfig(width=24, depth=1, n_heads=2), "dec": StackConfig(width=16, depth=1, n_heads=2)}
    return ModelConfig(
        stacks={**stacks, **changes.pop("stacks", {})},
        routes={"image": "vision", "decoder": "dec"},
        image=ImageConfig(image_size=16, patch_size=8, channels=1, **changes.pop("image", {})),
        audio=None,
        text=TextConfig(vocab_size=32, max_length=8),
        embed_dim=8,
        **changes,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},  # a decoder-only language model next to an image tower: it reads no memory
        {  # CoCa: the attentional pooler's queries, at the decoder's width, are what the decoder reads
            "stacks": {"dec": StackConfig(width=16, depth=1, n_heads=2, cross_attention=True)},
            "image": {"resampler_queries": 3, "resampler_width": 16},
        },
    ],
)
def test_a_decoder_of_another_width_than_the_image_stack_builds_when_it_can_read_the_memory(changes):
    """The memory width check refuses only what fails: these configs build and decode (from the image tokens when
    the decoder has cross-attention)."""
    torch.manual_seed(0)
    model = MultimodalTransformer(_memory_widths_config(**changes)).eval()
    memory, memory_mask = model.encode_image_tokens(torch.randn(2, 1, 16, 16))
    if not model.config.stacks["dec"].cross_attention:
        memory = memory_mask = None
    assert model.decode(torch.ones(2, 3, dtype=torch.long), memory, memory_mask).shape == (2, 3, 32)


def test_a_depth_0_stack_no_route_uses_is_accepted():
    ModelConfig(stacks={"a": StackConfig(width=16, n_heads=2), "spare": StackConfig(depth=0)}, routes={"text": "a"})


def test_from_pretrained_refuses_a_config_json_whose_decoder_cannot_read_its_memory(tmp_path):
    """A config.json whose image tower is wider than its cross-attention decoder: refused when read, naming the
    file and the widths, rather than when the first caption is decoded."""
    MultimodalTransformer(_memory_widths_config()).save_pretrained(tmp_path)  # its decoder reads no memory
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["stacks"]["dec"]["cross_attention"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config.json: not a valid mmformer ModelConfig: .*got \{'image': 24\}"):
        MultimodalTransformer.from_pretrained(tmp_path)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"ModelConfig: unknown keys \['widht'\]"):
        ModelConfig.from_dict({"widht": 3})


def test_nested_dicts_become_configs():
    cfg = ModelConfig(stacks={"shared": {"width": 32, "n_heads": 2, "cross_attention": True}}, image={"image_size": 64})
    assert isinstance(cfg.stacks["shared"], StackConfig) and cfg.stacks["shared"].n_kv_heads == 2
    assert isinstance(cfg.image, ImageConfig) and cfg.image.image_size == [64, 64]
    with pytest.raises(ValueError, match=r"StackConfig.n_heads \(3\) must divide StackConfig.width \(32\)"):
        ModelConfig(stacks={"shared": {"width": 32, "n_heads": 3}})


# ---------------------------------------------------------------- round trips
def _configs() -> dict[str, ModelConfig]:
    return {
        "default": ModelConfig(),
        "clip_like": ModelConfig(
            stacks={
                "vision": StackConfig(width=32, depth=2, n_heads=4, mlp="quickgelu"),
                "text": StackConfig(width=24, depth=1, n_heads=2, final_norm=True),
            },
            routes={"image": "vision", "text": "text"},
            image=ImageConfig(image_size=[32, 48], patch_size=8, patch_bias=False, pre_norm=True),
            audio=None,
            text=TextConfig(vocab_size=100, max_length=10, causal=True, bos_id=None),
            embed_dim=16,
            logit_bias_init=-10.0,
        ),
        "everything": ModelConfig(
            stacks={
                "enc": StackConfig(
                    width=32,
                    n_heads=4,
                    n_kv_heads=2,
                    mlp="swiglu",
                    n_experts=4,
                    experts_top_k=1,
                    norm="rmsnorm",
                    norm_placement="sandwich",
                    qk_norm=True,
                    position="rope",
                    rope_theta=500.0,
                    multiway=["image", "audio"],
                    drop_path=0.1,
                ),
                "dec": StackConfig(width=32, n_heads=4, cross_attention=True, position="alibi", bias=False),
            },
            routes={"image": "enc", "audio": "enc", "text": "enc", "decoder": "dec"},
            audio=AudioConfig(n_mels=40, position="learned"),
            text=TextConfig(n_segments=2, embed_norm=True, pool="mean"),
            embed_dim=None,
            projection_bias=True,
            tie_lm_head=False,
            ctc_head=True,
        ),
    }


@pytest.mark.parametrize("name", ["default", "clip_like", "everything"])
def test_model_config_round_trips_through_json(name):
    cfg = _configs()[name]
    text = cfg.to_json()
    assert json.loads(text) == cfg.to_dict()
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert isinstance(back.stacks[next(iter(back.stacks))], StackConfig)
    assert back.to_json() == text


@pytest.mark.parametrize("name", ["default", "clip_like", "everything"])
def test_model_config_round_trips_through_yaml(name):
    cfg = _configs()[name]
    text = yaml.safe_dump(cfg.to_dict())
    back = ModelConfig.from_dict(yaml.safe_load(text))
    assert back == cfg
    assert yaml.safe_dump(back.to_dict()) == text


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("stacks", "shared", "cross_attention"), "false"),
        (("tie_lm_head",), 1),
        (("text", "causal"), "no"),
        (("image", "class_token"), None),
    ],
)
def test_a_flag_that_is_not_a_bool_is_refused_not_read_as_truthy(where, value):
    """A config.json saying ``"cross_attention": "false"`` built a model with cross-attention (a non-empty string
    is true); every bool field takes true or false only."""
    d = ModelConfig().to_dict()
    ModelConfig.from_dict(d)  # the untouched dict builds
    target = d
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(TypeError, match=rf"\.{where[-1]} must be true or false, got {value!r}"):
        ModelConfig.from_dict(d)


def test_an_image_stack_of_width_4_builds():
    """The learned patch positions start as 2-D sin-cos halves; at width 4 each half (2) was too narrow for the
    sinusoids and building the model divided by zero."""
    from mmformer.embedders.image import initial_patch_positions

    cfg = ImageConfig(image_size=16, patch_size=8)
    table = initial_patch_positions(cfg, 4)
    assert table.shape == (cfg.n_tokens, 4) and bool(torch.isfinite(table).all())
    assert initial_patch_positions(cfg, 8).shape == (cfg.n_tokens, 8)
