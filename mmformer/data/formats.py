"""Opening a data set from a path: format detection and one constructor per format."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import ConcatDataset, Dataset

from mmformer.data.coco import CocoCaptions
from mmformer.data.folders import ImageFolder, LibriSpeech
from mmformer.data.manifest import MANIFEST_EXTENSIONS, ManifestDataset
from mmformer.data.shards import ShardDataset
from mmformer.data.text import TEXT_EXTENSIONS, TextDocuments

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

FORMATS = ("manifest", "coco", "webdataset", "librispeech", "imagefolder", "text")


def detect_format(path: str | os.PathLike) -> str:
    """``.jsonl/.csv/.tsv`` manifest; ``.json`` COCO; ``.tar`` or a brace pattern WebDataset; ``.txt`` plain text
    documents; a folder with ``*.trans.txt`` files LibriSpeech; any other folder ImageFolder (a folder of ``.txt``
    documents needs ``format: text``)."""
    text = str(path)
    if (
        "{" in text
        or "::" in text
        or "://" in text
        or text.startswith("pipe:")
        or text.endswith((".tar", ".tgz", ".tar.gz"))
    ):
        return "webdataset"
    p = Path(path)
    if p.suffix.lower() in MANIFEST_EXTENSIONS:
        return "manifest"
    if p.suffix.lower() == ".json":
        return "coco"
    if p.suffix.lower() in TEXT_EXTENSIONS:
        return "text"
    if p.is_dir():
        # LibriSpeech keeps transcripts 2 levels below a split folder (SPEAKER/CHAPTER/); look up to 4 levels deep
        for depth in range(5):
            if next(p.glob("*/" * depth + "*.trans.txt"), None) is not None:
                return "librispeech"
        return "imagefolder"
    if not p.exists():
        raise FileNotFoundError(f"data path {text} does not exist")
    raise ValueError(
        f"data path {text}: cannot tell its format; expected a .jsonl/.csv/.tsv manifest, a COCO .json, .tar shards, "
        f"a LibriSpeech folder or an ImageFolder folder (or set format: to one of {list(FORMATS)})"
    )


def open_dataset(
    paths: str | Sequence[str],
    *,
    format: str | None = None,
    modalities: Sequence[str] = ("image", "audio"),
    processor: Processor | None = None,
    max_duration: float | None = None,
    max_bad_fraction: float = 0.1,
    shuffle: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    text_documents: str = "file",
) -> Dataset:
    """One data set from one or several paths of the same format (several map-style sets are concatenated).

    ``shuffle``/``shuffle_buffer``/``seed`` apply to WebDataset shards only (map-style sets are shuffled by
    the DataLoader's sampler); ``max_duration`` to manifests only; ``text_documents`` (``file`` or ``line``: what
    one document is) to plain text only.

    ``format="text"`` reads documents: ``.txt`` files and folders of them; a ``.jsonl``/``.csv``/``.tsv`` manifest's
    text column (a row is a document); WebDataset shards' text members (a sample is a document; see
    :class:`~mmformer.data.TextDocuments`).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    if not paths:
        raise ValueError("paths: expected at least one data path; got an empty list")
    formats = [format or detect_format(p) for p in paths]
    if any(f not in FORMATS for f in formats):
        raise ValueError(f"format: expected one of {list(FORMATS)}; got {format!r}")
    if len(set(formats)) > 1:
        raise ValueError(f"paths: expected paths of one format; got {dict(zip(paths, formats))}")
    kind = formats[0]
    medium = {"coco": "image", "librispeech": "audio", "imagefolder": "image"}.get(kind)
    if medium is not None and medium not in modalities:
        raise ValueError(f"modalities: {kind} data ({paths[0]}) holds {medium}s; got modalities={list(modalities)}")
    common = {"processor": processor, "max_bad_fraction": max_bad_fraction}
    if kind == "text":  # text from shards: their text members, each sample one document
        shards = [detect_format(p) == "webdataset" for p in paths]
        if any(shards) and not all(shards):
            raise ValueError(f"paths: format text reads shards or files, not both in one split; got {paths}")
        if all(shards):
            kind, modalities = "webdataset", ("text",)
    if kind == "webdataset":
        return ShardDataset(
            paths, modalities=modalities, shuffle=shuffle, shuffle_buffer=shuffle_buffer, seed=seed, **common
        )
    datasets = []
    for p in paths:
        if kind == "manifest":
            datasets.append(ManifestDataset(p, modalities=modalities, max_duration=max_duration, **common))
        elif kind == "coco":
            datasets.append(CocoCaptions(p, **common))
        elif kind == "librispeech":
            datasets.append(LibriSpeech(p, **common))
        elif kind == "text":
            datasets.append(TextDocuments(p, unit=text_documents))
        else:
            datasets.append(ImageFolder(p, **common))
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def dataset_texts(dataset: Dataset) -> list[str]:
    """All texts of a data set (for tokenizer training), without loading media."""
    if isinstance(dataset, ConcatDataset):
        return [t for d in dataset.datasets for t in dataset_texts(d)]
    texts = getattr(dataset, "texts", None)
    if texts is None:
        raise TypeError(f"cannot list the texts of a {type(dataset).__name__}")
    return texts()
