"""The ``mmformer`` command: a LightningCLI for training plus a few inference subcommands.

``mmformer --help`` imports nothing heavy; each subcommand imports what it needs when it runs, and its parser
(:mod:`mmformer.cli.parser`) builds only that command's options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from mmformer.cli import artifacts
from mmformer.cli.parser import OUTPUT_FORMATS, TRAIN_HELP, USAGE, build, dataclass_of

TRAIN_COMMANDS = tuple(TRAIN_HELP)


def _load_model(path: str, device: str, adapter: str | None = None):
    from mmformer.compress.pt2e import PT2EModel
    from mmformer.io.auto import load_for_inference

    model = load_for_inference(path, device=device, adapter=adapter)
    if isinstance(model, PT2EModel):
        print(f"mmformer: {path}: PT2E {model.mode} int8 graphs {', '.join(sorted(model.graphs))} (each compiled at "
              "its first call: seconds to a minute, in every new process)", file=sys.stderr)  # fmt: skip
    if getattr(model, "processor", None) is None:
        raise SystemExit(f"mmformer: {path} has no processor files (tokenizer.json, preprocessor_config.json)")
    return model


def _class_names(args: argparse.Namespace) -> list[str]:
    """``--classes`` split at its commas, or ``--classes-file``'s lines (a name may hold commas there), blanks
    dropped."""
    if args.classes_file is None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise ValueError(f"--classes: expected comma-separated class names, got {args.classes!r}")
        return classes
    try:
        text = open(args.classes_file, encoding="utf-8").read()  # noqa: SIM115 (read at once)
    except UnicodeDecodeError as e:
        raise ValueError(f"--classes-file: {args.classes_file} is not UTF-8 text ({e})") from None
    classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not classes:
        raise ValueError(f"--classes-file: expected class names, one a line; {args.classes_file} has none")
    return classes


def _zeroshot(args: argparse.Namespace) -> None:
    from mmformer.compress.cpu_precision import inference_autocast
    from mmformer.compress.pt2e import PT2EModel, as_quantized
    from mmformer.data.io import read_each
    from mmformer.preprocess.media import file_modality
    from mmformer.zeroshot import ZeroShotClassifier

    model = _load_model(args.model, args.device, args.adapter)
    classes = _class_names(args)
    if args.prompt and args.templates != "{}":
        raise ValueError(f"--templates: a learned prompt (--prompt) replaces the templates; got both "
                         f"(--templates {args.templates!r})")  # fmt: skip
    if args.modality == "auto":  # decided per file, so images and audio may be mixed
        hint = "pass --modality image or --modality audio"
        modalities, errors = read_each(args.files, lambda path: file_modality(path, hint), "zeroshot")
    else:
        modalities, errors = [args.modality] * len(args.files), {}
    failed = list(errors.values())
    by_modality: dict[str, list[str]] = {}
    for path, modality in zip(args.files, modalities):
        if modality is not None:
            by_modality.setdefault(modality, []).append(path)
    width = max(len(c) for c in classes)
    enabled = {"float32": False, "bfloat16": True, "auto": None}[args.compute_type]
    as_is = None  # a PT2E model's line: its int8 graphs run as quantized, under no autocast
    if isinstance(model, PT2EModel) and args.compute_type != "float32":
        as_is, enabled = as_quantized(model, args.compute_type, args.model), False
    with inference_autocast(enabled) as (_, why):  # bf16 pays for encoders where the CPU has AMX
        if args.compute_type != "float32":
            print(f"mmformer zeroshot: {as_is or why}", file=sys.stderr)
        answers = {}  # path → its top classes, printed in the order the files were given
        for modality, files in by_modality.items():
            templates = ["{}"] if args.prompt else args.templates.split("|")
            clf = ZeroShotClassifier(
                model, model.processor, classnames=classes, templates=templates, modality=modality, prompt=args.prompt
            )
            read = _file_reader(model.processor, modality)
            for paths, inputs in _readable_batches(files, read, clf.batch_size, "zeroshot", failed):
                answers.update(zip(paths, clf.topk(inputs, k=min(args.top, len(classes)))))
    for path in args.files:
        if path in answers:
            print(path)
            for name, prob in answers[path]:
                print(f"  {name:<{width}}  {prob:6.3f}")
    _exit_if_failed("zeroshot", failed)


def _file_reader(processor: Any, modality: str) -> Callable[[str], Any]:
    """A file path → what the model's API takes of it, decoded as its processor decodes files: a PIL image (in the
    processor's mode) or a waveform (S,) at its rate. The commands decode each file first, so that one that cannot be
    read is skipped (:func:`_readable_batches`) rather than failing its whole batch."""
    from mmformer.data.io import read_image

    return functools.partial(read_image, mode=processor.image_mode) if modality == "image" else processor.load_audio


def _readable_batches(
    files: list[str], read: Callable[[str], Any], batch_size: int, command: str, failed: list[str]
) -> Iterator[tuple[list[str], list]]:
    """``files`` in batches of ``batch_size``, each file decoded by ``read``: yields (paths, decoded) of a batch's
    readable files; one that cannot be read is skipped with a warning naming it (:func:`~mmformer.data.io.read_each`)
    and its message added to ``failed``, for :func:`_exit_if_failed` once the others' results are out."""
    from mmformer.data.io import read_each

    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        values, errors = read_each(chunk, read, command)
        failed.extend(errors.values())
        readable = [(path, value) for path, value in zip(chunk, values) if value is not None]
        if readable:
            yield [path for path, _ in readable], [value for _, value in readable]


