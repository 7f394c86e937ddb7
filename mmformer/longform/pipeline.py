"""The long-form pipeline behind :func:`transcribe_files`: read every input, find speech (:mod:`mmformer.longform.vad`),
cut it into windows the model reads, decode the windows of all files from one queue in batches
(:mod:`mmformer.longform.batched`) or, for a Whisper checkpoint asked for openai-whisper's sequential rules, one window
after the other (:mod:`mmformer.longform.sequential`), and return one openai-whisper-style result per input; the
audio encoder's compute type (:func:`with_compute_type`) and the options each window is decoded with
(:func:`decoding_options`)."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmformer.eval_mode import eval_mode
from mmformer.generation.decoding import processor_with_tokenizer
from mmformer.generation.options import DecodingOptions
from mmformer.io.weights import model_device
from mmformer.longform.batched import (
    PHASES,
    DecodeBatch,
    decode_windows_generic,
    decode_windows_whisper,
    transcribe_windows,
)
from mmformer.longform.options import TranscribeOptions
from mmformer.longform.sequential import transcribe_sequential
from mmformer.longform.vad import (
    VadOptions,
    Window,
    cut_and_merge,
    fixed_window,
    model_window_samples,
    speech_regions_many,
    window_samples,
)
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.processor import Processor


def has_timestamps(model: MultimodalTransformer) -> bool:
    """Whether the model is a Whisper checkpoint: a fixed 30-s window and timestamp tokens in its generation
    config (openai-whisper's long-form algorithm applies)."""
    gen = model.config.generation
    return fixed_window(model) and gen is not None and gen.no_timestamps_id is not None


def decoding_options(
    model: MultimodalTransformer,
    options: TranscribeOptions | DecodingOptions | None,
    base: DecodingOptions | None = None,
) -> DecodingOptions:
    """The :class:`DecodingOptions` each window is decoded with: given as such, or from a
    :class:`TranscribeOptions` (its one temperature: 0 decodes greedily, above 0 samples; ``beam_size``;
    ``language``; ``task`` where the checkpoint has task tokens; Whisper's other options, a fallback schedule and
    its thresholds among them, refused by name when set away from their defaults) over
    ``base`` (default: as many new tokens as the decoder's positions allow)."""
    if options is None or isinstance(options, DecodingOptions):
        return DecodingOptions.build(options)
    if not isinstance(options, TranscribeOptions):
        raise TypeError(f"options: expected a TranscribeOptions, DecodingOptions or None, got {type(options).__name__}")
    _refuse_options(options, WHISPER_ONLY, "a Whisper checkpoint (timestamp tokens, alignment heads, fallback "
                    "over temperatures; this model decodes each window once at one temperature)")  # fmt: skip
    gen = model.config.generation
    has_tasks = gen is not None and bool(gen.task_ids)
    if not has_tasks and options.task != "transcribe":
        raise ValueError(f"task: this model has no task tokens (only transcribe); got {options.task!r}")
    temperature = options.temperature[0]
    if base is None:
        base = DecodingOptions(max_new_tokens=model.config.text.max_tokens)
    return DecodingOptions.build(
        base,
        num_beams=options.beam_size or base.num_beams,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        language=options.language,
        task=options.task if has_tasks else None,
    )


SEQUENTIAL_ONLY = ("clip_timestamps", "initial_prompt", "carry_initial_prompt", "hallucination_silence_threshold")
FALLBACK = ("temperature", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
            "condition_on_previous_text")  # fmt: skip
WHISPER_ONLY = ("word_timestamps", "without_timestamps", "best_of", "patience", *FALLBACK, *SEQUENTIAL_ONLY)


def _refuse_options(options: TranscribeOptions, names: Sequence[str], needs: str) -> None:
    """A ValueError naming the first of ``names`` set away from its default: an option this path would ignore. One
    temperature is read by every path (the first of a schedule is; the default schedule is not refused); a schedule
    of several is the fallback only openai-whisper's algorithm runs."""
    defaults = TranscribeOptions()
    for name in names:
        value, default = getattr(options, name), getattr(defaults, name)
        if name == "temperature" and len(value) == 1:
            continue
        if name == "clip_timestamps":
            value, default = options.clip_seconds(), [0.0]
            if not value:
                continue
        if value != default:
            raise ValueError(f"{name}: needs {needs}; got {getattr(options, name)!r}")


def input_name(source: Any, index: int) -> str:
    """How messages name input ``index``: its path, or ``inputs[index]`` for an array."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"inputs[{index}]"


def read_input(source: Any, sample_rate: int, index: int, array_rate: int | None = None) -> tuple[str, torch.Tensor]:
    """An input's name and mono waveform (S,) at ``sample_rate``: a file decoded with soundfile and resampled
    (torchaudio), or a 1-D array recorded at ``array_rate`` (default ``sample_rate``), float or int16 PCM, converted
    and resampled as the processor converts the waveforms ``model.transcribe`` reads (never cut to its
    ``max_seconds``: a long recording is what this reads).

    Raises:
        SampleError: the file is missing, corrupt or empty, or the array empty or not finite (its message names it).
        TypeError / ValueError: an array that is not a 1-D float or int16 waveform.
    """
    from mmformer.data.io import SampleError, read_audio
    from mmformer.preprocess.processor import AudioProcessorConfig, Processor

    name = input_name(source, index)
    if isinstance(source, (str, os.PathLike)):
        return name, read_audio(source, sample_rate)[0]
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(np.ascontiguousarray(source))
    if isinstance(source, torch.Tensor) and source.device.type != "meta":  # skipped, as an unreadable file is
        if source.numel() == 0:
            raise SampleError(name, "audio has no samples")
        if source.is_floating_point() and not bool(torch.isfinite(source).all()):
            raise SampleError(name, "audio contains NaN or infinite values")
    # the processor's own conversion (int16 scaled, checked, resampled), on a processor without its max_seconds cut
    reader = Processor(audio=AudioProcessorConfig(sample_rate=sample_rate, max_seconds=None))
    return name, reader.waveform(source, name, sample_rate if array_rate is None else array_rate)


SHORTER = "try a shorter input (cut it into parts)"
SMALLER = "try a smaller batch_size or a shorter input"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation refused: a MemoryError (Python's, numpy's: ``ulimit -v``, a container's
    limit), torch's OutOfMemoryError (a GPU's), torch's CPU allocator's plain RuntimeError ("DefaultCPUAllocator:
    can't allocate memory: you tried to allocate ... bytes"; no other RuntimeError) or onnxruntime's error for a
    ``std::bad_alloc`` (Silero's session, which raises its own exception classes)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    if isinstance(error, RuntimeError):
        return "can't allocate memory" in text or "DefaultCPUAllocator" in text
    return type(error).__module__.startswith("onnxruntime") and "bad_alloc" in text


class _Failures:
    """The inputs of a :func:`transcribe_files` run that fail, each with its error result: ones that cannot be read
    (``read_each``'s messages) and ones that run out of memory while read or transcribed, which cost only their own
    result, as an unreadable file does. Each is reported as it happens: a warning and ``on_result``."""

    def __init__(self, names: list[str], on_result: Callable[[int, dict[str, Any]], None] | None):
        self.names, self.on_result = names, on_result
        self.results: dict[int, dict[str, Any]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self.results

    def add(self, index: int, message: str, warn: bool = True) -> None:
        """Input ``index`` fails with ``message`` (naming it); ``warn=False``: warned about already."""
        if warn:
            warnings.warn(f"transcribe_files: skipped {message}", stacklevel=2)
        self.results[index] = {"error": message, "text": "", "segments": [], "language": None}
        if self.on_result is not None:
            self.on_result(index, self.results[index])

    @contextlib.contextmanager
    def out_of_memory(self, index: int, doing: str, hint: str) -> Iterator[None]:
        """Running out of memory inside fails input ``index`` (its message says what it was ``doing`` and ``hint``)
        instead of the run; any other error propagates."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            self.add(index, f"{self.names[index]}: {_out_of_memory_message(doing, e, hint)}")


def _out_of_memory_message(doing: str, error: BaseException, hint: str) -> str:
    """What running out of memory ``doing`` something says: the allocator's first line, and ``hint``."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
    return f"out of memory {doing} ({type(error).__name__}: {detail}); {hint}"


def _windows(
    model: MultimodalTransformer,
    waves: list[torch.Tensor | None],
    vad: bool | None,
    options: VadOptions,
    limit: int,
    failures: _Failures,
) -> list[Window]:
    """The windows of every input: its speech, cut and merged (VAD; the Silero frames of all inputs computed
    together), or the whole input when it fits the window (``limit`` samples) and VAD is not forced, or consecutive
    windows of that length when VAD is off. Where finding speech runs out of memory, each input's is found alone,
    and one that runs out alone is a failure (``failures``), its waveform dropped (None)."""
    rate = model.config.audio.sample_rate
    merge = fixed_window(model) if options.merge is None else options.merge
    windows, cut = [], []
    for i, wave in enumerate(waves):
        if wave is None:
            continue
        n = wave.shape[0]
        if vad is False or (vad is None and n <= limit):
            windows += [Window(i, s, min(s + limit, n), ((s, min(s + limit, n)),)) for s in range(0, n, limit)]
        else:
            cut.append(i)
    regions_of: dict[int, list[tuple[int, int]]] = {}
    with torch.profiler.record_function(PHASES["vad"]):
        if len(cut) > 1:
            try:
                regions_of = dict(zip(cut, speech_regions_many([waves[i] for i in cut], rate, options)))
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
        for i in [i for i in cut if i not in regions_of]:  # one input, or each alone: the memory of one
            with failures.out_of_memory(i, "finding its speech", SHORTER):
                regions_of[i] = speech_regions_many([waves[i]], rate, options)[0]
    for i in cut:
        if i in regions_of:
            windows += cut_and_merge(regions_of[i], i, limit, merge, options.pack_gap(rate))
        else:
            waves[i] = None  # its memory back for the others
    return windows


def _audio_encoder(model: Any, bf16: bool) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(the model that decodes, the encoder of its windows): a Whisper checkpoint's PT2E model gives its float model
    and its int8 audio encoder (an ``audio_encoder`` graph; the Whisper rules drive the float decoder), another PT2E
    model itself and None (its graphs, and its float towers where none, decode through ``generate``); a float model
    itself and, if ``bf16``, its encoder under ``torch.autocast(bfloat16)`` (a Whisper checkpoint's only), else None
    (its own in float32)."""
    from mmformer.compress.pt2e import PT2EModel

    if isinstance(model, PT2EModel):
        if bf16:
            raise ValueError(
                "bf16_encoder: this model's audio encoder is int8 already (a PT2E model); pass one of them"
            )
        if not has_timestamps(model.model):
            return model, None
        if "audio_encoder" not in model.graphs:
            raise ValueError(f"model: this PT2E model has no int8 audio encoder (graphs {sorted(model.graphs)}); "
                             "quantize it with towers including 'audio'")  # fmt: skip
        return model.model, model.audio_states
    if not bf16:
        return model, None
    if not has_timestamps(model):
        raise ValueError("bf16_encoder: a bf16 audio encoder reads long recordings only under a Whisper "
                         "checkpoint's decoder; for this model pass bf16_encoder=False")  # fmt: skip
    device = model_device(model)

    def bf16_states(mel: torch.Tensor) -> torch.Tensor:  # (B, M, F) → (B, S, D) float32, for the float decoder
        with torch.autocast(device.type, dtype=torch.bfloat16):
            states, _ = model.encode_audio_tokens(audio_features=mel.to(device))
        return states.float()

    return model, bf16_states


COMPUTE_TYPES = ("float32", "int8", "bfloat16", "auto")  # what a Whisper checkpoint's audio encoder runs in


def with_compute_type(model: Any, compute_type: str, name: str) -> tuple[Any, bool, str]:
    """What :func:`transcribe_files` gets for ``compute_type`` (the CLI's ``--compute-type`` of transcribe and serve):
    ``(model or its PT2E int8 model, bf16_encoder, what the encoder runs in)``. int8: the audio encoder quantized here
    (PT2E dynamic, x86 CPUs); bfloat16: under autocast, the decoder's cross-attention keys/values in bf16; auto:
    bfloat16 where the CPU has AMX, else float32
    (:func:`mmformer.compress.cpu_precision.bf16_choice`, whose reason is returned; float32 for another model than a
    Whisper checkpoint). int8 and bfloat16 need a Whisper checkpoint (``name`` names the model in the error)."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"--compute-type: expected one of {list(COMPUTE_TYPES)}, got {compute_type!r}")
    if compute_type == "float32":
        return model, False, "float32"
    from mmformer.compress.pt2e import PT2EModel, as_quantized

    if isinstance(model, PT2EModel):  # its graphs are int8 already
        return model, False, as_quantized(model, compute_type, name)
    whisper = has_timestamps(model)
    if compute_type == "auto" and not whisper:
        return model, False, f"float32 (auto chooses only for a Whisper checkpoint's audio encoder; {name} is not one)"
    if not whisper:  # before the seconds of quantizing (transcribe_files refuses it as well)
        int8 = " (or name its int8 folder: mmformer quantize --backend pt2e)" if compute_type == "int8" else ""
        raise ValueError(f"--compute-type {compute_type}: another audio encoder runs only under a Whisper "
                         f"checkpoint's decoder; {name} is not one (pass --compute-type float32{int8})")  # fmt: skip
    if compute_type == "int8":
        from mmformer.compress import pt2e

        return pt2e.quantize(model, "dynamic", towers=["audio"]), False, "int8 (PT2E dynamic)"
    from mmformer.compress.cpu_precision import bf16_choice

    bf16, why = bf16_choice(True if compute_type == "bfloat16" else None)
    return model, bf16, why


def transcribe_files(
    model: MultimodalTransformer,
    inputs: Sequence[Any],
    options: TranscribeOptions | DecodingOptions | None = None,
    vad: VadOptions | bool | None = None,
    batch_size: int = 16,
    processor: Processor | None = None,
    progress: Callable[[float, float], None] | None = None,
    vad_options: VadOptions | None = None,
    prefix_embeds: torch.Tensor | None = None,
    on_segment: Callable[[int, dict[str, Any]], None] | None = None,
    bf16_encoder: bool = False,
    sample_rate: int | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Transcribe many recordings of any length, their windows decoded together.

    Args:
        model: a speech-to-text model (one trained here, or a converted Whisper checkpoint), or its PT2E int8
            model (:func:`mmformer.compress.pt2e.quantize` / ``load``): a Whisper checkpoint's int8 audio encoder
            (its ``audio`` tower) reads the windows and the float decoder decodes them (openai-whisper's algorithm
            drives the float model's steps); another model's windows go through its audio and decoder graphs. It
            runs in eval mode; a training model comes back with every submodule's mode as it was
            (:func:`~mmformer.eval_mode.eval_mode`).
        inputs: audio file paths, or 1-D waveforms (float, or int16 PCM scaled by 1/32768 as ``model.transcribe``
            reads it) recorded at ``sample_rate``.
        options: how windows are decoded: :class:`TranscribeOptions` (a Whisper checkpoint: openai-whisper's
            algorithm with these options; another model: see :func:`decoding_options`), or :class:`DecodingOptions`
            (another model: as given; Whisper: its temperature, beams, language and task, without fallback).
            Default: ``TranscribeOptions()`` for Whisper, greedy decoding otherwise.
        vad: None: a Whisper checkpoint runs openai-whisper's sequential algorithm on each input (timestamp
            seeking, fallback, no-speech skips); another model cuts inputs longer than its window at their speech
            (Silero VAD) and decodes shorter ones whole, as ``model.transcribe`` does. True (or a
            :class:`VadOptions`, which also sets ``vad_options``): every input is cut at its speech and the windows
            of all inputs are decoded in batches (Whisper: with its timestamps and fallback). False: Whisper
            sequential; another model: consecutive windows of its length, no VAD.
        batch_size: windows decoded at once, drawn from all inputs.
        processor: tokenizer and audio settings (default ``model.processor``).
        progress: called as ``progress(seconds, total)`` with the audio seconds each finished step accounts for
            (they add up to ``total``, the readable inputs' duration).
        vad_options: how speech is found and cut (default :class:`VadOptions`).
        prefix_embeds: a learned decoder prefix (P', D) read before the prompt (prompt tuning; a model trained
            here).
        on_segment: called as ``on_segment(input index, segment)`` with each input's numbered segments in order, each
            as soon as it is decoded (streaming), before the results are returned.
        bf16_encoder: a Whisper checkpoint's audio encoder runs under ``torch.autocast(bfloat16)`` and its decoder
            (float32) keeps the cross-attention keys/values in bf16 (half the bytes each step reads): fast where the
            CPU has AMX (:func:`mmformer.compress.cpu_precision.bf16_choice`).
        sample_rate: the rate the waveform arrays in ``inputs`` were recorded at; they are resampled to the model's
            (file paths carry their own rate). Default: the model's rate.
        on_result: called as ``on_result(input index, result)`` once per input with the result returned for it, as
            soon as it is complete: an unreadable input's error before any decoding, the error of one that runs out
            of memory when it does, another's when its last window is decoded (sequentially: when the input is
            done), so that a caller writes each input's outputs while the others are decoded, as openai-whisper's
            command does, and an interruption keeps them. The VAD-batched queue runs longest window first across
            inputs: an input whose windows are spread over it completes when its last one is decoded. An exception
            it raises stops the run.

    Returns:
        One dict per input, in order: ``text``, ``segments`` (``id, seek, start, end`` in seconds on the input's
        timeline, ``text, tokens, temperature``) and ``language``; an input that cannot be read, or that runs out of
        memory while read or transcribed (a MemoryError, or torch's "can't allocate memory": :func:`is_out_of_memory`;
        a batch of windows that does is decoded again one window at a time first), gets
        ``{"error": message naming it and what to try, "text": "", "segments": [], "language": None}`` and a
        warning, and the others are still transcribed (segments it streamed to ``on_segment`` stay streamed).
    """
    from mmformer.data.io import SampleError, read_each

    if isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs: expected a list of file paths or 1-D waveforms, got {type(inputs).__name__}")
    if vad is not None and not isinstance(vad, (bool, VadOptions)):
        raise TypeError(f"vad: expected None, True, False or a VadOptions, got {type(vad).__name__}")
    if vad_options is not None and not isinstance(vad_options, VadOptions):
        raise TypeError(f"vad_options: expected a VadOptions or None, got {type(vad_options).__name__}")
    if isinstance(vad, VadOptions):
        vad, vad_options = True, vad
    vad_options = vad_options or VadOptions()
    model, encoder = _audio_encoder(model, bf16_encoder)
    cross_dtype = torch.bfloat16 if bf16_encoder else None  # the decoder's cross-attention reads bf16 keys/values
    whisper = has_timestamps(model)
    if whisper:
        if isinstance(options, DecodingOptions):  # short-clip decoding options: one temperature, no fallback
            options = TranscribeOptions(
                temperature=options.temperature if options.sample else 0.0,
                beam_size=options.num_beams if options.num_beams > 1 else None,
                language=options.language,
                task=options.task or "transcribe",
            )
        options = TranscribeOptions.build(options)
        if prefix_embeds is not None:
            raise ValueError("prefix_embeds: a learned decoder prefix is for models trained here, not Whisper")
        if vad:
            _refuse_options(options, SEQUENTIAL_ONLY, "openai-whisper's sequential path (vad off): the VAD path "
                                                      "decodes each speech window on its own")  # fmt: skip
    else:
        options = decoding_options(model, options)
    processor = processor_with_tokenizer(model, processor, "transcribe_files")
    model_window_samples(model)  # refuses a model without audio
    rate = model.config.audio.sample_rate
    processor.check_audio_rate(rate)
    _check_array_rate(sample_rate, rate)

    def read(item: tuple[int, Any]) -> torch.Tensor:
        """An input's waveform; running out of memory reading it is a SampleError naming it, as a corrupt file is."""
        index, source = item
        try:
            return read_input(source, rate, index, sample_rate)[1]
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise SampleError(input_name(source, index), _out_of_memory_message("reading it", e, SHORTER)) from None

    waves, errors = read_each(list(enumerate(inputs)), read, "transcribe_files")  # an unreadable input: None
    failures = _Failures([input_name(source, i) for i, source in enumerate(inputs)], on_result)
    for i, message in errors.items():
        failures.add(i, message, warn=False)  # read_each warned
    with eval_mode(model):  # a training model comes back as it was, every submodule's mode
        total = sum(w.shape[0] for w in waves if w is not None) / rate
        if whisper and not vad:  # openai-whisper's algorithm, input by input
            results = [None] * len(waves)
            for i, wave in enumerate(waves):
                if wave is None:
                    continue
                steps = None if progress is None else _Increments(progress, total)
                with failures.out_of_memory(i, "transcribing it", SHORTER):
                    results[i] = transcribe_sequential(
                        model, wave, options, tokenizer=processor.tokenizer, progress=steps,
                        on_segment=None if on_segment is None else functools.partial(on_segment, i), encoder=encoder,
                        cross_dtype=cross_dtype,
                    )  # fmt: skip
                if i in failures:
                    waves[i] = None  # its memory back for the others
                    if steps is not None:  # the rest of its seconds
                        steps(wave.shape[0] / rate, wave.shape[0] / rate)
                elif on_result is not None:
                    on_result(i, results[i])
        else:
            limit = window_samples(model, vad_options, rate, processor.audio.max_samples if processor.audio else None)
            samples = [None if w is None else w.shape[0] for w in waves]
            windows = _windows(model, waves, vad, vad_options, limit, failures)
            dropped = sum(n for n, w in zip(samples, waves) if n is not None and w is None)  # failed finding speech
            if progress is not None and dropped:
                progress(dropped / rate, total)
            if whisper:
                decode = functools.partial(
                    decode_windows_whisper,
                    model,
                    options=options,
                    tokenizer=processor.tokenizer,
                    encoder=encoder,
                    cross_dtype=cross_dtype,
                )
            else:
                decode = functools.partial(
                    decode_windows_generic, model, processor=processor, options=options, prefix_embeds=prefix_embeds
                )
            results = transcribe_windows(
                waves,
                windows,
                _one_at_a_time_out_of_memory(decode, failures),
                rate,
                batch_size,
                None if progress is None else lambda s: progress(s, total),
                on_segment,
                separator=None if whisper else " ",
                on_result=None if on_result is None else lambda i, r: None if i in failures else on_result(i, r),
            )
    for i, result in failures.results.items():
        results[i] = result
    return results


def _one_at_a_time_out_of_memory(decode: DecodeBatch, failures: _Failures) -> DecodeBatch:
    """``decode`` of a batch of windows, the windows of failed inputs skipped (no segments); where the batch runs out
    of memory, its windows decoded one at a time (a warning says so), and a window that runs out alone fails its input
    (``failures``; its windows still queued are skipped)."""

    def run(windows: list[Window], audio: list[torch.Tensor]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"segments": [], "language": None} for _ in windows]
        keep = [k for k, w in enumerate(windows) if w.file not in failures]
        if len(keep) > 1:
            try:
                for k, result in zip(keep, decode([windows[k] for k in keep], [audio[k] for k in keep])):
                    out[k] = result
                return out
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                said = _out_of_memory_message(f"decoding {len(keep)} windows at once", e, SMALLER)
                warnings.warn(f"transcribe_files: {said}; decoding them one at a time", stacklevel=2)
        for k in keep:  # outside the except clause: the failed batch's memory is back
            if windows[k].file not in failures:
                with failures.out_of_memory(windows[k].file, "decoding it", SMALLER):
                    out[k] = decode([windows[k]], [audio[k]])[0]
        return out

    return run


def _check_array_rate(sample_rate: int | None, model_rate: int) -> None:
    """A ValueError naming ``sample_rate`` unless it is None or a rate the model's can be resampled from, before any
    input is read."""
    from mmformer.data.io import check_resample

    if sample_rate is None:
        return
    if not is_int(sample_rate) or sample_rate <= 0:
        raise ValueError(f"sample_rate: expected None or a positive int (Hz: the rate of the waveform arrays in "
                         f"inputs), got {sample_rate!r}")  # fmt: skip
    check_resample(sample_rate, model_rate, what="sample_rate")


class _Increments:
    """Turns the sequential algorithm's ``progress(done, file_total)`` (cumulative, per file) into the increments
    ``progress(seconds, total)`` of all inputs."""

    def __init__(self, progress: Callable[[float, float], None], total: float):
        self.progress, self.total, self.done = progress, total, 0.0

    def __call__(self, done: float, file_total: float) -> None:
        self.progress(done - self.done, self.total)
        self.done = done
