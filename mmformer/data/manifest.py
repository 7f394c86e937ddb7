"""Manifests: one row per sample in a CSV, TSV or JSONL file (format by extension).

Columns are found by alias, first match wins:

    image   image | image_path | filepath | file_name | path
    audio   audio_filepath | audio | audio_path
    text    text | caption | transcript | sentence
    label   label | class | category
    duration (seconds, optional; rows longer than ``max_duration`` are dropped, as NeMo does)

Relative paths resolve against the manifest's folder (or ``root``). One manifest may carry images and audio;
``modalities`` picks what to load. NeMo audio manifests (``audio_filepath``, ``text``, ``duration``) and the
embedded ``data/digits/*.jsonl`` are both manifests.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmformer.data.base import Record, RecordDataset, pick_fields, resolve

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

log = logging.getLogger(__name__)
COLUMNS = {
    "image": ("image", "image_path", "filepath", "file_name", "path"),
    "audio": ("audio_filepath", "audio", "audio_path"),
    "text": ("text", "caption", "transcript", "sentence"),
    "label": ("label", "class", "category"),
}
MANIFEST_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV (header required) or JSONL file as dicts.

    The file is read as UTF-8 (a byte-order mark, as Excel writes, is skipped); bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``), so that they affect only their own row: a path still names the same file,
    and a caption is refused when its sample is loaded (see :func:`~mmformer.data.io.clean_text`).
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
            return list(csv.DictReader(f, delimiter=delimiter))
        rows = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {path}, line {lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"manifest {path}, line {lineno}: expected a JSON object; got {type(row).__name__}")
            rows.append(row)
        return rows


def find_columns(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Field → column name, for the fields whose aliases occur in the rows."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    found = {}
    for field, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in keys and alias not in found.values():
                found[field] = alias
                break
    return found


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
        rows = read_rows(self.path)
        if not rows:
            raise ValueError(f"manifest {self.path} has no rows")
        columns = find_columns(rows)
        fields = pick_fields(str(self.path), modalities, set(columns))
        root = Path(root) if root is not None else self.path.parent
        labels, classes = label_indices([r.get(columns["label"]) for r in rows]) if "label" in columns else ([], None)
        records, self.num_filtered = [], 0
        for lineno, row in enumerate(rows, 1):
            if max_duration is not None and _float(row.get("duration")) > max_duration:
                self.num_filtered += 1
                continue
            paths = {
                m: resolve(row[columns[m]], root) if row.get(columns.get(m, "")) else None for m in ("image", "audio")
            }
            main = next((paths[m] for m in ("image", "audio") if m in fields and paths[m]), None)
            records.append(
                Record(
                    source=main or f"{self.path}:{lineno}",
                    image=paths["image"],
                    audio=paths["audio"],
                    text=row.get(columns["text"]) if "text" in columns else None,
                    label=labels[lineno - 1] if labels else None,
                    duration=_float(row["duration"]) if row.get("duration") not in (None, "") else None,
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
