"""Manifests: one row per sample in a CSV, TSV or JSONL file (format by extension).

Columns are found by alias, first match wins:

    image   image | image_path | filepath | file_name
    audio   audio_filepath | audio | audio_path
    either  path  (Common Voice's audio, other sets' images: audio when every value has an audio extension, an
            image when every one has an image extension, else the one medium ``modalities`` asks for)
    text    text | caption | transcript | sentence
    label   label | class | category  (optional: a row without one has label None)
    duration (seconds, optional; rows longer than ``max_duration`` are dropped, as NeMo does)

Relative paths resolve against the manifest's folder (or ``root``). One manifest may carry images and audio;
``modalities`` picks what to load. NeMo audio manifests (``audio_filepath``, ``text``, ``duration``) and the
embedded ``data/digits/*.jsonl`` are both manifests.

TSV files are read without quoting (``csv.QUOTE_NONE``, as Common Voice and CC3M write them): a ``"`` in a caption
is a character of the caption. CSV files use the usual CSV quoting. A JSONL line that is not a JSON object (a
truncated last line, say) is a bad sample, skipped with a warning naming ``manifest:line`` when it is loaded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmformer.data.base import MEDIA, Record, RecordDataset, check_modalities, pick_fields, resolve
from mmformer.data.io import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

log = logging.getLogger(__name__)
COLUMNS = {
    "image": ("image", "image_path", "filepath", "file_name"),
    "audio": ("audio_filepath", "audio", "audio_path"),
    "text": ("text", "caption", "transcript", "sentence"),
    "label": ("label", "class", "category"),
}
EITHER_COLUMN = "path"  # images or audio, told apart by the files' extensions (see the module notes)
MANIFEST_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}


class BadRow(str):
    """A manifest line that is not a row (invalid JSON, not an object): the reason, with its line in ``iter_rows``."""


def iter_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any] | BadRow]]:
    """``(line, row)`` for each row of a CSV/TSV (header required) or JSONL file; ``line`` is the row's line in the
    file (its last line, for a CSV row spanning several). A JSONL line that is not a JSON object comes as a
    :class:`BadRow` (its reason), so that one bad line costs one sample, not the data set.

    The file is read as UTF-8 (a byte-order mark, as Excel writes, is skipped); bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``), so that they affect only their own row: a path still names the same file,
    and a caption is refused when its sample is loaded (see :func:`~mmformer.data.io.clean_text`). TSV is read with
    quoting off (``csv.QUOTE_NONE``): a ``"`` inside a field is kept, and cannot swallow the rows after it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_EXTENSIONS:
        raise ValueError(f"manifest {path}: expected a {'/'.join(MANIFEST_EXTENSIONS)} file; got {suffix or 'none'}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    delimiter = MANIFEST_EXTENSIONS[suffix]
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if delimiter is not None:
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
            return [(reader.line_num, row) for row in reader]
        rows: list[tuple[int, dict[str, Any] | BadRow]] = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((lineno, BadRow(f"not valid JSON ({e})")))
                continue
            rows.append((lineno, row if isinstance(row, dict) else BadRow(f"not a JSON object ({type(row).__name__})")))
        return rows


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV or JSONL file as dicts (see :func:`iter_rows`); a bad JSONL line is a ValueError."""
    rows = []
    for lineno, row in iter_rows(path):
        if isinstance(row, BadRow):
            raise ValueError(f"manifest {path}, line {lineno}: {row}")
        rows.append(row)
    return rows


def find_columns(rows: list[dict[str, Any]], modalities: Sequence[str] = ("image", "audio")) -> dict[str, str]:
    """Field → column name, for the fields whose aliases occur in the rows; a ``path`` column becomes the image or
    the audio column by its files' extensions, else by ``modalities`` (see the module notes)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    found = {}
    for field, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in keys and alias not in found.values():
                found[field] = alias
                break
    if EITHER_COLUMN in keys:
        field = _path_medium(rows, [m for m in MEDIA if m not in found], modalities)
        if field is not None:
            found[field] = EITHER_COLUMN
    return found


def _path_medium(rows: list[dict[str, Any]], free: list[str], modalities: Sequence[str]) -> str | None:
    """Which medium (among ``free``, those without a column of their own) a ``path`` column holds."""
    suffixes = {os.path.splitext(str(r[EITHER_COLUMN]))[1].lower() for r in rows if r.get(EITHER_COLUMN)}
    for medium, extensions in (("audio", AUDIO_EXTENSIONS), ("image", IMAGE_EXTENSIONS)):
        if suffixes and suffixes <= set(extensions):
            return medium if medium in free else None
    wanted = [m for m in free if m in modalities]
    return wanted[0] if len(wanted) == 1 else None


def label_indices(values: list[Any]) -> tuple[list[int | None], list[str] | None]:
    """Integer labels as they are; any other labels → indices into their sorted names (returned as classes)."""

    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in values]
    if all(i is not None for i in ints):
        return ints, None
    classes = sorted({str(v) for v in values if v not in (None, "")})
    index = {c: i for i, c in enumerate(classes)}
    return [index.get(str(v)) if v not in (None, "") else None for v in values], classes


