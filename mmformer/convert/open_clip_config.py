"""An open_clip / OpenAI CLIP model's :class:`~mmformer.ModelConfig` where no module tells it: from a bare state
dict's tensor shapes (as open_clip's ``build_model_from_openai_state_dict`` infers them) and what shapes cannot tell
(head width, activation, pooling) from open_clip's config — named (``model_name="ViT-H-14"``), given, or beside the
file (``open_clip_config.json``) — or, without one, OpenAI's defaults with a warning; a config that does not fit the
weights' shapes is refused. The text and model configs both paths build (:mod:`mmformer.convert.open_clip` reads a
module's settings) are made here too.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.convert.common import UnsupportedModelError
from mmformer.io.hub import OPEN_CLIP_CONFIG, read_json

CLIP_VOCAB_SIZE = 49408  # OpenAI CLIP's BPE vocabulary; the last id is <end_of_text>, the one before <start_of_text>


def folder_config(path: Path) -> dict[str, Any]:
    """A folder's ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``: what ``open_clip.create_model``
    reads from ``local-dir:`` and ``hf-hub:``); {} for a file, or a folder without one."""
    saved = read_json(path / OPEN_CLIP_CONFIG) if path.is_dir() else None
    if saved is None:
        return {}
    parts = ("model_cfg", "preprocess_cfg")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k, {}), dict) for k in parts):
        raise ValueError(
            f"{path / OPEN_CLIP_CONFIG}: expected a JSON object whose 'model_cfg' and 'preprocess_cfg' are objects, "
            f"got {str(saved)[:200]}"
        )
    return saved


def named_config(model_name: str) -> dict[str, Any]:
    """open_clip's model config of the architecture ``model_name``, found as ``open_clip.create_model`` finds it
    (``open_clip.get_model_config`` of the name with ``/`` as ``-``; a ``-quickgelu`` name has its own config, with
    ``quick_gelu``); nothing is downloaded. An unknown name is a ValueError listing the closest known ones."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name: expected an open_clip architecture name (str), got {type(model_name).__name__}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model_name: expected an open_clip architecture name (open_clip.list_models()), got {model_name!r}; a "
            "Hub repository or folder carries its own open_clip_config.json: convert it, not a weights file "
            "(mmformer.from_pretrained('open_clip:hf-hub:ORG/REPO') or the folder's path)"
        )
    import open_clip

    name = model_name.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = open_clip.list_models()
        by_lower = {k.lower(): k for k in known}
        close = [by_lower[k] for k in difflib.get_close_matches(name.lower(), by_lower, n=6, cutoff=0.6)]
        hint = f"; the closest: {', '.join(close)}" if close else ""
        base = name.removesuffix("-quickgelu")
        if base != name and open_clip.get_model_config(base) is not None:
            hint += (
                f"; for QuickGELU weights of {base!r}, which has no -quickgelu config: model_name={base!r}, "
                "quick_gelu=True"
            )
        raise ValueError(
            f"model_name: open_clip has no architecture {model_name!r} (open_clip.list_models() names all "
            f"{len(known)}){hint}"
        )
    return cfg


def warn_of_openai_defaults(quick_gelu: bool | None) -> None:
    """A state dict converting without any open_clip config: say which of OpenAI's conventions were assumed, since
    most open_clip weights differ (a wrong head count, or an activation ~1e-3 off), and how to name the model."""
    assumed = "64-wide attention heads" + (" and QuickGELU" if quick_gelu is None else "")
    warnings.warn(
        f"open_clip: a state dict without an open_clip config (no model_name or model_cfg given, no "
        f"{OPEN_CLIP_CONFIG} beside it) converts with OpenAI CLIP's defaults: {assumed}, which fit OpenAI's weights "
        "but not most open_clip ones (ViT-H-14, ViT-bigG-14: 80-wide heads and GELU; ViT-B-16, ViT-L-14, ...: GELU); "
        "name the architecture as open_clip.create_model takes it: mmformer convert FILE --from open_clip "
        "--model-name ViT-H-14, or from_open_clip(path, model_name='ViT-H-14') (OpenAI's weights: ViT-B-32-quickgelu, "
        "...; open_clip.list_models() names them all)",
        UserWarning,
        stacklevel=3,
    )


