"""WebDataset tar shards, streamed: for data that outgrows one machine's random access.

A shard is a tar of samples whose files share a key: ``000001.jpg`` + ``000001.txt``, ``000002.flac`` +
``000002.txt``, optionally ``000001.cls`` (an integer label). Shards are given as paths or brace patterns
(``data-{000000..000099}.tar``, several joined with ``::`` or passed as a list).

The `webdataset` package does the tar streaming and grouping; this module splits the work, shuffles and decodes:

- **split**: with at least as many shards as (ranks × DataLoader workers), each rank/worker reads its own
  shards (``shards[slot::slots]``); with fewer, every reader streams all shards and keeps every ``slots``-th
  sample. Either way each sample is read exactly once per epoch. Ranks come from ``torch.distributed`` when it
  is initialised (or the explicit ``rank``/``world_size`` arguments). For DDP, give every rank the same number
  of samples (equal-size shards, a shard count divisible by ranks × workers), or ranks will stop at different
  steps.
- **shuffle**: shard order by a seeded RNG shared by all ranks, then samples through a buffer of
  ``shuffle_buffer`` (per reader); call :meth:`set_epoch` (the DataModule does) for a new order each epoch.
- **bad samples**: an undecodable member or a missing field is skipped and counted as in the map-style sets.

Which fields a data set has is read from the member names of its first non-empty shard, as a manifest's from its
columns: a requested medium no member of that shard holds is not loaded (modalities [image, audio] over image–text
shards load images); one it holds is required of every sample, and a sample without it is a bad sample (named
``shard:key``), never the end of the whole medium. Text likewise (from ``.txt``/``.text``/``.caption``, or a
``.json`` member's ``"text"``/``"caption"``: the json counts when the first one of that shard has one); a label
(``.cls``) is optional, None where a sample has none. Empty shards are skipped with a warning; only a data set of
empty shards is an error.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmformer.data.base import MEDIA, default_processor, pick_fields
from mmformer.data.io import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, SampleError, clean_text
from mmformer.data.skipping import BadSampleTracker, SkippedSampleWarning

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor

EXTENSIONS = {  # the media the manifests read, so that one data set converted to shards reads the same
    "image": tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS),
    "audio": tuple(e.lstrip(".") for e in AUDIO_EXTENSIONS),
    "text": ("txt", "text", "caption"),
    "label": ("cls", "label"),
}
JSON_TEXT_KEYS = ("text", "caption")  # a .json member's fields that hold the caption (img2dataset writes "caption")
TEXT_MEMBERS = f".{', .'.join(EXTENSIONS['text'])} or a .json with {' or '.join(map(repr, JSON_TEXT_KEYS))}"


def _webdataset():
    """The `webdataset` package, imported on first use so the rest of mmformer.data works without it."""
    try:
        import webdataset
    except ImportError as e:  # pragma: no cover - it is a dependency of mmformer
        raise ImportError("reading WebDataset shards needs the webdataset package: pip install webdataset") from e
    return webdataset


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand a pattern (or ``::``-joined patterns, or a list of them) into shard paths/URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards = [s for p in patterns for s in _webdataset().shardlists.expand_urls(str(p))]
    if not shards:
        raise ValueError(f"shards: expected at least one shard path or pattern; got {urls!r}")
    return shards


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _member(sample: dict[str, Any], field: str) -> str | None:
    """The first extension present in a raw sample for ``field``."""
    return next((ext for ext in EXTENSIONS[field] if ext in sample), None)


def _json_text(data: bytes) -> str | None:
    """The caption of a .json member: its first ``JSON_TEXT_KEYS`` field; None when it has none (metadata)."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    return next((obj[k] for k in JSON_TEXT_KEYS if isinstance(obj, dict) and obj.get(k) is not None), None)


def _sample_text(raw: dict[str, Any], prefix: str) -> str:
    """The text of a raw sample (a text member, else its .json's caption); SampleError naming the member if none."""
    ext = _member(raw, "text")
    if ext is not None:
        name = f"{prefix}.{ext}"
        try:
            return clean_text(raw[ext].decode("utf-8"), name)
        except UnicodeDecodeError as e:
            raise SampleError(name, f"text is not UTF-8 ({e})") from e
    if "json" in raw:
        text = _json_text(raw["json"])
        if text is not None:
            return clean_text(text, f"{prefix}.json")
    # named by the sample: there is no text member to name
    raise SampleError(prefix, f"no text member (expected {TEXT_MEMBERS}) for this sample")


def _fields_of(suffixes: set[str], first_json: bytes | None) -> set[str]:
    """The fields a shard holds, from its members' suffixes (and its first .json, which may carry the text)."""
    fields = {f for f, exts in EXTENSIONS.items() if suffixes & set(exts)}
    if first_json is not None and _json_text(first_json) is not None:
        fields.add("text")
    return fields


