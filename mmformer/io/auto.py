"""One entry point for every model source: ``mmformer.from_pretrained(name_or_path)`` (alias ``load_pretrained``).

Every caller that loads "a model a user names" (the CLI's ``--model`` flags and ``mmformer convert``, ``init_from``,
a distillation teacher) goes through here. The name is resolved once into a :class:`mmformer.io.hub.Source`
(:func:`mmformer.io.hub.resolve_source`: what the files are, where, the Hub revision, the folder's ``config.json`` read
once), and the source's ``kind`` picks its reader (:data:`KIND_CONVERTERS`):

- mmformer's own formats (``mmformer`` folders, training ``checkpoint`` files, bare ``weights``):
  :meth:`MultimodalTransformer.from_pretrained`, with the config already read;
- a Hugging Face folder (``hf``; also a Hub id's snapshot): its ``config.json``'s ``model_type`` picks the converter
  in :data:`HF_CONVERTERS`, which receives the Source (and so the config read once);
- ``timm`` and ``open_clip`` names and folders, through those libraries' own download and cache code;
- ``whisper:NAME``: the converter :data:`KIND_CONVERTERS` names, looked up in :mod:`mmformer.convert`.

The processor comes from the same source with its own settings (``model.processor``); :func:`load_processor` reads
it alone. ``adapter=`` applies a LoRA adapter folder (peft's layout) on top of whatever was loaded.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmformer.io import hub
from mmformer.io.hub import Source
from mmformer.io.pretrained import config_from_dict, load_dtype, read_checkpoint
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.processor import Processor

if TYPE_CHECKING:
    from mmformer.compress.pt2e import PT2EModel

__all__ = [
    "HF_CONVERTERS",
    "KIND_CONVERTERS",
    "from_pretrained",
    "load_for_inference",
    "load_pretrained",
    "load_processor",
]

# Hugging Face ``config.json`` ``model_type`` → its converter in :mod:`mmformer.convert` (which takes a local folder or
# a Source and is imported only when a model of that type is loaded). A converter for a new family adds one line here.
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
# A Source kind read by one converter of :mod:`mmformer.convert`, called with the source's location (a path or a
# library's model name). A new kind: its name and description in hub.KINDS, how resolve_source recognises it
# (hub.parse_name's prefixes), one line here, and its converter in mmformer.convert's table.
KIND_CONVERTERS: dict[str, str] = {"whisper": "from_openai_whisper"}
OWN_KINDS = ("mmformer", "checkpoint", "weights")  # read by MultimodalTransformer.from_pretrained
# MultimodalTransformer.from_pretrained's options, with their defaults (a default is not "given")
_OWN_OPTIONS = {"map_location": "cpu", "strict": True, "config": None, "max_parameters": None}


def from_pretrained(
    name_or_path: str | os.PathLike | Source,
    *,
    source: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    adapter: str | os.PathLike | None = None,
    **kwargs: Any,
) -> MultimodalTransformer:
    """Load a model from any source mmformer reads, converting public formats exactly.

    Args:
        name_or_path: a local file or folder, a Hugging Face Hub id (``openai/whisper-tiny``), ``open_clip:MODEL/TAG``
            (``open_clip:ViT-B-32/openai``), ``open_clip:hf-hub:ORG/REPO``, ``timm:NAME``
            (``timm:vit_base_patch16_224.augreg_in21k``), ``whisper:NAME``, or a :class:`~mmformer.io.hub.Source`
            already resolved.
        source: force a converter by its CLI name (:data:`mmformer.convert.SOURCES`: ``open_clip``, ``hf_clip``,
            ``hf_siglip``, ``timm_vit``, ``hf_whisper``, ``hf_bert``, ...) for a local path or a Hub id; default:
            decided from the files.
        revision: a Hub branch, tag or commit (Hub ids only).
        cache_dir: the Hugging Face cache (default: ``HF_HUB_CACHE`` / ``HF_HOME``, read now).
        local_files_only: never download (default: ``HF_HUB_OFFLINE``).
        token: a Hub token for private or gated models.
        model_kwargs: keyword arguments for ``open_clip.create_model`` / ``timm.create_model`` (e.g. ``img_size``
            for timm, whose position table is resampled on load).
        device, dtype: where and in which floating-point type (a ``torch.dtype`` or its name: ``"bfloat16"``) the
            model ends up.
        adapter: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied on top, checked
            against this model before its tensors are read (see :func:`mmformer.adapt.adapter_files.load_adapter`).
        kwargs: for mmformer's own formats, :meth:`MultimodalTransformer.from_pretrained`'s ``map_location``,
            ``strict``, ``config`` and ``max_parameters`` (other sources accept them at their defaults only).

    Returns:
        The model in eval mode, ``model.processor`` set from the same source.

    Raises:
        FileNotFoundError: the path does not exist, or a Hub / open_clip / timm name is not in its cache while
            offline (naming the id, revision and cache), or has no weights.
        ValueError: an unsupported ``model_type`` (naming it and the supported ones), an unsupported feature of a
            checkpoint (:class:`~mmformer.convert.common.UnsupportedModelError`), or options that do not fit the
            source.
    """
    unknown = sorted(set(kwargs) - set(_OWN_OPTIONS))
    if unknown:
        raise TypeError(f"from_pretrained: unknown keyword arguments {unknown}; expected some of {list(_OWN_OPTIONS)}")
    dtype = load_dtype(dtype)  # a name ("bfloat16") or a torch.dtype; refused before anything is read
    if isinstance(name_or_path, Source):
        if revision is not None:
            raise ValueError(f"revision: {name_or_path} is resolved already (its revision: {name_or_path.revision})")
        resolved = name_or_path
    else:
        check = _check_supported if source is None else None
        resolved = hub.resolve_source(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            check=check,
        )  # fmt: skip
    model = _load(resolved, source, model_kwargs, dict(cache_dir=cache_dir, local_files_only=local_files_only),
                  device, dtype, kwargs)  # fmt: skip
    if adapter is not None:
        from mmformer.adapt.adapter_files import load_adapter

        load_adapter(model, adapter)
    return model


def _load(
    source: Source,
    forced: str | None,
    model_kwargs: dict[str, Any] | None,
    cache: dict[str, Any],
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    kwargs: dict[str, Any],
) -> MultimodalTransformer:
    """:func:`from_pretrained` of a resolved source, without the adapter (``cache``: the libraries' cache_dir and
    local_files_only)."""
    if forced is not None:
        if not source.local:
            raise ValueError(f"source: only for local paths and Hub ids; {source} names its library")
        _only_own_format(kwargs)
        return _finish(_convert(forced, source, model_kwargs), device, dtype)
    if model_kwargs and source.kind not in ("open_clip", "timm"):
        raise ValueError("model_kwargs: only for open_clip and timm models (or source='timm_vit')")
    if source.kind in OWN_KINDS:
        _warn_of_int8_graphs(source)
        if source.config is not None and kwargs.get("config") is None:
            kwargs = {**kwargs, "config": config_from_dict(source.config, f"{source.path / 'config.json'}")}
        return MultimodalTransformer.from_pretrained(source.path, device=device, dtype=dtype, **kwargs)
    _only_own_format(kwargs)
    if source.kind == "hf":
        model = _converter(_check_supported(source))(source)
    elif source.kind == "timm":
        model = _timm(source, model_kwargs or {}, **cache)
    elif source.kind == "open_clip":
        model = _open_clip(source, model_kwargs or {}, **cache)
    else:
        model = _converter(KIND_CONVERTERS[source.kind])(source.location)
    return _finish(model, device, dtype)


load_pretrained = from_pretrained


def _warn_of_int8_graphs(source: Source) -> None:
    """A folder ``mmformer quantize --backend pt2e`` wrote holds the float model beside its int8 graphs' parameters:
    loading it here gives the float model, which is what a user who quantized to go faster should hear."""
    from mmformer.compress import pt2e

    if source.path.is_dir() and pt2e.is_pt2e(source.path):
        warnings.warn(
            f"{source.path}: a pt2e int8 folder; from_pretrained loads its float model — its int8 graphs load with "
            "mmformer.compress.pt2e.load or load_for_inference (which the CLI's commands and the server use)",
            UserWarning,
            stacklevel=4,
        )


def load_for_inference(
    name_or_path: str | os.PathLike, *, device: str | torch.device | None = None, adapter: str | None = None
) -> MultimodalTransformer | PT2EModel:
    """The model the CLI's commands and the server run, in eval mode: a folder ``mmformer quantize --backend pt2e``
    wrote gives its int8 graphs (:func:`mmformer.compress.pt2e.load`, compiled at their first call), any other name
    :func:`from_pretrained`'s model."""
    from mmformer.compress import pt2e

    if Path(name_or_path).is_dir() and pt2e.is_pt2e(name_or_path):
        if adapter is not None:
            raise ValueError(f"adapter: {name_or_path} holds PT2E int8 graphs, which take no adapter; quantize the "
                             "adapted model instead (mmformer merge, then mmformer quantize)")  # fmt: skip
        return pt2e.load(name_or_path, device=device)
    return from_pretrained(name_or_path, device=device, adapter=adapter).eval()