_UNSUPPORTED_KEYS = (
    ("visual.trunk.", "timm image towers (visual.trunk.*)"),
    ("visual.layer1.", "ResNet image towers (visual.layer1.*)"),
    ("visual.attn_pool", "attentional pooling (visual.attn_pool*)"),
    ("text.", "custom text towers (text.*: CustomTextCLIP, CoCa, Hugging Face text encoders)"),
)
_UNSUPPORTED_OPTIONS = {  # open_clip config options (truthy = in use) → feature named in the error
    "timm_model_name": "timm image towers",
    "hf_model_name": "Hugging Face text towers",
    "attentional_pool": "attentional pooling",
    "ls_init_value": "layer scale",
    "embed_cls": "a text class token (embed_cls)",
    "proj_bias": "a text projection with bias",
    "qk_norm": "qk-norm attention",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scaling",
    "scale_attn_inner": "attention inner LayerNorm",
    "scale_attn": "attention output LayerNorm",
    "scale_fc": "MLP LayerNorm",
    "act_kwargs": "activation arguments (act_kwargs)",
}


def config_from_state_dict(
    sd: dict[str, torch.Tensor], cfg: dict, quick_gelu: bool | None, given: str = "model_cfg: the config"
) -> ModelConfig:
    """The config of an OpenAI-layout state dict: shapes from its tensors, the rest from open_clip's ``cfg`` (``given``
    names where that came from, in the error when its shapes do not fit the weights)."""
    for prefix, feature in _UNSUPPORTED_KEYS:
        if any(k.startswith(prefix) for k in sd):
            raise UnsupportedModelError(f"open_clip: {feature} are not supported")
    if any(".ls_1." in k or ".ls_2." in k for k in sd):
        raise UnsupportedModelError("open_clip: layer scale (ls_1 / ls_2 gamma) is not supported")
    vcfg, tcfg = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    if cfg.get("custom_text"):
        raise UnsupportedModelError("open_clip: custom text towers (model_cfg custom_text=True) are not supported")
    for where, sub in (("vision_cfg", vcfg), ("text_cfg", tcfg)):
        for key, feature in _UNSUPPORTED_OPTIONS.items():
            if sub.get(key):
                raise UnsupportedModelError(f"open_clip: {feature} ({where}.{key}={sub[key]!r}) is not supported")
        if sub.get("block_type") not in (None, "default"):
            raise UnsupportedModelError(f"open_clip: custom attention blocks ({where}.block_type) are not supported")
    if isinstance(vcfg.get("layers"), (list, tuple)):
        raise UnsupportedModelError("open_clip: ResNet image towers (vision_cfg.layers is a tuple) are not supported")
    if vcfg.get("pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"open_clip: image pooling vision_cfg.pool_type={vcfg['pool_type']!r} (only 'tok')")
    if tcfg.get("proj_type", "linear") == "none":
        raise UnsupportedModelError("open_clip: a text tower without projection (text_cfg.proj_type='none')")
    if quick_gelu is None:
        quick_gelu = bool(cfg.get("quick_gelu", False)) if cfg else True
    act = "quickgelu" if quick_gelu else "gelu"

    shapes = _config_shapes(sd)
    _check_fits(shapes, cfg, vcfg, tcfg, given)
    conv = sd["visual.conv1.weight"]  # (D, C, p, p)
    patch, n_pos = shapes["vision_cfg.patch_size"][0], shapes["vision_cfg.image_size"]
    if "image_size" in vcfg:
        image_size = list(_pair(vcfg["image_size"]))
    else:
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise ValueError(
                f"model_or_state_dict: visual.positional_embedding has {n_pos} patch positions, not a square grid; "
                "pass model_cfg={'vision_cfg': {'image_size': [H, W]}, ...}"
            )
        image_size = [grid * patch, grid * patch]
    vision = _stack_from_shapes(sd, "visual.transformer", vcfg, act, shapes, what="vision_cfg")
    text = _stack_from_shapes(sd, "transformer", tcfg, act, shapes, what="text_cfg")
    image = ImageConfig(
        image_size=image_size,
        patch_size=patch,
        channels=conv.shape[1],
        patch_bias="visual.conv1.bias" in sd,
        pre_norm="visual.ln_pre.weight" in sd,
    )
    if "text_projection.bias" in sd:
        raise UnsupportedModelError("open_clip: a text projection with bias (text_projection.bias)")
    text_cfg = text_config(
        vocab_size=shapes["text_cfg.vocab_size"],
        context=shapes["text_cfg.context_length"],
        causal=not tcfg.get("no_causal_mask", False),
        pool_type=tcfg.get("pool_type", "argmax"),
        eos_id=tcfg.get("eos_id", 2),
    )
    logit_bias = float(sd["logit_bias"].reshape(-1)[0]) if "logit_bias" in sd else None
    logit_scale = float(_need(sd, "logit_scale").reshape(-1)[0])
    return model_config(vision, text, image, text_cfg, shapes["embed_dim"], logit_scale, logit_bias)


def _config_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights fix of open_clip's config, by its keys (``vision_cfg.image_size``: the number of patch
    positions)."""
    patch = _need(sd, "visual.conv1.weight").shape[-1]  # (D, C, p, p)
    shapes: dict[str, Any] = {
        "vision_cfg.patch_size": (patch, patch),
        "vision_cfg.image_size": _need(sd, "visual.positional_embedding").shape[0] - 1,  # less the class token
    }
    for what, prefix in (("vision_cfg", "visual.transformer"), ("text_cfg", "transformer")):
        marker = f"{prefix}.resblocks."
        shapes[f"{what}.layers"] = len({k[len(marker) :].split(".")[0] for k in sd if k.startswith(marker)})
        if shapes[f"{what}.layers"] == 0:
            raise ValueError(f"model_or_state_dict: expected blocks under {marker}*, found none")
        shapes[f"{what}.width"] = _need(sd, f"{marker}0.ln_1.weight").shape[0]
    if "text_projection" in sd:
        shapes["embed_dim"] = sd["text_projection"].shape[1]  # (D, E)
    else:
        shapes["embed_dim"] = _need(sd, "text_projection.weight").shape[0]  # nn.Linear (E, D)
    shapes["text_cfg.vocab_size"] = _need(sd, "token_embedding.weight").shape[0]
    shapes["text_cfg.context_length"] = _need(sd, "positional_embedding").shape[0]
    return shapes


def _check_fits(shapes: dict[str, Any], cfg: dict, vcfg: dict, tcfg: dict, given: str) -> None:
    """The shapes an open_clip config names (those it gives) are the weights' (:func:`_config_shapes`): a config
    of another architecture (a wrong ``model_name``) is refused, not read into wrong head counts."""
    said = {"embed_dim": cfg.get("embed_dim")}
    said.update({f"vision_cfg.{k}": vcfg.get(k) for k in ("width", "layers")})
    said.update({f"text_cfg.{k}": tcfg.get(k) for k in ("width", "layers", "vocab_size", "context_length")})
    said["vision_cfg.patch_size"] = _pair(vcfg.get("patch_size"))
    size, (patch_h, patch_w) = _pair(vcfg.get("image_size")), shapes["vision_cfg.patch_size"]
    said["vision_cfg.image_size"] = None if size is None else (size[0] // patch_h) * (size[1] // patch_w)
    wrong = [f"{key} {value} vs {shapes[key]}" for key, value in said.items() if value not in (None, shapes[key])]
    if wrong:
        raise ValueError(
            f"{given} does not fit the state dict's shapes (config vs weights; image_size as its number of patch "
            f"positions): {', '.join(wrong)}"
        )


def _pair(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """An open_clip size (an int, or a pair) as a pair; None stays None."""
    return None if value is None else (value, value) if isinstance(value, int) else tuple(value)


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"model_or_state_dict: expected an OpenAI-CLIP layout state dict with {key!r}; it has none")
    return sd[key]


def _stack_from_shapes(
    sd: dict[str, torch.Tensor], prefix: str, cfg: dict, act: str, shapes: dict[str, Any], *, what: str
) -> StackConfig:
    """The stack of ``{prefix}.resblocks.N``: its width and depth from :func:`_config_shapes`, heads from ``cfg``."""
    width = shapes[f"{what}.width"]
    if "heads" in cfg:
        heads = cfg["heads"]
    else:
        head_width = cfg.get("head_width", 64)
        if width % head_width:
            fix = "set heads" if cfg else "name the architecture (model_name=, --model-name) or set heads"
            raise ValueError(f"{what}: width {width} is not a multiple of the head width {head_width}; {fix}")
        heads = width // head_width
    return StackConfig(
        width=width,
        depth=shapes[f"{what}.layers"],
        n_heads=heads,
        mlp=act,
        mlp_hidden=_need(sd, f"{prefix}.resblocks.0.mlp.c_fc.weight").shape[0],
        norm_eps=float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
    )


def text_config(
    *,
    vocab_size: int,
    context: int,
    causal: bool,
    pool_type: str,
    eos_id: int | None,
    pad_id: int = 0,
    legacy_cls_mask: bool = False,
) -> TextConfig:
    clip_vocab = vocab_size == CLIP_VOCAB_SIZE
    if pool_type == "cls_emb":  # CoCa: a class token appended after the fixed-length (padded) text
        return TextConfig(
            vocab_size=vocab_size,
            max_length=context,
            position="learned",
            pad_id=pad_id,
            bos_id=vocab_size - 2 if clip_vocab else None,
            eos_id=vocab_size - 1 if clip_vocab else eos_id,
            causal=causal,
            pool="append_cls",
            fixed_length=True,
            legacy_cls_mask=legacy_cls_mask,
        )
    if pool_type == "argmax":
        pool, eos = "eot", vocab_size - 1  # argmax of ids = the end-of-text token, CLIP's highest id
    elif pool_type == "eos":
        pool, eos = "eot", eos_id
    elif pool_type == "first":
        pool, eos = "cls", vocab_size - 1 if vocab_size == CLIP_VOCAB_SIZE else None
    elif pool_type == "last":
        pool, eos = "eot", None  # no eos id: the last real token (the last position without a mask)
    else:
        raise UnsupportedModelError(f"open_clip: text pooling pool_type={pool_type!r} is not supported")
    return TextConfig(
        vocab_size=vocab_size,
        max_length=context,
        position="learned",
        pad_id=0,
        bos_id=vocab_size - 2 if vocab_size == CLIP_VOCAB_SIZE else None,
        eos_id=eos,
        causal=causal,
        pool=pool,
    )


def model_config(
    vision: StackConfig,
    text: StackConfig,
    image: ImageConfig,
    text_cfg: TextConfig,
    embed_dim: int,
    logit_scale: float,
    logit_bias: float | None,
) -> ModelConfig:
    return ModelConfig(
        stacks={"vision": vision, "text": text},
        routes={"image": "vision", "text": "text"},
        image=image,
        audio=None,
        text=text_cfg,
        embed_dim=embed_dim,
        projection_bias=False,
        logit_scale_init=logit_scale,
        logit_bias_init=logit_bias,
    )
