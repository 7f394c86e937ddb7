"""Text-only data for language modelling: documents from plain ``.txt`` files, and document packing.

- :class:`TextDocuments`: the documents of ``.txt`` files (or of folders of them): each file is one document, or each
  non-empty line is (``unit="line"``); or of a ``.jsonl``/``.csv``/``.tsv`` manifest: each row's text column
  (``text``/``caption``/``transcript``/``sentence``) is one document. WebDataset shards are read for ``format: text``
  by :class:`~mmformer.data.ShardDataset` with ``modalities=["text"]`` (each sample's text member is one document).
  A ``.json`` file or a tar shard given to :class:`TextDocuments` itself is refused.
- :func:`pack_documents`: tokenize every document (with the tokenizer's bos/eos around it), concatenate them and cut
  the stream into blocks of ``block_size`` tokens (Hugging Face's ``group_texts``, nanoGPT's token stream). Each
  sample is ``{"input_ids": (L,), "document_ids": (L,), "source": str}``: ``document_ids`` numbers the documents
  within the block, so that ``packed_attention: document`` can keep them apart (see
  :mod:`mmformer.tasks.text_objectives`). Map-style data sets are packed once (:class:`PackedBlocks`); streamed ones
  (WebDataset) as they stream (:class:`PackedStream`).

Shape legend: L block size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, IterableDataset

from mmformer.data.io import SampleError, clean_text
from mmformer.data.manifest import MANIFEST_EXTENSIONS, BadRow, find_columns, iter_rows
from mmformer.data.skipping import BadSampleTracker
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

UNITS = ("file", "line")
TEXT_EXTENSIONS = (".txt",)
REFUSED = {  # files that are text-like but not plain text: read as such, a model would learn their syntax
    ".json": 'a JSON file is not plain text; give the texts as a .jsonl manifest (one {"text": ...} per line)',
    ".tar": "a WebDataset shard: open it with open_dataset(..., format='text'), which reads its text members",
}


def text_files(path: str | os.PathLike) -> list[Path]:
    """A ``.txt`` file, or the ``.txt`` files below a folder (sorted, recursively)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in TEXT_EXTENSIONS and f.is_file())
        if not files:
            raise FileNotFoundError(f"text data {os.fspath(p)!r}: the folder holds no .txt files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"text data {os.fspath(p)!r} does not exist")
    return [p]


def file_documents(
    path: str | os.PathLike, unit: str, tracker: BadSampleTracker | None = None
) -> list[tuple[str, str]]:
    """(text, source) of each non-empty document of a ``.txt`` file or folder: a file, or a line (``file:line``).
    A file that is not UTF-8 (or cannot be read) is skipped with a warning naming it, counted by ``tracker`` (each
    file one sample), which stops the reading once too many were bad."""
    tracker = BadSampleTracker(os.fspath(path)) if tracker is None else tracker
    documents = []
    for file in text_files(path):
        try:
            content = file.read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError) as e:
            tracker.bad(SampleError(file, f"cannot read text ({type(e).__name__}: {e})"))
            continue
        tracker.good()
        if unit == "file":
            pieces = [(content.strip(), f"{file}")]
        else:
            pieces = [(line.strip(), f"{file}:{n}") for n, line in enumerate(content.splitlines(), 1)]
        documents.extend((text, source) for text, source in pieces if text)
    return documents


def manifest_documents(path: str | os.PathLike, tracker: BadSampleTracker | None = None) -> list[tuple[str, str]]:
    """(text, ``manifest:line``) of each row of a manifest with a text; a blank one is skipped (as a blank line of a
    ``.txt`` file), any other row without a valid text with a warning naming its line, counted by ``tracker``."""
    tracker = BadSampleTracker(os.fspath(path)) if tracker is None else tracker
    lines = iter_rows(path)
    column = find_columns([row for _, row in lines if not isinstance(row, BadRow)]).get("text")
    if column is None:
        raise ValueError(f"text data {os.fspath(path)!r}: the manifest has no text/caption/transcript/sentence column")
    documents = []
    for lineno, row in lines:
        where = f"{os.fspath(path)}:{lineno}"
        try:
            if isinstance(row, BadRow):
                raise SampleError(where, str(row))
            if isinstance(row.get(column), str) and not row[column].strip():
                continue
            documents.append((clean_text(row.get(column), where), where))
        except SampleError as e:
            tracker.bad(e)
        else:
            tracker.good()
    return documents