def _exit_if_failed(command: str, failed: list[str]) -> None:
    """After the readable files' results: a non-zero exit naming each file that could not be read (each was warned
    about as it was skipped), so that a script sees the failure and a person the others' results."""
    if failed:
        raise SystemExit(f"mmformer {command}: error: " + "; ".join(failed))


def _options(args: argparse.Namespace):
    """The DecodingOptions of parsed flags (a repeatable flag given no times keeps the field's default)."""
    from mmformer.generation.options import DecodingOptions

    greedy = {}
    if args.temperature == 0 and args.do_sample is not True:  # greedy, as for transcribe and OpenAI's temperature 0
        # (DecodingOptions itself takes temperature > 0: a divisor of the logits)
        greedy = {"temperature": 1.0, "do_sample": False}
    return dataclass_of(DecodingOptions, args, **greedy)


def _caption(args: argparse.Namespace) -> None:
    model = _load_model(args.model, args.device, args.adapter)
    options, prefix, failed = _options(args), _decoder_prefix(args, model), []
    read = _file_reader(model.processor, "image")
    for paths, images in _readable_batches(args.files, read, args.batch_size, "caption", failed):
        for path, text in zip(paths, model.caption(images, options=options, prefix_embeds=prefix)):
            print(f"{path}\t{text}")
    _exit_if_failed("caption", failed)


WHISPER_FLAG_HINTS = {  # DecodingOptions flags with a TranscribeOptions counterpart a Whisper checkpoint reads
    "num_beams": "; use --beam-size (openai-whisper's beam width)",
    "do_sample": "; a --temperature above 0 samples",
}


def _refuse_decoding_flags(args: argparse.Namespace, exclude: set[str]) -> None:
    """A Whisper checkpoint decodes with openai-whisper's algorithm, read from TranscribeOptions alone: a
    DecodingOptions flag (less those in ``exclude``, TranscribeOptions' own) given away from its default would be
    ignored, so the first is refused by name, before DecodingOptions would check it against defaults that path never
    uses (``--min-new-tokens 50`` against ``max_new_tokens`` 30)."""
    from mmformer.generation.options import DecodingOptions

    for f in dataclasses.fields(DecodingOptions):
        value = getattr(args, f.name, None)
        if f.name in exclude or (isinstance(f.default, tuple) and value is None):  # a repeatable flag not given
            continue
        if value != f.default:
            flag = "--" + f.name.replace("_", "-")
            raise ValueError(f"{flag}: a Whisper checkpoint decodes with openai-whisper's algorithm, which does not "
                             f"read it{WHISPER_FLAG_HINTS.get(f.name, '')}; got {value!r}")  # fmt: skip


def _temperatures(args: argparse.Namespace) -> tuple[float, ...] | None:
    """``--temperature`` values (flattened), or openai-whisper's schedule from the first one by
    ``--temperature-increment-on-fallback`` up to 1.0; None when neither is given."""
    given = [t for group in args.temperature or [] for t in group]
    step = args.temperature_increment_on_fallback
    if step is None:
        return tuple(given) or None
    if step <= 0:
        raise ValueError(f"--temperature-increment-on-fallback: expected a number > 0, got {step}")
    first = given[0] if given else 0.0
    return tuple(round(first + i * step, 6) for i in range(int((1.0 - first) / step + 1e-6) + 1))