def load_processor(name_or_path: str | os.PathLike | Source) -> Processor | None:
    """The processor (tokenizer, image and audio preprocessing) saved with a model, or None, from any source
    :func:`from_pretrained` reads. mmformer's own formats are read without their weights; converted sources are
    loaded whole, since their processor comes from the conversion (a caller that needs the model too should load
    it once with :func:`from_pretrained` and take ``model.processor``)."""
    source = name_or_path if isinstance(name_or_path, Source) else hub.resolve_source(name_or_path)
    if source.kind in OWN_KINDS:
        config = None if source.config is None else config_from_dict(source.config, f"{source.path / 'config.json'}")
        return read_checkpoint(source.path, config=config).processor
    return from_pretrained(source).processor


def _only_own_format(kwargs: dict[str, Any]) -> None:
    given = sorted(k for k, v in kwargs.items() if v is not _OWN_OPTIONS[k] and v != _OWN_OPTIONS[k])
    if given:
        raise ValueError(f"{given}: only for mmformer's own formats (folders, .ckpt files)")


def _finish(model: MultimodalTransformer, device: Any, dtype: torch.dtype | None) -> MultimodalTransformer:
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _converter(name: str):
    """A converter of :mod:`mmformer.convert` by its function name (the module is imported on this first use)."""
    convert = importlib.import_module("mmformer.convert")
    if name not in convert.__all__:
        raise ValueError(f"no converter {name!r} in mmformer.convert (it has {sorted(convert.__all__)})")
    return getattr(convert, name)


