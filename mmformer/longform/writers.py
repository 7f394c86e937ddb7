"""Transcripts as files, in openai-whisper's formats (its ``whisper/utils.py`` writers with their default options):
txt (one segment per line), json (the result dict), srt and vtt subtitles (one cue per segment; with word timings,
the cue spans the segment's first to last word and a segment without words has none, as openai-whisper's writers
do), tsv (integer milliseconds).

Every file is written atomically (:mod:`mmformer.io.atomic`): a reader never sees half a transcript.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmformer.io.atomic import write_text_atomic


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """``[HH:]MM:SS.mmm`` as openai-whisper writes it (hours only when asked or needed)."""
    if seconds < 0:
        raise ValueError(f"seconds: expected a time >= 0, got {seconds!r}")
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cues(result: dict[str, Any]) -> Iterator[tuple[float, float, str]]:
    """(start, end, text) per cue, as openai-whisper's subtitle writers give them with their default options: when
    the first segment carries ``words`` (word timestamps were asked for), a cue per segment from its first to last
    word, and a segment without words gives none (a blanked or word-less segment); otherwise a cue per segment
    from its own times."""
    segments = result["segments"]
    if segments and "words" in segments[0]:
        for segment in segments:
            if words := segment.get("words"):
                text = words[0]["word"].strip() + "".join(w["word"] for w in words[1:])
                yield words[0]["start"], words[-1]["end"], text
    else:
        for segment in segments:
            yield segment["start"], segment["end"], segment["text"].strip().replace("-->", "->")


def to_txt(result: dict[str, Any]) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in result["segments"])


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result)


def to_vtt(result: dict[str, Any]) -> str:
    lines = ["WEBVTT\n\n"]
    for start, end, text in _cues(result):
        lines.append(f"{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n\n")
    return "".join(lines)


def to_srt(result: dict[str, Any]) -> str:
    lines = []
    for i, (start, end, text) in enumerate(_cues(result), start=1):
        start_s, end_s = (format_timestamp(t, always_include_hours=True, decimal_marker=",") for t in (start, end))
        lines.append(f"{i}\n{start_s} --> {end_s}\n{text}\n\n")
    return "".join(lines)


def to_tsv(result: dict[str, Any]) -> str:
    lines = ["start\tend\ttext\n"]
    for segment in result["segments"]:
        text = segment["text"].strip().replace("\t", " ")
        lines.append(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}\n")
    return "".join(lines)


WRITERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "txt": to_txt,
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "tsv": to_tsv,
}


def output_formats(formats: str | Iterable[str]) -> list[str]:
    """The format names ``formats`` stands for ("all": every one of :data:`WRITERS`), refused by name when unknown."""
    names = [formats] if isinstance(formats, str) else list(formats)
    if "all" in names:
        return list(WRITERS)
    unknown = [n for n in names if n not in WRITERS]
    if unknown or not names:
        raise ValueError(f"formats: expected some of {sorted(WRITERS)} or 'all', got {names!r}")
    return names


def write_result(result: dict[str, Any], path_stem: str | os.PathLike, formats: str | Sequence[str]) -> list[Path]:
    """Write ``result`` as ``path_stem.<format>`` for each of ``formats`` (txt, json, srt, vtt, tsv or "all"),
    each file atomically; the written paths, in order."""
    paths = []
    for name in output_formats(formats):
        path = Path(f"{os.fspath(path_stem)}.{name}")
        write_text_atomic(path, WRITERS[name](result))
        paths.append(path)
    return paths
