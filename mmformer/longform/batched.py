"""Windows of many files decoded together: one queue, batches of ``batch_size``, each window's text mapped back onto
its own file's timeline.

The queue is ordered by window length (longest first) so that a batch pads little; results do not depend on the
order, as long as the audio encoder gives every clip what it would get alone (issue #24).

Each phase runs inside a ``torch.profiler.record_function`` range named in :data:`PHASES` (free without a profiler):
a profile of a long-form run splits its wall time into VAD, log-mel, encoder, decoding and word alignment, the rest
being windowing, the timestamp bookkeeping and assembling (``benchmarks.longform --profile-batch-sizes``).

Shape legend: B windows in a batch, S samples (the longest window of the batch), P prompt tokens, L generated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmformer.generation.decoding import generate
from mmformer.generation.decoding_rules import prompt_length
from mmformer.generation.options import DecodingOptions
from mmformer.io.weights import model_device
from mmformer.longform.options import TranscribeOptions
from mmformer.longform.sequential import split_segments
from mmformer.longform.timing import add_word_timestamps
from mmformer.longform.vad import Window
from mmformer.longform.whisper_decode import decode_with_fallback, encode_windows, time_precision, whisper_tokens

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.processor import Processor


PHASES = {
    "vad": "longform.vad",  # Silero's speech probabilities of every input (cutting and merging not included)
    "log_mel": "longform.log_mel",  # Whisper: the windows' log-mel features
    "encoder": "longform.encoder",  # Whisper: the audio encoder over the windows
    "decode": "longform.decode",  # the decoder steps and their rules (a model trained here: features and encoder too)
    "word_timestamps": "longform.word_timestamps",  # cross-attention alignment and DTW of every window's words
}


def _pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D waveforms → zero-padded (B, S) and their lengths (B,)."""
    lengths = torch.tensor([w.shape[0] for w in waves])
    return torch.stack([F.pad(w, (0, int(lengths.max()) - w.shape[0])) for w in waves]), lengths


def _languages(model: MultimodalTransformer, ids: torch.Tensor, options: DecodingOptions) -> list[str | None]:
    """Each row's language code: the chosen one, or the language token of its prompt (Whisper's detection)."""
    gen = model.config.generation
    if gen is None or not gen.language_ids:
        return [options.language] * ids.shape[0]
    if options.language is not None or gen.language is not None:
        return [options.language or gen.language] * ids.shape[0]
    codes = {token: code for code, token in gen.language_ids.items()}
    return [codes.get(int(token)) for token in ids[:, 1]]  # prompt: [start, language, ...]


def _seconds(samples: int, sample_rate: int) -> float:
    return round(samples / sample_rate, 3)