class _Progress:
    """A tqdm bar in audio seconds with the realtime factor (audio seconds per wall second), on stderr."""

    def __init__(self) -> None:
        import time

        self.clock = time.perf_counter
        self.start, self.done, self.bar = self.clock(), 0.0, None

    def __call__(self, seconds: float, total: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            bar = "{l_bar}{bar}| {n:.1f}/{total:.1f} audio s [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(total=round(total, 1), file=sys.stderr, dynamic_ncols=True, bar_format=bar)
        self.done += seconds
        self.bar.update(round(self.done, 1) - self.bar.n)
        self.bar.set_postfix_str(f"{self.done / max(self.clock() - self.start, 1e-9):.1f}x realtime", refresh=False)

    def write(self, text: str, file: Any = None) -> None:
        """A line on ``file`` (default stderr) above the bar, which is drawn again below it (tqdm's ``write``)."""
        if self.bar is None:
            print(text, file=file or sys.stderr)
        else:
            self.bar.write(text, file=file or sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _transcribe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mmformer.generation.options import DecodingOptions
    from mmformer.longform import (
        TranscribeOptions,
        VadOptions,
        decoding_options,
        has_timestamps,
        transcribe_files,
        with_compute_type,
    )

    if args.output_dir is not None and not args.output_format:  # it was ignored: the transcripts went to stdout
        raise ValueError(f"--output-dir: writes files only with --output-format (one of {', '.join(OUTPUT_FORMATS)}); "
                         f"without it the transcripts print to stdout; got --output-dir {args.output_dir!r} and no "
                         "--output-format")  # fmt: skip
    output_dir = Path(args.output_dir or ".")
    if args.output_format:  # one transcript per stem: a.flac and a.wav (or x/a.flac, y/a.flac) would collide
        stems: dict[str, str] = {}
        for path in args.files:
            if stems.setdefault(Path(path).stem, path) != path:
                raise ValueError(f"files: {stems[Path(path).stem]} and {path} would both write "
                                 f"{output_dir / Path(path).stem}.*; transcribe them into different "
                                 "--output-dir folders")  # fmt: skip
        output_dir.mkdir(parents=True, exist_ok=True)  # a file there stops the run before any work
    model = _load_model(args.model, args.device, args.adapter)
    temperature = _temperatures(args)
    options = dataclass_of(TranscribeOptions, args, **({"temperature": temperature} if temperature else {}))
    owned = {f.name for f in dataclasses.fields(TranscribeOptions)}
    whisper = has_timestamps(model)
    if whisper:
        _refuse_decoding_flags(args, exclude=owned)
    elif args.temperature_increment_on_fallback is not None:
        raise ValueError(f"--temperature-increment-on-fallback: needs a Whisper checkpoint (fallback over "
                         f"temperatures); {args.model} decodes each window once at one --temperature; got "
                         f"{args.temperature_increment_on_fallback}")  # fmt: skip
    else:
        options = decoding_options(model, options, base=dataclass_of(DecodingOptions, args, exclude=owned))
    progress = None if args.no_progress else _Progress()
    runner, bf16, compute = with_compute_type(model, args.compute_type, args.model)
    if args.compute_type != "float32":
        print(f"mmformer transcribe: the audio encoder's {compute}", file=sys.stderr)
    failed: list[str] = []
    write = None
    if args.output_format:
        write = functools.partial(_write_outputs, args.files, output_dir, args.output_format, failed, progress)
    try:
        results = transcribe_files(
            runner,
            args.files,
            options=options,
            vad=args.vad,
            vad_options=dataclass_of(VadOptions, args, prefix="vad_"),
            batch_size=args.batch_size,
            progress=progress,
            prefix_embeds=_decoder_prefix(args, model),
            bf16_encoder=bf16,
            on_result=write,
        )
    finally:
        if progress is not None:
            progress.close()
    errors = [result["error"] for result in results if "error" in result]
    if not args.output_format:
        for path, result in zip(args.files, results):
            if "error" not in result:
                print(f"{path}\t{result['text']}")
    _exit_if_failed("transcribe", errors + failed)


def _write_outputs(
    files: list[str],
    output_dir: str | os.PathLike,
    output_format: str,
    failed: list[str],
    progress: _Progress | None,
    index: int,
    result: dict[str, Any],
) -> None:
    """``transcribe --output-format``'s ``on_result``: the finished file's outputs written at once (as openai-whisper
    writes each file's), so that an interruption or a later failure keeps them. An output that cannot be written (a
    folder in its way, a full disk) is reported by path and OS error and added to ``failed``, and the run goes on:
    :func:`_exit_if_failed` names it at the end. An unreadable input's error result writes nothing."""
    from pathlib import Path

    from mmformer.longform.writers import output_formats, write_result

    if "error" in result:
        return
    stem = Path(output_dir) / Path(files[index]).stem
    say = print if progress is None else progress.write
    for name in output_formats(output_format):
        try:
            (written,) = write_result(result, stem, name)
        except OSError as e:
            failed.append(f"cannot write {stem}.{name}: {e.strerror or e}")
            say(f"mmformer transcribe: {failed[-1]}", file=sys.stderr)
        else:
            say(f"wrote {written}", file=sys.stderr)


def _decoder_prefix(args: argparse.Namespace, model: Any):
    """The learned decoder prefix vectors of ``--prompt`` (prompt tuning), on the device; None without one."""
    if not args.prompt:
        return None
    from mmformer.adapt.prompts import DecoderPrefix, load_prompt

    return load_prompt(args.prompt, model, kind=DecoderPrefix.kind).vectors.to(args.device)


def _complete(args: argparse.Namespace) -> None:
    from mmformer.generation.token_choice import row_generators

    model = _load_model(args.model, args.device, args.adapter)
    options, prefix = _options(args), _decoder_prefix(args, model)
    generators = None  # one per prompt: a prompt samples the same text whatever --batch-size, or --stream
    if args.seed is not None:
        generators = row_generators(args.seed, len(args.prompts), args.device)
    if args.stream:
        _complete_streaming(args, model, options, generators, prefix)
        return
    for start in range(0, len(args.prompts), args.batch_size):
        chunk = args.prompts[start : start + args.batch_size]
        generator = None if generators is None else generators[start : start + args.batch_size]
        texts = model.complete(chunk, options=options, generator=generator, prefix_embeds=prefix)
        for i, (prompt, text) in enumerate(zip(chunk, texts)):
            if start + i:
                print()
            print(f"{prompt}{text}")


def _complete_streaming(args: argparse.Namespace, model: Any, options: Any, generators: Any, prefix: Any) -> None:
    """``complete --stream``: each prompt, then its continuation piece by piece as the tokens are decoded, a blank
    line between prompts: the same text the batched command prints, sampled too (``generators``: one per prompt, the
    ones the batched command samples each prompt with; None without ``--seed``, whose samples differ run to run)."""
    from mmformer.generation.streaming import TextStreamer

    if options.num_beams > 1:
        raise ValueError(f"--stream: streaming decodes greedily or by sampling; got --num-beams {options.num_beams}")
    for i, prompt in enumerate(args.prompts):
        if i:
            print()
        print(prompt, end="", flush=True)
        streamer = TextStreamer(model.processor.tokenizer)  # prints each stable piece, then a newline at the end
        generator = None if generators is None else generators[i : i + 1]
        model.complete([prompt], options=options, generator=generator, prefix_embeds=prefix, streamer=streamer)


def _serve(args: argparse.Namespace) -> None:
    from mmformer.serve import serve

    options = {k: getattr(args, k) for k in ("adapter", "host", "port", "max_batch_size", "batch_timeout_ms")}
    serve(args.model, **options, api_key=args.api_key, max_upload_mb=args.max_upload_mb,
          max_audio_seconds=args.max_audio_seconds, device=args.device, compute_type=args.compute_type)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] == "--version":
        print(f"mmformer {_version()}")
        return
    if argv[0] in TRAIN_COMMANDS:
        from mmformer.cli.training import run_training_cli

        with _out_of_memory_in_one_line(argv[0], "a smaller --data.batch_size or shorter samples"):
            run_training_cli(argv)
        return
    args = build(argv[0]).parse_args(argv)  # the options of argv[0] alone: most need no torch
    handlers = {
        "zeroshot": _zeroshot,
        "export": artifacts.export,
        "quantize": artifacts.quantize_folder,
        "merge": artifacts.merge,
        "convert": artifacts.convert,
        "caption": _caption,
        "transcribe": _transcribe,
        "complete": _complete,
        "serve": _serve,
    }
    if args.command not in handlers:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"mmformer: unknown command {argv[0]!r}")
    from mmformer.data.io import SampleError

    try:
        with _out_of_memory_in_one_line(args.command, _smaller_batch(args)):
            if args.command in artifacts.WRITE_OUT:
                artifacts.refuse_saved_out(args)
            _check_device(getattr(args, "device", None))
            handlers[args.command](args)
    except BrokenPipeError:  # the reader of stdout has gone (`| head -1`): not an error to report, see run()
        raise
    except (SampleError, OSError, ValueError, ImportError) as e:  # OSError: a folder in the way, a full disk, ...
        raise SystemExit(f"mmformer {args.command}: error: {e}") from None  # (stdout's own: StdoutError, see run())
    except Warning as e:  # one the warning filter makes an error (-W error, PYTHONWARNINGS=error)
        raise SystemExit(f"mmformer {args.command}: error: {warning_as_error(e)}") from None


