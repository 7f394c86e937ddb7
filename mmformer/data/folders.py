"""Folder layouts: LibriSpeech (speech + transcripts) and ImageFolder (one folder per class)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmformer.data.base import Record, RecordDataset
from mmformer.data.io import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor


class LibriSpeech(RecordDataset):
    """``SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac`` with ``SPEAKER-CHAPTER.trans.txt`` (lines ``UTT-ID TEXT``).

    Args:
        root: a split folder (e.g. ``LibriSpeech/train-clean-100``) or any folder above the ``*.trans.txt`` files.
        processor: audio loader (default: ``Processor()``).
        lowercase: lower-case the (upper-case) transcripts.
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        processor: Processor | None = None,
        lowercase: bool = True,
        max_bad_fraction: float = 0.1,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"LibriSpeech root {self.root} is not a folder")
        records = []
        for trans in sorted(self.root.rglob("*.trans.txt")):
            # bytes that are not UTF-8 spoil only their own utterance, refused when it is loaded (see clean_text)
            for line in trans.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = str(trans.parent / f"{utt}.flac")
                records.append(Record(source=audio, audio=audio, text=text.lower() if lowercase else text))
        if not records:
            raise ValueError(f"LibriSpeech root {self.root}: no *.trans.txt transcripts found below it")
        super().__init__(
            records,
            name=str(self.root),
            fields=("audio", "text"),
            processor=processor,
            max_bad_fraction=max_bad_fraction,
        )


class ImageFolder(RecordDataset):
    """``root/CLASS/*.png`` (any image extension): class = folder name, classes sorted, for zero-shot evaluation.

    Samples carry ``image`` and ``label`` (the index into :attr:`classes`); with ``text_template`` (e.g.
    ``"a photo of a {}."``) they also carry the class name in that template as ``text``.

    Args:
        root: the folder of class folders.
        processor: image transform (default: ``Processor()``).
        text_template: optional caption template for the class name.
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        processor: Processor | None = None,
        text_template: str | None = None,
        max_bad_fraction: float = 0.1,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a folder")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"ImageFolder root {self.root}: expected one folder per class; found none")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        records = []
        for label, name in enumerate(self.classes):
            for f in sorted((self.root / name).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    text = text_template.format(name) if text_template is not None else None
                    records.append(Record(source=str(f), image=str(f), text=text, label=label))
        if not records:
            raise ValueError(f"ImageFolder root {self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        fields = ("image", "text", "label") if text_template is not None else ("image", "label")
        super().__init__(
            records,
            name=str(self.root),
            fields=fields,
            processor=processor,
            max_bad_fraction=max_bad_fraction,
            classes=self.classes,
        )
