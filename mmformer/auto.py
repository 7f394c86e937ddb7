"""One entry point for every model source: ``mmformer.from_pretrained(name_or_path)`` (alias ``load_pretrained``).

Every caller that loads "a model a user names" (the CLI's ``--model`` flags and ``mmformer convert``, ``init_from``,
a distillation teacher) goes through here. What a name is (:func:`mmformer.hub.parse_name`):

- mmformer's own formats: a save_pretrained folder, a training ``.ckpt``, a weights file beside a config.json
  (:meth:`MultimodalTransformer.from_pretrained`);
- a Hugging Face model folder, or a Hub id resolved into the Hub cache (:func:`mmformer.hub.snapshot`): its
  ``config.json``'s ``model_type`` picks the converter in :data:`HF_CONVERTERS`; a timm folder (``config.json``
  with an ``architecture``, as ``timm/...`` repositories) loads through timm, an open_clip one
  (``open_clip_config.json``) through open_clip;
- ``open_clip:MODEL/TAG`` and ``timm:NAME``, resolved by those libraries' own download and cache code.

The processor comes from the same source with its own settings (``model.processor``); :func:`load_processor` reads
it alone. ``adapter=`` applies a LoRA adapter folder (peft's layout) on top of whatever was loaded.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from mmformer import hub
from mmformer.model import MultimodalTransformer
from mmformer.pretrained import read_checkpoint
from mmformer.processor import Processor

__all__ = ["HF_CONVERTERS", "from_pretrained", "load_pretrained", "load_processor"]

# Hugging Face ``config.json`` ``model_type`` → its converter in :mod:`mmformer.convert` (which takes a local folder and
# is imported only when a model of that type is loaded). A converter for a new family adds one line here.
HF_CONVERTERS: dict[str, str] = {
    "clip": "from_hf_clip",
    "siglip": "from_hf_siglip",
    "whisper": "from_hf_whisper",
    "bert": "from_hf_bert",
    "roberta": "from_hf_bert",
    "xlm-roberta": "from_hf_bert",
    "gpt2": "from_hf_gpt2",
    "llama": "from_hf_llama",
    "qwen2": "from_hf_llama",
    "t5": "from_hf_t5",
    "mt5": "from_hf_t5",
}
_OWN_OPTIONS = ("map_location", "strict", "config", "max_parameters")  # MultimodalTransformer.from_pretrained's


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    source: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    adapter: str | os.PathLike | None = None,
    **kwargs: Any,
) -> MultimodalTransformer:
    """Load a model from any source mmformer reads, converting public formats exactly.

    Args:
        name_or_path: a local file or folder, a Hugging Face Hub id (``openai/whisper-tiny``), ``open_clip:MODEL/TAG``
            (``open_clip:ViT-B-32/openai``), ``open_clip:hf-hub:ORG/REPO``, ``timm:NAME``
            (``timm:vit_base_patch16_224.augreg_in21k``), or ``whisper:NAME`` / an openai-whisper ``.pt`` file.
        source: force a converter by its CLI name (:data:`mmformer.convert.SOURCES`: ``open_clip``, ``hf_clip``,
            ``hf_siglip``, ``timm_vit``, ``hf_whisper``, ``hf_bert``, ...) for a local path or a Hub id; default:
            decided from the files.
        revision: a Hub branch, tag or commit (Hub ids only).
        cache_dir: the Hugging Face cache (default: ``HF_HUB_CACHE`` / ``HF_HOME``, read now).
        local_files_only: never download (default: ``HF_HUB_OFFLINE``).
        token: a Hub token for private or gated models.
        model_kwargs: keyword arguments for ``open_clip.create_model`` / ``timm.create_model`` (e.g. ``img_size``
            for timm, whose position table is resampled on load).
        device, dtype: where and in which floating-point type the model ends up.
        adapter: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied on top, checked
            against this model before its tensors are read (see :func:`mmformer.adapters.load_adapter`).
        kwargs: for mmformer's own formats, :meth:`MultimodalTransformer.from_pretrained`'s ``map_location``,
            ``strict``, ``config`` and ``max_parameters``.

    Returns:
        The model in eval mode, ``model.processor`` set from the same source.

    Raises:
        FileNotFoundError: the path does not exist, or a Hub / open_clip / timm name is not in its cache while
            offline (naming the id, revision and cache), or has no weights.
        ValueError: an unsupported ``model_type`` (naming it and the supported ones), an unsupported feature of a
            checkpoint (:class:`~mmformer.convert.common.UnsupportedModelError`), or options that do not fit the
            source.
    """
    model = _load(
        name_or_path, source, revision, cache_dir, local_files_only, token, model_kwargs, device, dtype, kwargs
    )
    if adapter is not None:
        from mmformer.adapters import load_adapter

        load_adapter(model, adapter)
    return model


def _load(
    name_or_path: str | os.PathLike,
    source: str | None,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
    model_kwargs: dict[str, Any] | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    kwargs: dict[str, Any],
) -> MultimodalTransformer:
    """:func:`from_pretrained` without the adapter."""
    unknown = sorted(set(kwargs) - set(_OWN_OPTIONS))
    if unknown:
        raise TypeError(f"from_pretrained: unknown keyword arguments {unknown}; expected some of {list(_OWN_OPTIONS)}")
    if _openai_whisper(name_or_path):  # whisper:NAME (openai-whisper's download cache) or its .pt file
        _only_own_format(kwargs)
        return _finish(_converter("from_openai_whisper")(name_or_path), device, dtype)
    parsed = hub.parse_name(name_or_path)
    name = os.fspath(name_or_path)
    hub_options = dict(cache_dir=cache_dir, local_files_only=local_files_only)
    if revision is not None and parsed.kind != "hub":
        raise ValueError(f"revision: only for Hugging Face Hub ids; {name!r} is not one")
    if parsed.kind in ("open_clip", "timm"):
        if source is not None:
            raise ValueError(f"source: only for local paths and Hub ids; {name!r} names its library")
        _only_own_format(kwargs)
        load = _open_clip if parsed.kind == "open_clip" else _timm
        return _finish(load(parsed, model_kwargs or {}, **hub_options), device, dtype)
    if parsed.kind == "hub":
        check = _check_supported if source is None else None
        path = hub.snapshot(parsed.name, revision=revision, token=token, check=check, **hub_options)
    else:
        path = Path(parsed.name)
        if not path.exists():
            raise FileNotFoundError(
                f"name_or_path: no such file or folder {name!r}, and it is not a Hugging Face Hub id ('org/name'), "
                "'open_clip:MODEL/TAG' or 'timm:NAME'"
            )
    if source is not None:
        _only_own_format(kwargs)
        return _finish(_convert(source, path, model_kwargs), device, dtype)
    if model_kwargs:
        raise ValueError("model_kwargs: only for open_clip and timm models (or source='timm_vit')")
    kind = hub.folder_kind(path) if path.is_dir() else None
    if kind is None or kind == "mmformer":  # mmformer's own formats (folders, .ckpt and weights files)
        return MultimodalTransformer.from_pretrained(path, device=device, dtype=dtype, **kwargs)
    _only_own_format(kwargs)
    return _finish(_from_folder(path, kind, local_files_only), device, dtype)


load_pretrained = from_pretrained


def load_processor(name_or_path: str | os.PathLike) -> Processor | None:
    """The processor (tokenizer, image and audio preprocessing) saved with a model, or None, from any source
    :func:`from_pretrained` reads (``init_from``'s data module uses it). mmformer's own formats are read without
    their weights; converted sources are loaded whole, since their processor comes from the conversion."""
    parsed = hub.parse_name(name_or_path)
    if parsed.kind == "path":
        path = Path(parsed.name)
        if not path.is_dir() or hub.folder_kind(path) in (None, "mmformer"):
            return read_checkpoint(path).processor
    return from_pretrained(name_or_path).processor


def _openai_whisper(name_or_path: Any) -> bool:
    """``whisper:NAME``, or a ``.pt`` file with no config.json beside it (mmformer's bare weights have one)."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else ""
    path = Path(text)
    return text.startswith("whisper:") or (
        path.suffix == ".pt" and path.is_file() and not (path.parent / "config.json").exists()
    )


def _only_own_format(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"{sorted(kwargs)}: only for mmformer's own formats (folders, .ckpt files)")


def _finish(model: MultimodalTransformer, device: Any, dtype: torch.dtype | None) -> MultimodalTransformer:
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _converter(name: str):
    """A converter of :mod:`mmformer.convert` by its function name (the module is imported on this first use)."""
    return getattr(importlib.import_module("mmformer.convert"), name)


def _convert(source: str, path: Path, model_kwargs: dict[str, Any] | None) -> MultimodalTransformer:
    from mmformer.convert import SOURCES

    if source not in SOURCES:
        raise ValueError(f"source: expected one of {sorted(SOURCES)}, got {source!r}")
    return _converter(SOURCES[source])(path, **(model_kwargs or {}))


def _check_supported(folder: Path) -> str | None:
    """The converter of a Hugging Face folder's ``model_type`` (None for other folders); an unsupported
    ``model_type`` is refused, naming it and the supported ones."""
    if hub.folder_kind(folder) != "hf":
        return None
    model_type = hub.read_json(folder / "config.json")["model_type"]
    if model_type not in HF_CONVERTERS:
        raise ValueError(
            f"{folder / 'config.json'}: model_type {model_type!r} is not supported; mmformer converts "
            f"{sorted(HF_CONVERTERS)}"
        )
    return HF_CONVERTERS[model_type]


def _from_folder(path: Path, kind: str, local_files_only: bool | None) -> MultimodalTransformer:
    """A Hugging Face folder (by its ``model_type``), a timm folder or an open_clip folder, converted (an open_clip
    folder may name a Hugging Face text tower, whose config is fetched unless offline)."""
    if kind == "hf":
        return _converter(_check_supported(path))(path)
    local = hub.HubSource(kind, f"local-dir:{path}")
    return (_timm if kind == "timm" else _open_clip)(local, {}, cache_dir=None, local_files_only=local_files_only)


# ---------------------------------------------------------------------------------------------------- libraries
def _timm(
    parsed: hub.HubSource, model_kwargs: dict[str, Any], *, cache_dir: Any, local_files_only: bool | None
) -> MultimodalTransformer:
    """``timm.create_model(name, pretrained=True)`` (timm's download, cache and safe loading), converted."""
    import timm

    name = parsed.name
    from mmformer.convert.timm_vit import from_timm_vit

    cache, offline = hub.cache_dir_for(cache_dir), hub.is_offline(local_files_only)
    local = name.startswith("local-dir:")
    if not local:
        if not timm.is_model(name):
            raise ValueError(
                f"timm: no model {name!r} (timm.list_models() lists them, timm.list_pretrained() the tags)"
            )
        if timm.models.get_pretrained_cfg(name) is None:
            raise ValueError(f"timm: {name!r} has no pretrained weights (timm.list_pretrained({name.split('.')[0]!r}))")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with hub.hub_offline(offline):
            vit = timm.create_model(name, pretrained=True, **({} if local else {"cache_dir": cache}), **model_kwargs)
    except LocalEntryNotFoundError as e:
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        raise FileNotFoundError(
            f"timm:{name}: its weights ({hub_id or 'a download'}) are not in the Hugging Face cache {cache} and "
            f"{hub.why_missing(offline)}"
        ) from e
    return from_timm_vit(vit.eval())


def _open_clip(
    parsed: hub.HubSource, model_kwargs: dict[str, Any], *, cache_dir: Any, local_files_only: bool | None
) -> MultimodalTransformer:
    """``open_clip.create_model`` with the tag's weights fetched by open_clip's own download code, converted."""
    import open_clip

    from mmformer.convert.open_clip import from_open_clip

    cache, offline = hub.cache_dir_for(cache_dir), hub.is_offline(local_files_only)
    options: dict[str, Any] = dict(model_kwargs)
    if parsed.tag is None:  # hf-hub:ORG/REPO or local-dir:PATH
        if parsed.name.startswith("hf-hub:"):
            folder = hub.snapshot(parsed.name.removeprefix("hf-hub:"), cache_dir=cache, local_files_only=offline)
            name = f"local-dir:{folder}"
        else:
            name = parsed.name
    else:
        arch, tag = parsed.name, parsed.tag
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"open_clip: no model {arch!r}; open_clip.list_models() lists them")
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"open_clip: {arch!r} has no pretrained tag {tag!r}; its tags: {tags}")
        try:
            with hub.hub_offline(offline):
                file = open_clip.pretrained.download_pretrained(
                    cfg, cache_dir=str(cache) if cfg.get("hf_hub") else None
                )
        except Exception as e:  # open_clip wraps every download failure in FileNotFoundError/RuntimeError
            raise FileNotFoundError(
                f"open_clip:{arch}/{tag}: its weights ({cfg.get('hf_hub') or cfg.get('url')}) are not in the cache "
                f"{cache if cfg.get('hf_hub') else '~/.cache/clip'} and "
                f"{hub.why_missing(offline)}: {e}"
            ) from e
        name = arch
        options.update(pretrained=file, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        options.setdefault("force_preprocess_cfg", preprocess)
    with hub.hub_offline(offline):
        model = open_clip.create_model(name, **options)
    return from_open_clip(model.eval())
