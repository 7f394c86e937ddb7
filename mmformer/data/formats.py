"""Opening a data set from a path: format detection and one constructor per format."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import ConcatDataset, Dataset

from mmformer.data.base import MEDIA, RecordDataset
from mmformer.data.coco import CocoCaptions
from mmformer.data.folders import ImageFolder, LibriSpeech
from mmformer.data.io import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, is_missing_text
from mmformer.data.manifest import MANIFEST_EXTENSIONS, ManifestDataset
from mmformer.data.shards import ShardDataset
from mmformer.data.text import TEXT_EXTENSIONS, TextDocuments

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

FORMATS = ("manifest", "coco", "webdataset", "librispeech", "imagefolder", "text")
SEARCH_DEPTH = 4  # folder levels searched for LibriSpeech transcripts (2 below a split folder) and for media files


def detect_format(path: str | os.PathLike) -> str:
    """``.jsonl/.csv/.tsv`` manifest; ``.json`` COCO; ``.tar`` or a brace pattern WebDataset; ``.txt`` plain text
    documents; a folder with ``*.trans.txt`` files (up to ``SEARCH_DEPTH`` levels down) LibriSpeech; any other folder
    ImageFolder (a folder of ``.txt`` documents needs ``format: text``), except one that holds audio files and no
    images: a ValueError saying that its transcripts are missing."""
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
        if _find_file(p, (".trans.txt",)) is not None:
            return "librispeech"
        if _find_file(p, IMAGE_EXTENSIONS) is None:  # no ImageFolder either: if it holds audio, say what it lacks
            audio = _find_file(p, AUDIO_EXTENSIONS, depth=None)
            if audio is not None:
                raise ValueError(_no_transcripts(p, audio))
        return "imagefolder"
    if not p.exists():
        raise FileNotFoundError(f"data path {text} does not exist")
    raise ValueError(
        f"data path {text}: cannot tell its format; expected a .jsonl/.csv/.tsv manifest, a COCO .json, .tar shards, "
        f"a LibriSpeech folder or an ImageFolder folder (or set format: to one of {list(FORMATS)})"
    )


def _find_file(folder: Path, suffixes: tuple[str, ...], depth: int | None = SEARCH_DEPTH) -> Path | None:
    """The first file below ``folder`` (up to ``depth`` levels, the shallowest first; None: any depth) whose name
    ends with one of ``suffixes``."""
    patterns = ["**/*"] if depth is None else ["*/" * d + "*" for d in range(depth + 1)]
    for pattern in patterns:
        files = (f for f in folder.glob(pattern) if f.name.lower().endswith(suffixes) and f.is_file())
        found = next(files, None)
        if found is not None:
            return found
    return None


def _no_transcripts(folder: Path, audio: Path) -> str:
    """Why a folder of audio files is not a LibriSpeech folder: no ``*.trans.txt`` within the levels searched (read as
    an ImageFolder, it was said to "hold images"), and where one lies deeper, where."""
    deeper = _find_file(folder, (".trans.txt",), depth=None)
    fix = (
        f"one lies deeper ({deeper}): give a folder at most {SEARCH_DEPTH} levels above it, or set format: "
        "librispeech (read at any depth)"
        if deeper is not None
        else "LibriSpeech keeps SPEAKER-CHAPTER.trans.txt beside its .flac files; for other audio give a manifest "
        "(audio_filepath, text)"
    )
    return (
        f"data path {folder}: no *.trans.txt transcripts found within {SEARCH_DEPTH} levels under it, though it "
        f"holds audio files ({audio}); {fix}"
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
    text_optional: bool = False,
) -> Dataset:
    """One data set from one or several paths of the same format (several map-style sets are concatenated).

    ``shuffle``/``shuffle_buffer``/``seed`` apply to WebDataset shards only (map-style sets are shuffled by
    the DataLoader's sampler); ``max_duration`` to manifests only; ``text_documents`` (``file`` or ``line``: what
    one document is) to plain text only.

    ``format="text"`` reads documents: ``.txt`` files and folders of them; a ``.jsonl``/``.csv``/``.tsv`` manifest's
    text column (a row is a document); WebDataset shards' text members (a sample is a document; see
    :class:`~mmformer.data.TextDocuments`).

    ``text_optional`` (prediction data): when some rows have no text, every row is read without its text rather than
    those skipped as bad samples (see :func:`_leave_out_partial_texts`).
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
            datasets.append(TextDocuments(p, unit=text_documents, max_bad_fraction=max_bad_fraction))
        else:
            datasets.append(ImageFolder(p, **common))
    if text_optional:
        _leave_out_partial_texts(datasets)
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def _leave_out_partial_texts(datasets: list[Dataset]) -> None:
    """Prediction data, whose texts are optional: when some of its rows have none, every row is read without its text,
    with a warning saying how many lacked one, so that each row is predicted alike instead of those without one being
    skipped as bad samples (a batch's samples carry the same fields, and text features line up row by row with the
    predictions). Data with no medium to predict from keeps its texts (a row without one is a bad sample, as in
    training); WebDataset shards too (streamed: their rows are not known ahead)."""
    with_text = [d for d in datasets if isinstance(d, RecordDataset) and "text" in d.fields]
    if not with_text or any(not set(d.fields) & set(MEDIA) for d in with_text):
        return
    missing = sum(r.error is None and is_missing_text(r.text) for d in with_text for r in d.records)
    if not missing:
        return
    warnings.warn(
        f"{missing} of {sum(len(d) for d in with_text)} rows of {', '.join(d.name for d in with_text)} have no text: "
        "every row is read without its text (no text features, no text in the predictions); give each row a text "
        "to have them",
        stacklevel=3,
    )
    for d in with_text:
        d.fields = tuple(f for f in d.fields if f != "text")


def dataset_texts(dataset: Dataset) -> list[str]:
    """All texts of a data set (for tokenizer training), without loading media."""
    if isinstance(dataset, ConcatDataset):
        return [t for d in dataset.datasets for t in dataset_texts(d)]
    texts = getattr(dataset, "texts", None)
    if texts is None:
        raise TypeError(f"cannot list the texts of a {type(dataset).__name__}")
    return texts()
