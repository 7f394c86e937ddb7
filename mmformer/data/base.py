"""The map-style data set shared by every file-based format.

Each reader (manifest, COCO, LibriSpeech, ImageFolder) only parses its index into a list of :class:`Record`;
:class:`RecordDataset` loads a record's files through the :class:`~mmformer.Processor` (so training sees the
same pixels and waveforms as inference), skips bad ones and counts them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from mmformer.data.io import SampleError, clean_text, is_valid_text
from mmformer.data.skipping import BadSampleTracker

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

MEDIA = ("image", "audio")
MODALITIES = ("image", "audio", "text")


@dataclass
class Record:
    """One sample before loading: file paths and raw field values."""

    source: str  # what messages call the sample: its main file, or index file and line
    image: str | None = None  # absolute path
    audio: str | None = None
    text: Any = None  # raw caption/transcript; checked (non-empty str) when loaded
    label: int | None = None
    duration: float | None = None  # audio seconds, where the index states it (token budgets read it)
    row: str | None = None  # where the index lists it ("manifest:line"), where that is not its source
    error: str | None = None  # why the index entry itself is unusable (a manifest line that is not JSON)

    def text_name(self) -> str:
        """How messages about its text name it: its file and, where the text comes from an index, the index line
        (the line to fix)."""
        return self.source if self.row in (None, self.source) else f"{self.source} ({self.row})"


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"modalities: expected a non-empty subset of {list(MODALITIES)}; got {list(modalities)}")
    return tuple(modalities)


def pick_fields(name: str, modalities: Sequence[str], available: set[str]) -> tuple[str, ...]:
    """The fields to load: the requested media the source has, plus text/label whenever it has them."""
    modalities = check_modalities(modalities)
    media = [m for m in MEDIA if m in modalities and m in available]
    if "text" in modalities and "text" not in available:
        raise ValueError(f"{name}: modalities include 'text' but it has no text/caption/transcript field")
    if not media and "text" not in modalities:
        raise ValueError(f"{name}: none of modalities={list(modalities)} is available; it has {sorted(available)}")
    return (*media, *[f for f in ("text", "label") if f in available])


def default_processor(processor: Processor | None) -> Processor:
    if processor is not None:
        return processor
    from mmformer.preprocess.processor import Processor

    return Processor()


def resolve(path: str, root: str | os.PathLike) -> str:
    """A path from an index file: absolute as is, relative to ``root`` otherwise."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


class RecordDataset(Dataset):
    """Loads :class:`Record` s; a bad one becomes ``None`` (dropped by the :class:`~mmformer.data.Collator`).

    Args:
        records: the samples' paths and fields.
        name: the data set, for messages.
        fields: which fields to load, among ``image``, ``audio``, ``text``, ``label``.
        processor: image transform and audio loader (default: ``Processor()``).
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
        classes: class names, when records carry integer labels.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        name: str,
        fields: Sequence[str],
        processor: Processor | None = None,
        max_bad_fraction: float = 0.1,
        classes: list[str] | None = None,
    ):
        self.records = records
        self.name = name
        self.fields = tuple(fields)
        self.processor = default_processor(processor)
        self.tracker = BadSampleTracker(name, max_bad_fraction)
        self.classes = classes

    @property
    def num_bad(self) -> int:
        return self.tracker.num_bad

    @property
    def num_seen(self) -> int:
        return self.tracker.num_seen

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        """The valid texts of every record, in order, without loading any media (for tokenizer training)."""
        return [r.text.strip() for r in self.records if is_valid_text(r.text)]

    def load(self, record: Record) -> dict[str, Any]:
        """The sample dict of one record; raises SampleError if anything is wrong with it."""
        if record.error is not None:
            raise SampleError(record.source, record.error)
        sample: dict[str, Any] = {"source": record.source}
        if "text" in self.fields:  # cheapest check first
            sample["text"] = clean_text(record.text, record.text_name())
        for field in MEDIA:
            if field not in self.fields:
                continue
            path = getattr(record, field)
            if not path:
                raise SampleError(record.source, f"no {field} path")
            load = self.processor.load_image if field == "image" else self.processor.load_audio
            sample[field] = load(path, name=path)
        if "label" in self.fields:  # optional: a sample without one has None (as a Hugging Face dataset's row)
            sample["label"] = None if record.label is None else int(record.label)
        return sample

    def cache_in_memory(self) -> None:
        """Keep every decoded sample after its first load: for small data sets (like data/digits) whose decoding
        (audio resampling especially) would otherwise cost more than the training step. Each DataLoader worker
        keeps its own copy, so use it with few workers."""
        self._cache: dict[int, dict[str, Any] | None] = {}

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        cache = getattr(self, "_cache", None)
        if cache is not None and index in cache:
            return cache[index]
        try:
            sample = self.load(self.records[index])
        except SampleError as e:
            self.tracker.bad(e)
            sample = None
        else:
            self.tracker.good()
        if cache is not None:
            cache[index] = sample
        return sample