def _version() -> str:
    """The installed package's version (its metadata: no torch import); the source tree's where it is not installed
    (``python -m mmformer`` from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmformer")
    except PackageNotFoundError:
        from mmformer import __version__

        return f"{__version__} (not installed)"


def warning_as_error(e: Warning) -> str:
    """A warning raised as an exception (the user's ``-W error`` or ``PYTHONWARNINGS=error``), for an error line."""
    return f"{type(e).__name__}: {e} (a warning, made an error by the warning filter: -W error / PYTHONWARNINGS)"


@contextlib.contextmanager
def _out_of_memory_in_one_line(command: str, less: str) -> Iterator[None]:
    """Running out of memory anywhere in ``command``: one line naming it and what to lower (``less``), not a traceback
    through torch. A MemoryError is an allocation refused (Python's, numpy's: ``ulimit -v``, a container's limit);
    torch's OutOfMemoryError a GPU's. (torch's CPU allocator raises a plain RuntimeError, "can't allocate memory",
    which is not caught here: RuntimeError is every other torch failure too.)"""
    try:
        yield
    except (MemoryError, *_torch_out_of_memory()) as e:
        detail = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise SystemExit(f"mmformer {command}: error: out of memory ({detail}); ask for less at once: {less}") from None


def _smaller_batch(args: argparse.Namespace) -> str:
    """What a command that ran out of memory can lower: its batch flag (with the value it had), its inputs."""
    for name in ("batch_size", "max_batch_size"):
        if getattr(args, name, None) is not None:
            return f"a smaller --{name.replace('_', '-')} (it was {getattr(args, name)}) or shorter inputs"
    return "shorter or fewer inputs"


def _torch_out_of_memory() -> tuple[type[BaseException], ...]:
    """torch's OutOfMemoryError where torch is loaded (a command that failed before loading it met none)."""
    torch = sys.modules.get("torch")
    return (torch.OutOfMemoryError,) if torch is not None else ()


def _check_device(device: str | None) -> None:
    """``--device cuda`` where torch sees no GPU: named before any loading (torch's own error is a traceback)."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device: got {device!r}, but torch {torch.__version__} sees no CUDA GPU here; use cpu")


def run() -> None:
    """The command-line entry point: :func:`main` with ``sys.argv``, then an exit without the interpreter's final
    garbage collections. They walked every object that torch, Lightning and their imports had loaded: 1.5 s of CPU
    and 3–4 s of wall time per process on a busy 2-core machine, after the work was done, and a multi-process ``fit``
    ends when its last process does. Frozen (``gc.freeze``), the objects are freed by reference counting alone;
    ``atexit`` handlers still run and output is flushed, and objects in reference cycles are left unfinalized (which
    Python never promises at exit anyway). An error or an explicit exit leaves the usual way. Warnings print as one
    line, ``mmformer: WarningClass: message`` (Python's format adds the warning's source file and code line, which
    tell a command's user nothing).

    Ctrl-C (SIGINT: a KeyboardInterrupt, which :func:`main` lets through, so the ``finally`` blocks on its way out
    have run: the progress bar closed, an atomic save's staging removed, the previous output kept) ends with one line,
    ``mmformer COMMAND: interrupted``, and exit status 130 (128 + SIGINT, as a shell reports a command Ctrl-C
    stopped), not a traceback through torch. A reader that closes stdout early (``mmformer caption ... | head -1``)
    is not an error: Python's recipe for SIGPIPE (the ``signal`` module's "Note on SIGPIPE": stdout pointed at
    /dev/null, so that the interpreter's last flush cannot fail again) with no message and exit status 141 (128 +
    SIGPIPE, what a shell reports for a tool SIGPIPE killed, as ``yes | head -1`` under ``set -o pipefail``), so
    that a script can tell it from an error's 1.

    A stdout that cannot take the output is an error, said once: ``mmformer COMMAND: error: cannot write the output
    to stdout: REASON`` and exit status 1, at the first write that fails (:class:`StdoutError`; a full disk, ``>
    /dev/full``, was a bare "[Errno 28] No space left on device"). So is a stdout closed from the start (``>&-``),
    where Python leaves ``sys.stdout`` None, ``print`` dropped every result silently and the last flush raised an
    AttributeError: unlike a reader that took the lines it wanted and left, nobody got any of them, and 141 would
    claim a SIGPIPE that never came (coreutils say "write error: Bad file descriptor" there too). ``>/dev/null``
    discards the output quietly."""
    warnings.formatwarning = _one_line_warning
    if not isinstance(sys.stdout, _Stdout):
        sys.stdout = _Stdout(sys.stdout)
    try:
        main()
        sys.stdout.flush()  # here, where a closed pipe is handled, not at the interpreter's exit
    except KeyboardInterrupt:
        print(f"{_prog()}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        _discard_output(sys.stdout)
        raise SystemExit(141) from None
    except StdoutError as e:  # --help's or --version's text, or the last flush (main() says its commands' own)
        raise SystemExit(f"{_prog()}: error: {e}") from None
    gc.freeze()


def _prog() -> str:
    """``mmformer COMMAND`` of the command line, for a line run() prints; ``mmformer`` before a command."""
    command = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    return f"mmformer{' ' + command if command else ''}"


class StdoutError(OSError):
    """stdout cannot take the command's output: closed from the start, a full disk, an I/O error. (A reader that has
    gone, BrokenPipeError, is not one: see :func:`run`.) An OSError, so that the commands' error line says it."""

    def __str__(self) -> str:
        return f"cannot write the output to stdout: {self.strerror}"


class _Stdout:
    """``sys.stdout`` under :func:`run`: the stream itself (every attribute is the stream's), whose writes and flushes
    that fail raise :class:`StdoutError` naming stdout and the reason, rather than an OSError naming nothing. After
    the first, its descriptor points at os.devnull (as for a closed pipe), so that the interpreter's last flush of
    what is still buffered cannot fail again, and each later write raises the same error."""

    def __init__(self, stream: TextIO | None) -> None:
        self._error = None
        if stream is None:  # descriptor 1 closed (`>&-`): print() dropped every line silently
            # devnull takes the lowest free descriptor, 1 where stdin is open: no file the command writes lands there
            stream = open(os.devnull, "w")  # noqa: SIM115 (held for the process's life, as stdout is)
            self._error = StdoutError(errno.EBADF, "it is closed (redirect it to a file, or to /dev/null to discard "
                                                   "the output)")  # fmt: skip
        self._stream = stream

    def write(self, text: str) -> int:
        return self._call("write", text)

    def writelines(self, lines: Any) -> None:
        self._call("writelines", lines)

    def flush(self) -> None:
        if self._error is None:  # after an error: nothing left to say, and what is buffered goes to os.devnull
            self._call("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _call(self, name: str, *args: Any) -> Any:
        if self._error is not None:
            raise self._error
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:  # the reader has gone: run() ends quietly
            raise
        except OSError as e:
            self._error = StdoutError(e.errno, e.strerror or str(e))
            with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor (a test's) has nothing to
                _discard_output(self._stream)  # flush at exit
            raise self._error from e


def _discard_output(stream: TextIO) -> None:
    """Python's recipe for a stdout that can take no more (the ``signal`` module's "Note on SIGPIPE"): its descriptor
    pointed at os.devnull, so that the interpreter's last flush of what is still buffered cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"mmformer: {category.__name__}: {message}\n"


if __name__ == "__main__":
    run()
