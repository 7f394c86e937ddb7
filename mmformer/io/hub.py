"""Where a model a user names lives: local paths, Hugging Face Hub ids (through ``huggingface_hub``), open_clip
pretrained tags and timm names. :func:`mmformer.from_pretrained` asks here, then picks the converter.

Names, as users write them::

    out/model, run/last.ckpt             a local folder or file (mmformer's, a Hugging Face folder, a timm or
                                         open_clip folder; a weights file of one of the last three is its folder)
    openai/whisper-tiny                  a Hugging Face Hub id, fetched with ``huggingface_hub.snapshot_download``
                                         into the Hub cache (``models--openai--whisper-tiny/snapshots/<commit>/``)
    open_clip:ViT-B-32/openai            an open_clip model and pretrained tag, through open_clip's download code
    open_clip:hf-hub:laion/CoCa-ViT-B-32-laion2B-s13B-b90k   an open_clip repository on the Hub (its open_clip
                                         files, also where it is a Hugging Face folder too, as laion/CLIP-* are:
                                         their plain id or folder gives the Hugging Face model)
    timm:vit_base_patch16_224.augreg_in21k                   a timm name (with its pretrained tag)
    whisper:tiny                         an openai-whisper checkpoint (``NAME.pt`` in openai-whisper's cache)

:func:`resolve_source` turns a name into a :class:`Source` — what the files are (``kind``), where they are, the Hub
revision, and the folder's ``config.json`` read once — which the converters and processor loaders take as it is.

The cache and offline mode follow ``huggingface_hub``'s variables, read when a model is loaded (not only when
``huggingface_hub`` was imported): ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``;
``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) forbids any download, and a name missing from the cache is a
``FileNotFoundError`` naming the id, the revision and the cache. From a Hub repository only what loading needs is
fetched: its JSON/text files, then safetensors weights, and only when there are none a ``.bin`` (read with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "KINDS",
    "HubSource",
    "SentenceModule",
    "Source",
    "cache_dir_for",
    "folder_kind",
    "hub_offline",
    "is_open_clip_folder",
    "is_offline",
    "model_folder",
    "why_missing",
    "parse_name",
    "read_json",
    "refuse_broken_link",
    "resolve_source",
    "sentence_modules",
    "snapshot_files",
]

OPEN_CLIP_PREFIX = "open_clip:"
TIMM_PREFIX = "timm:"
WHISPER_PREFIX = "whisper:"
SENTENCE_MODULES = "modules.json"  # a sentence-transformers folder's pipeline: its modules, in order
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's model_cfg and preprocess_cfg, in its folders and Hub repos
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_METADATA = ["*.json", "*.txt"]  # configs, tokenizers, vocabularies: small, and what tells the format apart
# Weights per folder kind, preferred first: safetensors, and pickles only when a repository has nothing else.
WEIGHT_FILES = {
    "hf": (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
           ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]),
    "open_clip": (["open_clip_model.safetensors"], ["open_clip_pytorch_model.bin"]),
}  # fmt: skip
WEIGHT_FILES["mmformer"] = WEIGHT_FILES["timm"] = WEIGHT_FILES["hf"]


@dataclass(frozen=True)
class HubSource:
    """A parsed model name (its syntax only; :func:`resolve_source` finds what it names): ``kind`` is ``path`` (a
    local file or folder), ``hub`` (a Hub repository id), ``open_clip`` (``name`` an open_clip model, ``tag`` its
    pretrained tag, or ``name`` an ``hf-hub:`` id), ``timm`` (``name`` a timm model name with its tag) or ``whisper``
    (``name`` an openai-whisper model name)."""

    kind: str
    name: str
    tag: str | None = None


def parse_name(name_or_path: str | os.PathLike) -> HubSource:
    """Tell a local path (``~`` expanded), a Hub id, an ``open_clip:``, a ``timm:`` and a ``whisper:`` name apart
    (no I/O but ``os.path.exists``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            "name_or_path: expected a path, a Hugging Face Hub id, 'open_clip:MODEL/TAG', 'timm:NAME' or "
            f"'whisper:NAME', got {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    if text.startswith(OPEN_CLIP_PREFIX):
        spec = text[len(OPEN_CLIP_PREFIX) :]
        if spec.startswith("hf-hub:"):
            return HubSource("open_clip", spec)
        arch, _, tag = spec.partition("/")
        if not arch or not tag:
            raise ValueError(
                f"name_or_path: expected 'open_clip:MODEL/TAG' (e.g. 'open_clip:ViT-B-32/openai') or "
                f"'open_clip:hf-hub:ORG/REPO', got {text!r}"
            )
        return HubSource("open_clip", arch, tag)
    if text.startswith(TIMM_PREFIX):
        name = text[len(TIMM_PREFIX) :]
        if not name:
            raise ValueError(
                f"name_or_path: expected 'timm:NAME' (e.g. 'timm:vit_base_patch16_224.augreg_in21k'), got {text!r}"
            )
        return HubSource("timm", name)
    if text.startswith(WHISPER_PREFIX):
        name = text[len(WHISPER_PREFIX) :]
        if not name:
            raise ValueError(f"name_or_path: expected 'whisper:NAME' (e.g. 'whisper:tiny'), got {text!r}")
        return HubSource("whisper", name)
    path = os.path.expanduser(text)  # "~/models/x" as a shell would read it (a Hub id never starts with "~")
    if os.path.exists(path) or not _HUB_ID.match(text):
        return HubSource("path", path)
    return HubSource("hub", text)


# ---------------------------------------------------------------------------------------------------- settings
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline(local_files_only: bool | None = None) -> bool:
    """Whether downloading is forbidden: ``local_files_only`` when given, else ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) as set now, or as ``huggingface_hub`` read it at import."""
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def cache_dir_for(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hub cache: ``cache_dir``, else ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``/hub,
    ``XDG_CACHE_HOME``/huggingface/hub, ``~/.cache/huggingface/hub`` — ``huggingface_hub``'s order, read now."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def why_missing(offline: bool) -> str:
    """Why a missing file was not downloaded, for error messages."""
    return "downloading is off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "it could not be downloaded"


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """While it holds, ``huggingface_hub`` is in offline mode if ``offline``: libraries that download through it
    with no ``local_files_only`` argument of their own (open_clip, timm, transformers' configs) then read only the
    cache. ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; this carries a later decision to them."""
    from huggingface_hub import constants

    if not offline or constants.HF_HUB_OFFLINE:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


# ---------------------------------------------------------------------------------------------------- sources
# What a Source's files are, and who reads them (mmformer.io.auto dispatches on the kind).
KINDS = {
    "mmformer": "a folder written by save_pretrained (config.json + model.safetensors)",
    "checkpoint": "a training checkpoint (.ckpt)",
    "weights": "a bare weights file (.safetensors, .pt, .pth, .bin) beside a config.json",
    "hf": "a Hugging Face model folder (config.json with a model_type)",
    "timm": "a timm model: timm:NAME, or a folder with timm's config.json (an 'architecture')",
    "open_clip": "an open_clip model: open_clip:MODEL/TAG, open_clip:hf-hub:ORG/REPO, or a folder with "
    "open_clip_config.json",
    "whisper": "an openai-whisper checkpoint: whisper:NAME (NAME.pt in openai-whisper's cache)",
}


@dataclass(frozen=True)
class Source:
    """A model source, resolved once (:func:`resolve_source`) and handed to whoever reads it.

    Attributes:
        kind: what the files are, one of :data:`KINDS` (a Hub id resolves to the kind of its snapshot).
        location: the resolved local file or folder (``local``), else a library's model name (``open_clip`` model,
            ``timm`` name, ``whisper`` name). A file of a Hugging Face, timm or open_clip folder resolves to the
            folder; a sentence-transformers folder in the older layout to its Transformer module's
            (:func:`model_folder`).
        revision: the Hub revision asked for (Hub ids only).
        config: the folder's ``config.json``, read once (None: no folder, or no config.json in it).
        local: ``location`` is a path on disk.
        tag: an open_clip pretrained tag (``open_clip:MODEL/TAG``).
        repo_id: the Hugging Face Hub id it was resolved from, if any.
    """

    kind: str
    location: str
    revision: str | None = None
    config: dict[str, Any] | None = None
    local: bool = True
    tag: str | None = None
    repo_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {self.kind!r}")

    @property
    def path(self) -> Path:
        """``location`` as a path; a ValueError for a library's model name."""
        if not self.local:
            raise ValueError(f"{self.kind}:{self.location} is a {self.kind} model name, not a local file or folder")
        return Path(self.location)

    def __str__(self) -> str:
        return self.repo_id or (self.location if self.local else f"{self.kind}:{self.location}")


def resolve_source(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    check: Callable[[Source], object] | None = None,
) -> Source:
    """The :class:`Source` a name or path names; the one place a model folder's ``config.json`` is read.

    Args:
        name_or_path: a local file or folder, a Hub id, ``open_clip:MODEL/TAG``, ``open_clip:hf-hub:ORG/REPO``,
            ``timm:NAME`` or ``whisper:NAME``.
        revision: a Hub branch, tag or commit (Hub ids only).
        cache_dir, local_files_only, token: the Hub cache, offline mode and token (see :func:`snapshot_files`).
        check: called with the source before a Hub repository's weights are fetched (and for a local folder), to
            refuse a model that cannot be loaded (an unsupported ``model_type``) before downloading gigabytes.

    Raises:
        FileNotFoundError: a path that does not exist (and is not a Hub id), or a Hub id missing from the cache
            while offline / without weights (see :func:`snapshot_files`).
        ValueError: ``revision`` for a name that is not a Hub id; a malformed name; invalid JSON in config.json.
    """
    parsed = parse_name(name_or_path)
    name = os.fspath(name_or_path)
    if revision is not None and parsed.kind != "hub":
        raise ValueError(f"revision: only for Hugging Face Hub ids; {name!r} is not one")
    options = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token, check=check)
    if parsed.kind == "hub":
        try:
            return _from_hub(parsed.name, revision=revision, **options)
        except FileNotFoundError as e:  # a local folder not made yet or mistyped has the form of 'org/name' too
            if revision is not None:  # only a Hub id has revisions
                raise
            raise FileNotFoundError(
                f"name_or_path: no such folder {name!r} ({_nearest_folder(Path(parsed.name))}), and no Hugging Face "
                f"Hub model of that name could be loaded: {e}"
            ) from e
    if parsed.kind == "open_clip" and parsed.tag is None:  # open_clip:hf-hub:ORG/REPO
        return _from_hub(parsed.name.removeprefix("hf-hub:"), revision=None, open_clip=True, **options)
    if parsed.kind in ("open_clip", "timm", "whisper"):
        return Source(parsed.kind, parsed.name, local=False, tag=parsed.tag)
    path = Path(parsed.name)
    if not path.exists():
        refuse_broken_link(path)
        raise FileNotFoundError(
            f"name_or_path: no such file or folder {name!r}, and it is not a Hugging Face Hub id ('org/name'), "
            "'open_clip:MODEL/TAG', 'timm:NAME' or 'whisper:NAME'"
        )
    if path.is_file() and path.name == "config.json":
        path = path.parent  # a folder named by its config.json
    if path.is_file() and _openai_whisper_file(path):
        return Source("whisper", os.fspath(path))
    if path.is_file() and path.suffix == ".ckpt":
        return Source("checkpoint", os.fspath(path))
    if path.is_file():  # a weights file
        config = read_json(path.parent / "config.json")
        kind = _weights_owner(path, config)  # a Hugging Face, timm or open_clip folder's: read as that folder
        if kind is None:
            return Source("weights", os.fspath(path))  # beside our config.json or none: pretrained.read_checkpoint's
        path = path.parent
    else:
        path, config = model_folder(path)
        kind = folder_kind(path, config) or "mmformer"
        _refuse_broken_weights(path, kind)
    source = Source(kind, os.fspath(path), config=_object(config, path))
    if check is not None:
        check(source)
    return source


def model_folder(folder: Path) -> tuple[Path, Any]:
    """The folder holding a model folder's weights and ``config.json``, and that config (None without one):
    ``folder`` itself, or, for a sentence-transformers folder in the older layout (no ``config.json`` at its root;
    a ``modules.json`` whose first module, the Transformer, keeps its files in a subfolder, ``0_Transformer/``), that
    subfolder, as sentence-transformers reads it (its pooling and normalisation are read from the folder above:
    :func:`mmformer.convert.sentence_pipeline.read_pooling`).

    Raises:
        ValueError: such a folder whose first module is no Transformer, named.
        FileNotFoundError: its Transformer module's folder has no config.json.
    """
    config = read_json(folder / "config.json")
    modules = sentence_modules(folder) if config is None else None
    if not modules:
        return folder, config
    first = modules[0]
    if first.kind != "Transformer":
        raise ValueError(
            f"{folder / SENTENCE_MODULES}: a sentence-transformers pipeline that starts with module {first.name}; "
            "mmformer reads those that start with a Transformer module (a Hugging Face model)"
        )
    config = read_json(first.folder / "config.json")
    if config is None:
        raise FileNotFoundError(
            f"{folder / SENTENCE_MODULES}: its Transformer module ({first.name}) is read from {first.folder}, which "
            "has no config.json"
        )
    return first.folder, config


class SentenceModule(NamedTuple):
    """One module of a sentence-transformers pipeline (an entry of its ``modules.json``)."""

    kind: str  # its class: the last part of its type (Transformer, Pooling, Dense, Normalize, ...)
    name: str  # for messages: its path and type, "0_Transformer (sentence_transformers.models.Transformer)"
    folder: Path  # where it keeps its files: its path in the pipeline's folder ('' is that folder itself)


def sentence_modules(folder: Path) -> list[SentenceModule] | None:
    """A sentence-transformers folder's modules, in the order ``encode`` runs them (its ``modules.json``); None
    without one. A ValueError naming the file when it is no list of modules with a ``type`` each."""
    modules = read_json(folder / SENTENCE_MODULES)
    if modules is None:
        return None
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise ValueError(f"{folder / SENTENCE_MODULES}: expected a list of modules with a 'type' each, got {modules!r}")
    # a type is sentence_transformers.models.Pooling, or sentence_transformers...modules.pooling.Pooling (version 6)
    return [
        SentenceModule(
            str(m["type"]).rsplit(".", 1)[-1],
            f"{m.get('path') or m.get('name', i)} ({m['type']})",
            folder / str(m.get("path") or ""),
        )  # fmt: skip
        for i, m in enumerate(modules)
    ]


def _weights_owner(path: Path, config: Any) -> str | None:
    """The kind of the folder a weights file belongs to when that folder is a Hugging Face, timm or open_clip one
    (``config``, its config.json, and the files beside it say so: :func:`folder_kind`), whose converter reads the
    folder as a whole — its config, its tokenizer, its weights. None for a file beside mmformer's config.json or
    none: bare weights, which :func:`mmformer.io.pretrained.read_checkpoint` reads.

    Raises:
        ValueError: a file that such a folder does not load as its weights (:data:`WEIGHT_FILES`), naming the
            folder's kind and suggesting the folder.
    """
    folder = path.parent
    kind = folder_kind(folder, config)
    if kind in (None, "mmformer"):
        return None
    # a LAION folder is a Hugging Face folder and an open_clip one: each reads its own weights file
    owners = [kind, "open_clip"] if kind != "open_clip" and is_open_clip_folder(folder) else [kind]
    for owner in owners:
        if _is_weights_file(path.name, owner):
            return owner
    expected = [pattern for owner in owners for group in WEIGHT_FILES[owner] for pattern in group]
    raise ValueError(
        f"name_or_path: {path} is a file of {KINDS[kind]}, which loads as a whole, from its own weights ({expected}), "
        f"not from {path.name!r}; pass the folder: {folder}"
    )


def _nearest_folder(path: Path) -> str:
    """Where a relative folder ``path`` that does not exist stops existing, for error messages: "the folder 'out' has
    no 'model'", or "no folder 'out' in /work" (the current folder)."""
    if path.parent != Path(".") and path.parent.is_dir():
        return f"the folder {str(path.parent)!r} has no {path.name!r}"
    return f"no folder {path.parts[0]!r} in {Path.cwd()}"


def _openai_whisper_file(path: Path) -> bool:
    """A ``.pt`` file in openai-whisper's format, told by its known keys (``dims`` and ``model_state_dict``, what
    ``whisper.load_model`` reads); mmformer's bare weights have a config.json beside them. Read safely (weights
    only, memory-mapped); anything unreadable is left to the weights reader, which names the problem."""
    if path.suffix != ".pt" or (path.parent / "config.json").exists():
        return False
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(checkpoint, dict) and {"dims", "model_state_dict"} <= set(checkpoint)


def _object(config: Any, folder: Path) -> dict[str, Any] | None:
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{folder / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    return config


def _from_hub(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
    check: Callable[[Source], object] | None,
    open_clip: bool = False,
) -> Source:
    """A Hub repository's snapshot: its JSON/text files, the config read from them once, then the weights its kind
    needs. ``open_clip`` (``open_clip:hf-hub:``): read it as an open_clip model whatever else it holds — a LAION
    repository is a Hugging Face CLIP folder too, with ``open_clip_config.json`` and ``open_clip_model.safetensors``
    beside it."""
    where = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    snapshot = snapshot_files(repo_id, _METADATA, **where)
    folder, config = model_folder(snapshot)
    kind = folder_kind(folder, config)  # None: nothing we know; no weights are fetched, our reader names what lacks
    if open_clip:
        if not is_open_clip_folder(folder):
            what = KINDS[kind] if kind else "no model mmformer reads"
            raise ValueError(f"name_or_path: 'open_clip:hf-hub:{repo_id}' holds no {OPEN_CLIP_CONFIG} (it is {what})")
        kind = "open_clip"
    source = Source(kind or "mmformer", os.fspath(folder), revision, _object(config, folder), repo_id=repo_id)
    if check is not None:
        check(source)
    if kind in WEIGHT_FILES and not _weights_in(folder, kind):
        offline = is_offline(local_files_only)
        within = "" if folder == snapshot else f"{folder.relative_to(snapshot).as_posix()}/"  # 0_Transformer/
        preferred, fallback = ([within + pattern for pattern in group] for group in WEIGHT_FILES[kind])
        snapshot = snapshot_files(repo_id, preferred, **where)
        if not _weights_in(snapshot / within, kind) and not offline:
            snapshot = snapshot_files(repo_id, fallback, **where)
        if not _weights_in(snapshot / within, kind):
            _refuse_broken_weights(snapshot / within, kind)
            raise FileNotFoundError(
                f"{repo_id!r} (revision {revision or 'main'!r}): the snapshot {snapshot} in the Hugging Face cache "
                f"{cache_dir_for(cache_dir)} holds no weights (looked for {preferred + fallback})"
                f"{' and downloading is off' if offline else ''}"
            )
    return source


# ---------------------------------------------------------------------------------------------------- the Hub
def snapshot_files(
    repo_id: str,
    patterns: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The snapshot folder of a Hub model holding (at least) its files that match ``patterns``; :func:`resolve_source`
    fetches the JSON/text files first, then the weights of the snapshot's kind, safetensors preferred.

    Raises:
        FileNotFoundError: the id or revision does not exist, or is not in the cache while offline; the message
            names the id, the revision and the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = cache_dir_for(cache_dir), is_offline(local_files_only)
    where = f"{repo_id!r} (revision {revision or 'main'!r})"
    try:
        with hub_offline(offline):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                local_files_only=offline,
                token=token,
                allow_patterns=list(patterns),
            )
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{where}: the Hugging Face Hub has no such revision of this model") from e
    except GatedRepoError as e:
        raise FileNotFoundError(f"{where}: a gated model; accept its terms on the Hub and pass token=") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{where}: no such model on the Hugging Face Hub (or a private one: pass token=)"
        ) from e
    except LocalEntryNotFoundError as e:
        unreachable = "" if offline else f" (the Hub could not be reached: {_root_cause(e)})"
        raise FileNotFoundError(
            f"{where} is not in the Hugging Face cache {cache} (or only in part) and {why_missing(offline)}"
            f"{unreachable}; download it once online (huggingface-cli download {repo_id}) or point HF_HUB_CACHE / "
            "cache_dir at the cache holding it"
        ) from e
    return Path(folder)


def _root_cause(error: BaseException) -> str:
    """The first cause of a chain of errors in one line: the OS's reason (``Name or service not known``) where it
    has one, else its type and first line (huggingface_hub's and httpx's own messages run over several lines)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _weights_in(folder: Path, kind: str) -> bool:
    return any(any(folder.glob(pattern)) for group in WEIGHT_FILES[kind] for pattern in group)


def _is_weights_file(name: str, kind: str) -> bool:
    """Whether a file name is one of a ``kind`` folder's weights files (:data:`WEIGHT_FILES`)."""
    return any(fnmatch.fnmatch(name, pattern) for group in WEIGHT_FILES[kind] for pattern in group)


def _refuse_broken_weights(folder: Path, kind: str) -> None:
    """A FileNotFoundError naming the link when a folder's only weights are links to deleted files (a Hugging Face
    cache snapshot whose blobs were deleted), rather than "no weights"."""
    if kind in WEIGHT_FILES and not _weights_in(folder, kind):
        for entry in folder.iterdir():
            if _is_weights_file(entry.name, kind):
                refuse_broken_link(entry)


def folder_kind(folder: str | os.PathLike, config: Any = None) -> str | None:
    """What a local folder holds, from its config files alone: ``hf`` (a Hugging Face ``config.json`` with a
    ``model_type``), ``mmformer`` (our config.json), ``timm`` (timm's config.json with an ``architecture``),
    ``open_clip`` (an ``open_clip_config.json``), or None. ``config``: its ``config.json`` already read."""
    folder = Path(folder)
    if isinstance(config, dict):
        if "model_type" in config:
            return "hf"
        if "architecture" in config:
            return "timm"
        if "stacks" in config or "format_version" in config:
            return "mmformer"
    if is_open_clip_folder(folder):
        return "open_clip"
    return None


def is_open_clip_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder holds an open_clip model (its ``open_clip_config.json``), whatever else it holds."""
    return (Path(folder) / OPEN_CLIP_CONFIG).is_file()


def read_json(path: Path) -> Any:
    """A JSON file's content, None when the file is missing; a ValueError naming it when it is not JSON, a
    FileNotFoundError when it is a link to a file that is gone (:func:`refuse_broken_link`)."""
    if not path.is_file():
        refuse_broken_link(path)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def refuse_broken_link(path: Path) -> None:
    """A FileNotFoundError naming ``path`` if it is a symbolic link whose target is gone: in a Hugging Face cache, a
    snapshot's file whose blob was deleted, which is no missing file but a broken cache entry."""
    if os.path.islink(path) and not path.exists():
        target = Path(path.parent, os.readlink(path))
        raise FileNotFoundError(
            f"{path}: a link to {os.path.normpath(target)}, which is missing; in a Hugging Face cache this is a broken "
            "entry (its blob was deleted): download the model again (online, or huggingface-cli download ORG/NAME), "
            "or delete its snapshot folder"
        )