def _convert(forced: str, source: Source, model_kwargs: dict[str, Any] | None) -> MultimodalTransformer:
    from mmformer.convert import SOURCES

    if forced not in SOURCES:
        raise ValueError(f"source: expected one of {sorted(SOURCES)}, got {forced!r}")
    # A Hugging Face converter takes the config read once; the others (open_clip's, timm's) take the path, also of a
    # folder that is a Hugging Face one too (a LAION repository: HF CLIP files beside open_clip's).
    hf = source.kind == "hf" and SOURCES[forced] in HF_CONVERTERS.values()
    target = source if hf else source.path
    return _converter(SOURCES[forced])(target, **(model_kwargs or {}))


def _check_supported(source: Source) -> str | None:
    """The converter of a Hugging Face folder's ``model_type`` (None for other sources); an unsupported
    ``model_type`` is refused, naming it and the supported ones."""
    if source.kind != "hf":
        return None
    model_type = source.config["model_type"]
    if model_type not in HF_CONVERTERS:
        raise ValueError(
            f"{source.path / 'config.json'}: model_type {model_type!r} is not supported; mmformer converts "
            f"{sorted(HF_CONVERTERS)}"
        )
    return HF_CONVERTERS[model_type]


# ---------------------------------------------------------------------------------------------------- libraries
def _timm(
    source: Source, model_kwargs: dict[str, Any], *, cache_dir: Any, local_files_only: bool | None
) -> MultimodalTransformer:
    """``timm.create_model(name, pretrained=True)`` (timm's download, cache and safe loading), converted; a local
    timm folder through timm's ``local-dir:``."""
    import timm

    from mmformer.convert.timm_vit import from_timm_vit

    cache, offline = hub.cache_dir_for(cache_dir), hub.is_offline(local_files_only)
    name = f"local-dir:{source.location}" if source.local else source.location
    if not source.local:
        if not timm.is_model(name):
            raise ValueError(
                f"timm: no model {name!r} (timm.list_models() lists them, timm.list_pretrained() the tags)"
            )
        if timm.models.get_pretrained_cfg(name) is None:
            raise ValueError(f"timm: {name!r} has no pretrained weights (timm.list_pretrained({name.split('.')[0]!r}))")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with hub.hub_offline(offline):
            options = {} if source.local else {"cache_dir": cache}
            vit = timm.create_model(name, pretrained=True, **options, **model_kwargs)
    except LocalEntryNotFoundError as e:
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        raise FileNotFoundError(
            f"timm:{name}: its weights ({hub_id or 'a download'}) are not in the Hugging Face cache {cache} and "
            f"{hub.why_missing(offline)}"
        ) from e
    return from_timm_vit(vit.eval())


def _open_clip(
    source: Source, model_kwargs: dict[str, Any], *, cache_dir: Any, local_files_only: bool | None
) -> MultimodalTransformer:
    """``open_clip.create_model`` with the tag's weights fetched by open_clip's own download code, converted; a local
    open_clip folder (or an ``hf-hub:`` repository's snapshot) through open_clip's ``local-dir:``."""
    import open_clip

    from mmformer.convert.open_clip import from_open_clip

    cache, offline = hub.cache_dir_for(cache_dir), hub.is_offline(local_files_only)
    options: dict[str, Any] = dict(model_kwargs)
    if source.local:
        name = f"local-dir:{source.location}"
    else:
        arch, tag = source.location, source.tag
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