def decode_windows_generic(
    model: MultimodalTransformer,
    windows: list[Window],
    waves: list[torch.Tensor],
    processor: Processor,
    options: DecodingOptions,
    prefix_embeds: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One batch of windows (1-D waveforms at the model's rate) through ``generate`` with the model's default
    prompt (after a learned decoder prefix ``prefix_embeds``, if given) → per window ``{"segments", "language"}``:
    one segment spanning the window's speech (the VAD regions' first start to last end), with ``temperature`` 0.0
    when decoding greedily; none when it decodes no text."""
    audio, lengths = _pad(waves)  # (B, S), (B,)
    device = model_device(model)
    with torch.profiler.record_function(PHASES["decode"]):
        audio, lengths = audio.to(device), lengths.to(device)
        ids = generate(model, audio=audio, audio_lengths=lengths, options=options, prefix_embeds=prefix_embeds).cpu()
    text_cfg = model.config.text
    special = {text_cfg.pad_id, text_cfg.eos_id}
    skip = prompt_length(model)
    texts = processor.tokenizer.batch_decode(ids[:, skip:], skip_special_tokens=True)
    temperature = options.temperature if options.sample else 0.0
    rate = model.config.audio.sample_rate
    out = []
    for w, row, text, language in zip(windows, ids[:, skip:].tolist(), texts, _languages(model, ids, options)):
        if text_cfg.eos_id in row:
            row = row[: row.index(text_cfg.eos_id)]
        segment = {
            "seek": round(w.start / rate * 100),  # mel frames of 10 ms, as openai-whisper counts
            "start": _seconds(w.regions[0][0], rate),
            "end": _seconds(w.regions[-1][1], rate),
            "text": text.strip(),
            "tokens": [t for t in row if t not in special],
            "temperature": temperature,
        }
        out.append({"segments": [segment] if segment["text"] else [], "language": language})
    return out


def decode_windows_whisper(
    model: MultimodalTransformer,
    windows: list[Window],
    waves: list[torch.Tensor],
    options: TranscribeOptions,
    tokenizer: Any = None,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cross_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """One batch of windows through Whisper's decoding (:func:`~mmformer.longform.whisper_decode.decode_with_fallback`:
    timestamp rules, temperature fallback) → per window ``{"segments", "language"}``: the segments between its
    predicted timestamps, on the file's timeline (the window's start plus the timestamp, kept within the window's
    speech); a window judged silent (openai-whisper's no-speech rule) has none. With ``word_timestamps`` each
    segment gets its ``words``. ``encoder``: see :func:`~mmformer.longform.whisper_decode.encode_windows`;
    ``cross_dtype``: :func:`~mmformer.longform.whisper_decode.decode_windows`'."""
    whisper = whisper_tokens(model, tokenizer)
    audio, lengths = _pad(waves)  # (B, S)
    device = model_device(model)
    with torch.profiler.record_function(PHASES["log_mel"]):
        mel = model.audio_embed.features(audio.to(device), lengths.to(device))  # (B, M, 3000): each window alone
    with torch.profiler.record_function(PHASES["encoder"]):
        features = encode_windows(model, mel, encoder)  # (B, S, D): read by every temperature and the words
    with torch.profiler.record_function(PHASES["decode"]):
        results = decode_with_fallback(model, mel, options, tokenizer=whisper.tokenizer, audio_features=features,
                                       cross_dtype=cross_dtype)  # fmt: skip
    rate, hop = model.config.audio.sample_rate, model.config.audio.hop_length
    precision = time_precision(model)
    out = []
    for i, (w, result) in enumerate(zip(windows, results)):
        silent = (
            options.no_speech_threshold is not None
            and result["no_speech_prob"] is not None
            and result["no_speech_prob"] > options.no_speech_threshold
            and not (options.logprob_threshold is not None and result["avg_logprob"] > options.logprob_threshold)
        )
        if silent:
            out.append({"segments": [], "language": result["language"]})
            continue
        offset = 0.0 if w.pieces else w.start / rate  # a packed window's times are mapped back below
        segments, _, _ = split_segments(
            whisper, result["tokens"], result, round(w.start / hop), offset, precision, w.samples / rate
        )
        if options.word_timestamps:
            with torch.profiler.record_function(PHASES["word_timestamps"]):
                add_word_timestamps(
                    segments=segments, model=model, whisper=whisper,
                    sot_sequence=whisper.sot_sequence(result["language"], options.task), mel=mel[i],
                    num_frames=w.samples // hop, language=result["language"],
                    prepend_punctuations=options.prepend_punctuations, append_punctuations=options.append_punctuations,
                    last_speech_timestamp=offset, time_offset=offset, audio_features=features[i : i + 1],
                )  # fmt: skip
        if w.pieces:
            _unpack_times(w, segments, rate)
        first, last = _seconds(w.regions[0][0], rate), _seconds(w.regions[-1][1], rate)
        for segment in segments:  # the timestamps refine the VAD's times and stay within the window's speech
            for item in [segment, *segment.get("words", [])]:
                item["start"] = min(max(item["start"], first), last)
                item["end"] = min(max(item["end"], item["start"]), last)
        segments = [s for s in segments if s["text"].strip() and s["end"] > s["start"]]
        out.append({"segments": segments, "language": result["language"]})
    return out


def _unpack_times(window: Window, segments: list[dict[str, Any]], rate: int) -> None:
    """Times in a packed window's input → the file's timeline (in place), as faster-whisper's
    ``restore_speech_timestamps``: a word's start and end through the span holding its middle (one word never
    straddles a cut pause) and a segment with words from its first word's start to its last word's end; a segment
    without words starts through the span it starts in and ends through the span it ends in."""
    for segment in segments:
        words = segment.get("words", [])
        for word in words:
            k = window.piece_at((word["start"] + word["end"]) / 2, rate)
            word["start"] = round(window.file_time(word["start"], rate, piece=k), 3)
            word["end"] = round(window.file_time(word["end"], rate, piece=k), 3)
        if words:
            segment["start"], segment["end"] = words[0]["start"], words[-1]["end"]
        else:
            segment["start"] = round(window.file_time(segment["start"], rate), 3)
            segment["end"] = round(window.file_time(segment["end"], rate, end=True), 3)


DecodeBatch = Callable[[list[Window], list[torch.Tensor]], list[dict[str, Any]]]


def _coverage(windows: list[Window], n_samples: int) -> list[int]:
    """Samples of the file's timeline each window stands for in the progress bar: from the previous window's end
    (or 0) to its own end, the last one to the file's end, so that a file's windows add up to its length."""
    cover, previous = [], 0
    for i, w in enumerate(windows):
        end = n_samples if i == len(windows) - 1 else w.end
        cover.append(end - previous)
        previous = end
    return cover


def transcribe_windows(
    waves: Sequence[torch.Tensor | None],
    windows: list[Window],
    decode: DecodeBatch,
    sample_rate: int,
    batch_size: int = 16,
    progress: Callable[[float], None] | None = None,
    on_segment: Callable[[int, dict[str, Any]], None] | None = None,
    separator: str | None = " ",
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Decode every window of every file from one queue in batches of ``batch_size`` and assemble each file's
    result: ``{"text", "segments", "language"}``, the segments of its windows in order, numbered.

    Args:
        waves: each file's waveform (S,) at ``sample_rate``; None for a file that could not be read (skipped).
        windows: the windows of all files (``Window.file`` indexes ``waves``).
        decode: ``decode(windows, waveforms)`` → per window ``{"segments": [...], "language"}``, the segments'
            times in seconds on the file's timeline.
        progress: called with the audio seconds each finished batch accounts for.
        on_segment: called as ``on_segment(file, segment)`` with each numbered segment once it and every earlier
            window of its file are decoded, so a file's segments come in order while the rest is decoded; the queue
            then runs in timeline order instead of longest first.
        separator: the file's text is its segments' stripped texts joined by this; None: their texts as they are,
            concatenated (Whisper's carry their own spacing, and openai-whisper's text is its tokens decoded: no
            space between segments of Chinese or Japanese, none inside a word that continues).
        on_result: called as ``on_result(file, result)`` with each readable file's result (the dict returned for
            it) as soon as its last window is decoded (a file without speech: before any window is decoded), so
            that its outputs can be written while the other files are decoded; the queue order stays longest first,
            so a file whose windows are spread over the queue completes when its last one comes.

    Returns:
        One result per file, in order; None for a file that could not be read.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    by_file: dict[int, list[Window]] = {}
    for w in windows:
        by_file.setdefault(w.file, []).append(w)
    cover: dict[Window, int] = {}
    for file, ws in by_file.items():
        cover.update(zip(ws, _coverage(ws, waves[file].shape[0])))
    if progress is not None:  # files with no speech at all are done already
        silent = sum(w.shape[0] for i, w in enumerate(waves) if w is not None and i not in by_file)
        if silent:
            progress(silent / sample_rate)
    queue = sorted(windows, key=(lambda w: -w.samples) if on_segment is None else (lambda w: (w.file, w.start)))
    decoded: dict[Window, dict[str, Any]] = {}
    segments_of: dict[int, list[dict[str, Any]]] = {file: [] for file in by_file}
    assembled = dict.fromkeys(by_file, 0)  # each file's windows (in timeline order) whose segments are numbered
    results: list[dict[str, Any] | None] = [None] * len(waves)

    def assemble(file: int) -> None:
        """Number the segments of the file's windows decoded so far, in order, and hand them on; once all are,
        the file's result."""
        ws = by_file[file]
        while assembled[file] < len(ws) and ws[assembled[file]] in decoded:
            for s in decoded[ws[assembled[file]]]["segments"]:
                segment = {"id": len(segments_of[file]), **s}
                segments_of[file].append(segment)
                if on_segment is not None:
                    on_segment(file, segment)
            assembled[file] += 1
        if assembled[file] == len(ws):
            finish(file)

    def finish(file: int) -> None:
        """The file's result from its decoded windows' segments and languages, handed to ``on_result``."""
        segments = segments_of.get(file, [])
        languages = Counter(decoded[w]["language"] for w in by_file.get(file, []))
        results[file] = {
            "text": "".join(s["text"] for s in segments)
            if separator is None
            else separator.join(s["text"].strip() for s in segments),
            "segments": segments,
            "language": languages.most_common(1)[0][0] if languages else None,
        }  # fmt: skip
        if on_result is not None:
            on_result(file, results[file])

    for file, wave in enumerate(waves):  # no speech at all: done before any decoding
        if wave is not None and file not in by_file:
            finish(file)
    for first in range(0, len(queue), batch_size):
        batch = queue[first : first + batch_size]
        decoded.update(zip(batch, decode(batch, [w.audio(waves[w.file]) for w in batch])))
        if progress is not None:
            progress(sum(cover[w] for w in batch) / sample_rate)
        for file in dict.fromkeys(w.file for w in batch):
            assemble(file)
    return results