class ShardDataset(IterableDataset):
    """Samples streamed from WebDataset tar shards.

    Args:
        shards: shard paths/URLs or brace patterns.
        modalities: media to load among those the shards hold (the members of the first non-empty shard; see the
            module notes).
        processor: image transform and audio loader (default: ``Processor()``).
        shuffle: shuffle shard order and samples (buffered).
        shuffle_buffer: samples held for shuffling, per reader.
        seed: base seed of both shuffles.
        rank, world_size: this process's share; default from ``torch.distributed`` (else 0 of 1).
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        modalities: Sequence[str] = ("image", "audio"),
        processor: Processor | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_fraction: float = 0.1,
    ):
        self.shards = expand_shards(shards)
        missing = [s for s in self.shards if _is_local(s) and not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(
                f"shards: {len(missing)} of {len(self.shards)} shard files not found: {missing[:5]}"
            )
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(
                f"rank and world_size: expected both or neither, 0 <= rank < world_size; got {rank}, {world_size}"
            )
        self.name = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} (+{len(self.shards) - 1} shards)"
        self.fields = pick_fields(self.name, modalities, self._available())
        self.processor = default_processor(processor)
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.tracker = BadSampleTracker(self.name, max_bad_fraction)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently for each epoch (same order on every rank for a given seed and epoch)."""
        self.epoch = epoch

    def _available(self) -> set[str]:
        """The fields of the first non-empty shard (empty ones skipped with a warning); ValueError if all are."""
        for url in self.shards:
            suffixes, first_json = self._members(url)
            if suffixes:
                return _fields_of(suffixes, first_json)
            _warn_empty(url)
        raise ValueError(f"shards: all {len(self.shards)} shards hold no samples: {self.shards[:5]}")

    def _members(self, url: str) -> tuple[set[str], bytes | None]:
        """The member suffixes of one shard and its first .json member: a local file's from the tar headers alone
        (seeking past the data), a remote one's by streaming it."""
        suffixes: set[str] = set()
        first_json = None
        if not _is_local(url):
            for raw in self._shard(url):
                suffixes.update(k for k in raw if not k.startswith("__"))
                first_json = raw.get("json") if first_json is None else first_json
            return suffixes, first_json
        split = _webdataset().tariterators.base_plus_ext
        try:
            with tarfile.open(url) as tar:
                for info in tar:
                    key, suffix = split(info.name) if info.isreg() else (None, None)
                    if key is None:
                        continue
                    suffixes.add(suffix.lower())
                    if suffix.lower() == "json" and first_json is None:
                        first_json = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as e:  # what was read so far still counts
            warnings.warn(f"shard {url}: cannot read past a point ({e})", SkippedSampleWarning, stacklevel=2)
        return suffixes, first_json

    def _shard(self, url: str, select=None) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard; its file is closed when they are read (or the generator is dropped)."""

        def handler(e: Exception) -> bool:  # a corrupt tar: skip the rest of it, say so
            warnings.warn(f"skipping the rest of a shard: {e}", SkippedSampleWarning, stacklevel=2)
            return True

        wds = _webdataset()
        try:
            stream = wds.gopen(url)
        except Exception as e:  # noqa: BLE001  (gopen raises whatever its opener does; the shard is skipped)
            warnings.warn(f"skipping shard {url}: cannot open it ({e})", SkippedSampleWarning, stacklevel=2)
            return
        try:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler, select)
            yield from wds.tariterators.group_by_keys(files, handler=handler)
        finally:
            stream.close()

    def _raw(self, shards: list[str], select=None) -> Iterator[dict[str, Any]]:
        """The raw samples of ``shards`` in turn; an empty shard is skipped with a warning naming it (not when
        ``select`` picks members: a shard may then hold none)."""
        for url in shards:
            count = 0
            for raw in self._shard(url, select):
                count += 1
                yield raw
            if count == 0 and select is None:
                _warn_empty(url)

    def _slot(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and DataLoader workers."""
        if self.world_size is not None:
            rank, world = self.rank, self.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        if len(shards) >= slots:
            samples = self._raw(shards[slot::slots])
        else:
            samples = islice(self._raw(shards), slot, None, slots)
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}-{slot}")
            samples = _webdataset().filters.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(
                samples
            )
        for raw in samples:
            try:
                sample = self.decode(raw)
            except SampleError as e:
                self.tracker.bad(e)
                continue
            self.tracker.good()
            yield sample

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw tar members of one key → a sample dict; raises SampleError naming ``shard:key.ext``."""
        prefix = f"{os.path.basename(raw.get('__url__', '?'))}:{raw['__key__']}"
        sample: dict[str, Any] = {"source": prefix}
        if "text" in self.fields:
            sample["text"] = _sample_text(raw, prefix)
        for field in MEDIA:
            if field not in self.fields:
                continue
            ext = _member(raw, field)
            if ext is None:
                raise SampleError(prefix, f"no {field} member (.{' / .'.join(EXTENSIONS[field])})")
            load = self.processor.load_image if field == "image" else self.processor.load_audio
            sample[field] = load(raw[ext], name=f"{prefix}.{ext}")
            sample["source"] = f"{prefix}.{ext}"
        if "label" in self.fields:  # optional: None where a sample has no label member
            ext = _member(raw, "label")
            try:
                sample["label"] = int(raw[ext].decode("utf-8").strip()) if ext else None
            except (UnicodeDecodeError, ValueError) as e:
                raise SampleError(f"{prefix}.{ext}", f"label is not an integer ({e})") from e
        return sample

    def texts(self) -> list[str]:
        """Every sample's valid text, reading only the text members (for tokenizer training)."""
        exts = tuple(f".{e}" for e in (*EXTENSIONS["text"], "json"))
        out = []
        for raw in self._raw(self.shards, select=lambda name: name.lower().endswith(exts)):
            try:
                out.append(_sample_text(raw, ""))
            except SampleError:
                continue
        return out


def _warn_empty(url: str) -> None:
    warnings.warn(f"skipping shard {url}: it holds no samples", SkippedSampleWarning, stacklevel=3)
