"""timm ``VisionTransformer`` → an image-only :class:`~mmformer.MultimodalTransformer` (route ``image → vision``).

The classifier maps onto the image projection, so ``encode_image(x, normalize=False)`` equals timm's ``model(x)``
logits; a head-less model (``num_classes=0``) has no projection and ``encode_image(x, normalize=False)`` equals
``forward_head(forward_features(x), pre_logits=True)``.

Supported: class-token pooling after the final norm (timm's default ViT, DeiT, AugReg, CLIP-style ``pre_norm``),
average pooling (of the patch tokens, or of every token with ``pool_include_prefix``) with or without ``fc_norm``,
the attention-pooling head (``global_pool='map'``: SigLIP-style timm models), register tokens (``reg_tokens``:
DINOv2 with registers), layer scale (``init_values``: DINOv2, DeiT-3), learned or no position embeddings,
``no_embed_class`` (the class token and registers get zero positions), qk-norm, GELU / tanh-GELU / QuickGELU,
``qkv_bias=False`` (a zero bias), LayerNorms sharing one epsilon. The position table is resampled bicubically (with
antialiasing, as timm's ``resample_abs_pos_embed``) for other image sizes, as ``dynamic_img_size=True`` does.
Refused with :class:`~mmformer.convert.common.UnsupportedModelError` naming the feature: distillation tokens, max /
``prr`` pooling or none, an attention-pooling head with several latents or its own positions, other block /
attention / MLP classes (post-norm, parallel, SwiGLU), a patch-embedding norm.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmformer.config import ImageConfig, ModelConfig, StackConfig
from mmformer.convert.common import (
    UnsupportedModelError,
    WeightMap,
    activation_kind,
    build_processor,
    common_eps,
    is_path,
    load_exact,
    load_state_dict,
)
from mmformer.io.weights import build_on_meta
from mmformer.model import MultimodalTransformer

__all__ = ["from_timm_vit"]


def from_timm_vit(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    model_name: str | None = None,
    **overrides: Any,
) -> MultimodalTransformer:
    """Convert a timm ``VisionTransformer``, or a state dict (dict or file) of the timm model ``model_name``.

    Args:
        model_or_state_dict: a timm ``VisionTransformer`` module, its state dict, or a path to one (safetensors or
            a ``torch.save`` file, read with ``weights_only=True``).
        model_name: for a state dict: the timm architecture (e.g. ``"vit_small_patch16_224"``); the model is built
            with ``timm.create_model(model_name, pretrained=False, **overrides)`` (nothing is downloaded), with
            ``num_classes`` taken from ``head.weight`` unless given, and the state dict must fit it exactly. None
            for a file or folder beside timm's ``config.json`` (its ``architecture``, as timm saves a model with
            ``save_for_hf`` / ``push_to_hub``): the model is built from that config by timm
            (``local-dir:FOLDER``: its ``model_args`` and ``pretrained_cfg`` too).
        **overrides: ``timm.create_model`` keyword arguments for a state dict (``img_size``, ``depth``, ...).

    Returns:
        The converted model in eval mode with ``model.processor`` set: no tokenizer, and the image pipeline of
        timm's ``create_transform(**resolve_data_config({}, model=vit))`` at the model's image size: mean/std,
        interpolation, the shortest edge resized to ``floor(size / crop_pct)`` then a center crop (``crop_mode``
        'center'; 'squash' with ``crop_pct=1`` is an exact resize; other crop modes, and ``crop_pct`` on
        non-square images, warn and fall back to a shortest-edge resize + center crop without the border). A
        1-channel model (``in_chans=1``), for which timm still resolves RGB statistics, normalises with the average
        of its mean and of its std, with a warning.
    """
    if isinstance(model_or_state_dict, nn.Module):
        if model_name is not None or overrides:
            raise ValueError("model_name / overrides: only used with a state dict; a timm module carries its own")
        vit = model_or_state_dict
    elif isinstance(model_or_state_dict, Mapping) or is_path(model_or_state_dict):
        if is_path(model_or_state_dict):
            state = load_state_dict(model_or_state_dict)
            model_name = model_name or _architecture_beside(model_or_state_dict)
        else:
            state = dict(model_or_state_dict)
        vit = _build_timm(state, model_name, overrides)
    else:
        raise TypeError(
            "model_or_state_dict: expected a timm VisionTransformer, a state dict or a path, "
            f"got {type(model_or_state_dict).__name__}"
        )
    config = _model_config(vit)
    model = build_on_meta(MultimodalTransformer, config)
    _weight_map(vit, config).load_into(model)
    model.eval()
    model.processor = _processor(vit, config)
    return model


def _architecture_beside(path: str | os.PathLike) -> str | None:
    """timm's name for the model of a weights file or folder that has timm's ``config.json`` (with an
    ``architecture``: :func:`mmformer.io.hub.folder_kind`'s rule) beside it: ``local-dir:FOLDER``, which
    ``timm.create_model`` builds from that config; None without one."""
    from mmformer.io import hub

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if hub.folder_kind(folder, hub.read_json(folder / "config.json")) != "timm":
        return None
    return f"local-dir:{folder}"


def _build_timm(state: dict[str, torch.Tensor], model_name: str | None, overrides: dict[str, Any]) -> nn.Module:
    if not isinstance(model_name, str):
        raise ValueError(
            "model_name: a state dict needs the timm architecture name (e.g. 'vit_small_patch16_224'), or timm's "
            f"config.json (with its 'architecture') beside the weights file; got {model_name!r}"
        )
    import timm

    kwargs = dict(overrides)
    kwargs.setdefault("num_classes", state["head.weight"].shape[0] if "head.weight" in state else 0)
    vit = timm.create_model(model_name, pretrained=False, **kwargs)
    return load_exact(vit, state, name=f"timm {model_name}").eval()


def _unsupported(feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"timm_vit: {feature} is not supported")


def _model_config(vit: nn.Module) -> ModelConfig:
    kind = type(vit).__name__
    if kind != "VisionTransformer" or not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
        if type(vit).__module__.startswith("timm."):  # another timm architecture (Eva, ConvNeXt, ...): a model
            raise _unsupported(f"the timm architecture {kind} (only VisionTransformer converts)")
        raise TypeError(f"model_or_state_dict: expected a timm VisionTransformer, got {kind}")
    if getattr(vit, "dist_token", None) is not None:
        raise _unsupported("a distillation token")
    class_token = vit.cls_token is not None
    n_registers = getattr(vit, "num_reg_tokens", 0)
    include_prefix = getattr(vit, "pool_include_prefix", False)
    pool = {"token": "cls", "avg": "mean" if include_prefix else "mean_patches", "map": "map"}.get(vit.global_pool)
    if pool is None:
        raise _unsupported(f"global_pool={vit.global_pool!r} (only 'token', 'avg' and 'map')")
    if pool == "map":
        _check_attention_pool(vit.attn_pool, include_prefix)
    norms = [] if isinstance(vit.fc_norm, nn.Identity) else [vit.fc_norm]

    pe = vit.patch_embed
    if type(pe).__name__ != "PatchEmbed" or not isinstance(pe.proj, nn.Conv2d):
        raise _unsupported(f"patch embedding {type(pe).__name__}")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("a norm in the patch embedding (embed_norm_layer)")
    kh, kw = pe.proj.kernel_size
    if kh != kw or tuple(pe.proj.stride) != (kh, kw):
        raise _unsupported(f"patches {pe.proj.kernel_size} with stride {pe.proj.stride} (square, non-overlapping only)")

    blocks = list(vit.blocks)
    if not blocks:
        raise _unsupported("a model without blocks")
    norms += [] if isinstance(vit.norm, nn.Identity) else [vit.norm]
    norms += [] if isinstance(vit.norm_pre, nn.Identity) else [vit.norm_pre]
    if pool == "map":
        norms.append(vit.attn_pool.norm)
    acts, biases, qk_norm, scaled = set(), set(), set(), set()
    for i, b in enumerate(blocks):
        for name, cls in (("", "Block"), (".attn", "Attention"), (".mlp", "Mlp")):
            module = b.get_submodule(name[1:]) if name else b
            if type(module).__name__ != cls:
                raise _unsupported(f"blocks.{i}{name} of type {type(module).__name__} (expected timm's {cls})")
        scaled.add(tuple(type(ls).__name__ for ls in (b.ls1, b.ls2)))
        if not isinstance(b.attn.norm, nn.Identity) or not isinstance(b.mlp.norm, nn.Identity):
            raise _unsupported("norms inside attention or MLP (scale_attn_norm / scale_mlp_norm)")
        if not isinstance(b.mlp.fc1, nn.Linear):
            raise _unsupported("convolutional MLPs")
        acts.add(activation_kind(b.mlp.act, what=f"timm_vit blocks.{i}.mlp.act"))
        biases.add(tuple(m.bias is not None for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)))
        qk = not isinstance(b.attn.q_norm, nn.Identity), not isinstance(b.attn.k_norm, nn.Identity)
        if qk[0] != qk[1]:
            raise _unsupported("a norm on only one of queries and keys")
        qk_norm.add(qk[0])
        norms += [b.norm1, b.norm2] + ([b.attn.q_norm, b.attn.k_norm] if qk[0] else [])
    if len(acts) != 1 or len(biases) != 1 or len(qk_norm) != 1 or len(scaled) != 1:
        raise _unsupported("blocks that differ in activation, biases, qk-norm or layer scale")
    scale_kinds = scaled.pop()
    if scale_kinds not in (("Identity", "Identity"), ("LayerScale", "LayerScale")):
        raise _unsupported(f"layer scale modules {scale_kinds} (timm's LayerScale on both branches, or none)")
    layer_scale = float(getattr(blocks[0].ls1, "init_values", 1e-5)) if scale_kinds[0] == "LayerScale" else None
    bias = biases.pop()
    if bias not in ((True,) * 4, (False, True, True, True), (False,) * 4):
        raise _unsupported(f"this bias pattern (qkv, proj, fc1, fc2) = {bias}")
    eps = common_eps(norms, what="timm_vit") if norms else 1e-6

    head = vit.head
    if isinstance(head, nn.Linear):
        embed_dim, projection_bias = head.out_features, head.bias is not None
    elif isinstance(head, nn.Identity):
        embed_dim, projection_bias = None, False
    else:
        raise _unsupported(f"head {type(head).__name__} (a Linear classifier or none)")
    stack = StackConfig(
        width=vit.embed_dim,
        depth=len(blocks),
        n_heads=blocks[0].attn.num_heads,
        mlp=acts.pop(),
        mlp_hidden=blocks[0].mlp.fc1.out_features,
        norm_eps=eps,
        final_norm=not isinstance(vit.norm, nn.Identity),  # timm: no final norm when fc_norm follows the pooling
        bias=bias[1],
        qk_norm=qk_norm.pop(),
        layer_scale=layer_scale,
    )
    image = ImageConfig(
        image_size=list(pe.img_size) if pe.img_size is not None else [224, 224],
        patch_size=kh,
        channels=pe.proj.in_channels,
        class_token=class_token,
        position="none" if vit.pos_embed is None else "learned",
        patch_bias=pe.proj.bias is not None,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        n_registers=n_registers,
        pool=pool,
        pool_norm=not isinstance(vit.fc_norm, nn.Identity),
    )
    return ModelConfig(
        stacks={"vision": stack},
        routes={"image": "vision"},
        image=image,
        audio=None,
        embed_dim=embed_dim,
        projection_bias=projection_bias,
    )


def _check_attention_pool(pool: nn.Module, include_prefix: bool) -> None:
    if type(pool).__name__ != "AttentionPoolLatent":
        raise _unsupported(f"attention pooling {type(pool).__name__} (only timm's AttentionPoolLatent)")
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token" or include_prefix:
        raise _unsupported(
            f"an attention-pooling head with latent_len={pool.latent_len}, its own positions "
            f"({pool.pos_embed is not None}), pool_type={pool.pool!r} or reading the prefix tokens ({include_prefix})"
        )
    if not isinstance(pool.q_norm, nn.Identity) or pool.mlp is None or not isinstance(pool.q, nn.Linear):
        raise _unsupported("an attention-pooling head with qk-norm, without its MLP or without a query projection")


def _weight_map(vit: nn.Module, config: ModelConfig) -> WeightMap:
    wm = WeightMap(vit.state_dict(), name="timm_vit")
    wm.copy_module("image_embed.patch", "patch_embed.proj", ["weight"] + (["bias"] if config.image.patch_bias else []))
    if config.image.class_token:
        wm.copy("image_embed.cls_token", "cls_token", lambda t: t.reshape(-1))  # (1, 1, D) → (D,)
    if config.image.n_registers:
        wm.copy("image_embed.registers", "reg_token", lambda t: t.reshape(-1, t.shape[-1]))  # (1, R, D) → (R, D)
    if config.image.position == "learned":
        pos = wm.get("pos_embed")[0]  # (N, D)
        if getattr(vit, "no_embed_class", False) and config.image.n_prefix:
            # the class token and registers get no position in timm: zero rows in our table
            pos = torch.cat([pos.new_zeros(config.image.n_prefix, pos.shape[-1]), pos])
        wm.set("image_embed.positions", pos)
    if config.image.pre_norm:
        wm.copy_module("image_embed.norm", "norm_pre")
    stack = config.stacks["vision"]
    for i in range(stack.depth):
        t, s = f"stacks.vision.blocks.{i}", f"blocks.{i}"
        wm.copy_module(f"{t}.attn.norm", f"{s}.norm1")
        wm.copy(f"{t}.attn.fn.qkv.weight", f"{s}.attn.qkv.weight")  # rows q | k | v, as ours
        if stack.bias:
            if f"{s}.attn.qkv.bias" in wm:
                wm.copy(f"{t}.attn.fn.qkv.bias", f"{s}.attn.qkv.bias")
            else:  # qkv_bias=False next to biased projections: a zero bias is exact
                wm.set(f"{t}.attn.fn.qkv.bias", torch.zeros(3 * stack.width), source=[])
        if stack.qk_norm:
            wm.copy_module(f"{t}.attn.fn.q_norm", f"{s}.attn.q_norm")
            wm.copy_module(f"{t}.attn.fn.k_norm", f"{s}.attn.k_norm")
        names = ["weight", "bias"] if stack.bias else ["weight"]
        wm.copy_module(f"{t}.attn.fn.proj", f"{s}.attn.proj", names)
        wm.copy_module(f"{t}.mlp.norm", f"{s}.norm2")
        wm.copy_module(f"{t}.mlp.fn.fc1", f"{s}.mlp.fc1", names)
        wm.copy_module(f"{t}.mlp.fn.fc2", f"{s}.mlp.fc2", names)
        if stack.layer_scale is not None:
            wm.copy(f"{t}.attn.scale.gamma", f"{s}.ls1.gamma")
            wm.copy(f"{t}.mlp.scale.gamma", f"{s}.ls2.gamma")
    if stack.final_norm:
        wm.copy_module("stacks.vision.norm", "norm")
    if config.image.pool_norm:
        wm.copy_module("image_pool_norm", "fc_norm")
    if config.image.pool == "map":
        wm.copy("image_pool.queries", "attn_pool.latent", lambda t: t.reshape(-1, t.shape[-1]))  # (1, 1, D) → (1, D)
        for name in ("q", "kv", "proj"):
            wm.copy_module(f"image_pool.{name}", f"attn_pool.{name}")
        wm.copy_module("image_pool.mlp_norm", "attn_pool.norm")
        wm.copy_module("image_pool.mlp.fc1", "attn_pool.mlp.fc1")
        wm.copy_module("image_pool.mlp.fc2", "attn_pool.mlp.fc2")
    if config.embed_dim is not None:
        wm.copy_module("image_proj", "head", ["weight", "bias"] if config.projection_bias else ["weight"])
    wm.initialise("logit_scale")  # ours only: unused by a classifier
    return wm


def _processor(vit: nn.Module, config: ModelConfig):
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=vit)
    channels = config.image.channels
    if channels not in (1, 3):
        warnings.warn(
            f"no processor attached: the image pipeline handles 1 or 3 channels, not {channels}", stacklevel=3
        )
        return None
    interpolation = data.get("interpolation", "bicubic")
    mean, std = tuple(data["mean"]), tuple(data["std"])
    if channels == 1 and (len(mean) != 1 or len(std) != 1):
        # timm's resolve_data_config gives its pretrained_cfg's RGB statistics whatever in_chans is
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        warnings.warn(
            f"timm_vit: a 1-channel model (in_chans=1) with timm's {len(data['mean'])}-channel mean/std "
            f"{tuple(data['mean'])} / {tuple(data['std'])}: the processor normalises with their averages "
            f"{mean[0]:.4g} / {std[0]:.4g}; if it was trained with others, give it a processor of its own "
            "(mmformer.Processor(image=ImageProcessorConfig(channels=1, mean=..., std=...)))",
            UserWarning,
            stacklevel=3,
        )
    image = dict(
        image_size=tuple(config.image.image_size),  # the model's own size (a pretrained_cfg may name another)
        mean=mean,
        std=std,
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        channels=channels,
        **_resize(data, tuple(config.image.image_size)),
    )
    return build_processor(None, image=image)


def _resize(data: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The resize of timm's eval transform (``transforms_imagenet_eval``) as ``ImageProcessorConfig`` fields: in
    crop mode 'center', the shortest edge to ``floor(size / crop_pct)``, then a center crop of ``size``."""
    from timm.data import DEFAULT_CROP_PCT

    crop_pct, mode = data.get("crop_pct") or DEFAULT_CROP_PCT, data.get("crop_mode") or "center"
    h, w = size
    if mode == "center" and h == w:
        return dict(resize="shortest", resize_size=math.floor(h / crop_pct))
    if crop_pct == 1 and mode in ("center", "squash"):  # no border: cover then crop, or a plain resize
        return dict(resize="shortest" if mode == "center" else "exact")
    warnings.warn(
        f"timm crop_mode={mode!r} with crop_pct={crop_pct} at image size {size} has no mmformer equivalent; the "
        "processor resizes the shortest edge to the image size and center-crops instead",
        stacklevel=4,
    )
    return dict(resize="shortest")