class TextDocuments(Dataset):
    """Documents of plain-text files, read as UTF-8 (a byte-order mark is skipped), or of a manifest's text column.

    A file that is not UTF-8, or a manifest row without a valid text, is skipped with a warning naming it, as the
    other formats skip a bad sample (:class:`~mmformer.data.BadSampleTracker`: the reading stops once more than
    ``max_bad_fraction`` of them were bad).

    Args:
        path: a ``.txt`` file or a folder of them, or a ``.jsonl``/``.csv``/``.tsv`` manifest.
        unit: ``file`` (each file is one document) or ``line`` (each non-empty line is one); a manifest's rows are
            its documents either way.
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker` (a file, or a manifest row, is one sample).
    """

    def __init__(self, path: str | os.PathLike, *, unit: str = "file", max_bad_fraction: float = 0.1):
        if unit not in UNITS:
            raise ValueError(f"text_documents: expected one of {list(UNITS)}, got {unit!r}")
        self.name = os.fspath(path)
        suffix = Path(path).suffix.lower()
        kind = ".tar" if self.name.lower().endswith((".tar", ".tgz", ".tar.gz")) else suffix
        if kind in REFUSED:
            raise ValueError(f"text data {self.name!r}: {REFUSED[kind]}")
        tracker = BadSampleTracker(self.name, max_bad_fraction)
        if suffix in MANIFEST_EXTENSIONS:
            pieces = manifest_documents(path, tracker)
        else:
            pieces = file_documents(path, unit, tracker)
        self.documents = [text for text, _ in pieces]
        self.sources = [source for _, source in pieces]
        if not self.documents:
            raise ValueError(f"text data {self.name!r} holds no text")

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.documents[index], "source": self.sources[index]}

    def texts(self) -> list[str]:
        """Every document (for tokenizer training)."""
        return list(self.documents)


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids with the tokenizer's bos/eos, not truncated."""
    return [tokenizer.encode(t) for t in texts]


def _block(ids: list[int], documents: list[int], source: str) -> dict[str, Any]:
    first = documents[0]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "document_ids": torch.tensor([d - first for d in documents], dtype=torch.long),
        "source": source,
    }


def _check_block_size(block_size: Any) -> None:
    if not is_int(block_size) or block_size < 2:
        raise ValueError(f"block_size: expected an int >= 2 (tokens per packed block), got {block_size!r}")


class PackedBlocks(Dataset):
    """Documents tokenized, concatenated and cut into blocks of ``block_size`` tokens; the remainder shorter than a
    block is dropped (as ``group_texts`` does), unless the whole text is shorter than one block.

    Args:
        texts: the documents.
        tokenizer: turns each into ids (with its bos/eos).
        block_size: tokens per block (the model's context, ``TextConfig.max_length``).
        name: what sources call the data.
    """

    def __init__(self, texts: Iterable[str], tokenizer: Tokenizer, block_size: int, *, name: str = "text"):
        _check_block_size(block_size)
        self.block_size, self.name = block_size, name
        stream, documents = [], []
        for d, ids in enumerate(_tokenize(tokenizer, list(texts))):
            stream.extend(ids)
            documents.extend([d] * len(ids))
        if not stream:
            raise ValueError(f"{name}: no tokens to pack")
        self._ids = torch.tensor(stream, dtype=torch.int32)  # int32: a corpus of millions of tokens stays small
        self._documents = torch.tensor(documents, dtype=torch.int32)
        self._n = max(len(stream) // block_size, 1)

    @property
    def n_tokens(self) -> int:
        return int(self._ids.numel())

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._n:
            raise IndexError(f"block {index} of {self._n}")
        span = slice(index * self.block_size, (index + 1) * self.block_size)
        return _block(self._ids[span].tolist(), self._documents[span].tolist(), f"{self.name}:block {index}")

    def texts(self) -> list[str]:
        raise TypeError("the texts of packed blocks are their source data set's (pack after training a tokenizer)")


class PackedStream(IterableDataset):
    """Blocks of ``block_size`` tokens packed from a streamed data set's texts as they arrive (WebDataset shards);
    its epoch (for shuffling) passes through."""

    def __init__(self, dataset: IterableDataset, tokenizer: Tokenizer, block_size: int):
        _check_block_size(block_size)
        self.dataset, self.tokenizer, self.block_size = dataset, tokenizer, block_size
        self.name = getattr(dataset, "name", "stream")

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ids: list[int] = []
        documents: list[int] = []
        count = 0
        for d, sample in enumerate(self.dataset):
            text = sample.get("text") if sample is not None else None
            if not text:
                continue
            new = self.tokenizer.encode(text)
            ids.extend(new)
            documents.extend([d] * len(new))
            while len(ids) >= self.block_size:
                yield _block(ids[: self.block_size], documents[: self.block_size], f"{self.name}:block {count}")
                ids, documents, count = ids[self.block_size :], documents[self.block_size :], count + 1


def pack_documents(dataset: Dataset, tokenizer: Tokenizer, block_size: int) -> Dataset:
    """The blocks of ``block_size`` tokens of a data set's texts (see the module notes)."""
    if isinstance(dataset, IterableDataset):
        return PackedStream(dataset, tokenizer, block_size)
    from mmformer.data.formats import dataset_texts

    name = getattr(dataset, "name", None) or type(dataset).__name__
    return PackedBlocks(dataset_texts(dataset), tokenizer, block_size, name=str(name))