class ManifestDataset(RecordDataset):
    """Image–text / audio–text (or both) samples listed in a CSV, TSV or JSONL manifest.

    Args:
        path: the manifest.
        modalities: which media to load, among those the manifest has (``text`` here makes text required).
        root: folder that relative paths resolve against (default: the manifest's folder).
        processor: image transform and audio loader (default: ``Processor()``).
        max_duration: drop rows whose ``duration`` column exceeds this many seconds.
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        modalities: Sequence[str] = ("image", "audio"),
        root: str | os.PathLike | None = None,
        processor: Processor | None = None,
        max_duration: float | None = None,
        max_bad_fraction: float = 0.1,
    ):
        self.path = Path(path)
        lines = iter_rows(self.path)
        rows = [row for _, row in lines if not isinstance(row, BadRow)]
        if not rows:
            bad = [(lineno, row) for lineno, row in lines if isinstance(row, BadRow)]
            why = f": {self.path}, line {bad[0][0]}: {bad[0][1]}" if bad else ""
            raise ValueError(f"manifest {self.path} has no rows{why}")
        columns = find_columns(rows, check_modalities(modalities))
        fields = pick_fields(str(self.path), modalities, set(columns))
        root = Path(root) if root is not None else self.path.parent
        labels, classes = label_indices([r.get(columns["label"]) for r in rows]) if "label" in columns else ([], None)
        records, self.num_filtered = [], 0
        good = 0  # index into rows (and labels)
        for lineno, row in lines:
            where = f"{self.path}:{lineno}"
            if isinstance(row, BadRow):  # skipped (and counted) when loaded, like any bad sample
                records.append(Record(source=where, row=where, error=str(row)))
                continue
            label = labels[good] if labels else None
            good += 1
            if max_duration is not None and _float(row.get("duration")) > max_duration:
                self.num_filtered += 1
                continue
            paths = {m: resolve(row[columns[m]], root) if row.get(columns.get(m, "")) else None for m in MEDIA}
            main = next((paths[m] for m in MEDIA if m in fields and paths[m]), None)
            records.append(
                Record(
                    source=main or where,
                    image=paths["image"],
                    audio=paths["audio"],
                    text=row.get(columns["text"]) if "text" in columns else None,
                    label=label,
                    duration=_float(row["duration"]) if row.get("duration") not in (None, "") else None,
                    row=where,
                )
            )
        if self.num_filtered:
            log.info("%s: dropped %d rows longer than max_duration=%s s", self.path, self.num_filtered, max_duration)
        super().__init__(
            records,
            name=str(self.path),
            fields=fields,
            processor=processor,
            max_bad_fraction=max_bad_fraction,
            classes=classes,
        )


def _float(value: Any) -> float:
    """A duration cell as seconds; missing or unparsable → 0 (the row is kept)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
