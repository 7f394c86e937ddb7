"""The argument parser of ``mmformer``'s inference and interop sub-commands: one builder per sub-command, and
:func:`build`, which fills in only the options of the command being run.

Some options come from torch-side dataclasses (caption, transcribe and complete take theirs from ``DecodingOptions``
and the long-form options), whose import loads torch; building only the command's own options keeps ``mmformer merge
--help``, ``mmformer export --help`` and their usage errors free of it. Also here: the flags ↔ dataclass mapping
(:func:`dataclass_flags`, :func:`dataclass_of`), which the handlers use after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from mmformer.cli import artifacts

USAGE_LINE = "mmformer <command> [options]"  # argparse prints it after its own "usage: "
USAGE = f"""usage: {USAGE_LINE}
       mmformer --help | --version

Training (a LightningCLI; `mmformer fit --help` lists every option):
  fit        train:            mmformer fit --config configs/digits.yaml [--trainer.precision bf16-mixed]
  validate   validation loop:  mmformer validate --config ... --ckpt_path ...
  test       test loop:        mmformer test --config ... --ckpt_path ...
  predict    predictions:      mmformer predict --config ... --ckpt_path ...

Inference and interop:
  export      checkpoint → pretrained directory:  mmformer export --ckpt runs/.../last.ckpt --out out/model
              (a LoRA run's checkpoint → its adapter folder, --merge → the merged model; a prompt run's → its prompt)
              towers → ONNX / torch.export:        mmformer export --model out/model --format onnx --out out/onnx
  quantize    torchao int8 / int4 weights:         mmformer quantize --model out/model --method dynamic --out out/int8
              x86 int8 graphs (compiled):          mmformer quantize --backend pt2e --method static --calib M --out DIR
  merge       base + LoRA adapter → plain model:   mmformer merge --base DIR --adapter DIR --out DIR
  zeroshot    zero-shot classification:            mmformer zeroshot --model out/model --classes a,b,c FILES...
  caption     image captioning:                    mmformer caption --model out/model FILES...
  transcribe  speech to text:                      mmformer transcribe --model out/model FILES...
  complete    continue text prompts (an LM):       mmformer complete --model out/model "Once upon" ... [--stream]
  convert     public checkpoint → pretrained dir:  mmformer convert SRC --out out/model [--from open_clip]
  serve       OpenAI-compatible HTTP server:       mmformer serve --model out/model [--port 8000] [--api-key KEY]

Every --model and convert SRC may be a local folder or file, a Hugging Face Hub id (openai/whisper-tiny),
open_clip:MODEL/TAG (open_clip:ViT-B-32/openai) or timm:NAME (timm:vit_base_patch16_224.augreg_in21k).
"""
MODEL_HELP = (
    "a pretrained folder or training checkpoint, a Hugging Face folder or Hub id, open_clip:MODEL/TAG or timm:NAME"
)
OUTPUT_FORMATS = ("txt", "json", "srt", "vtt", "tsv", "all")


def build(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mmformer`` parser with every sub-command (so an unknown one is refused naming them all, and each has its
    ``usage: mmformer NAME`` prog), but the options of ``command`` alone: the one being run, ``argv[0]`` (None: every
    command's options)."""
    parser = argparse.ArgumentParser(prog="mmformer", usage=USAGE_LINE, add_help=False)
    sub = parser.add_subparsers(dest="command", prog="mmformer")  # each sub-command: "usage: mmformer NAME ..."
    for name, summary in TRAIN_HELP.items():  # named in the choices; mmformer.cli.main runs them (LightningCLI)
        sub.add_parser(name, help=summary, add_help=False)
    for name, (summary, add_options) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if command is None or name == command:
            add_options(p)
    return parser


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="Lightning checkpoint (.ckpt)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format",
        choices=("pretrained", "onnx", "torch-export"),
        default="pretrained",
        help="pretrained: config.json + model.safetensors; onnx / torch-export: a graph per tower and decoder step",
    )
    p.add_argument("--towers", help="comma-separated towers to export (image,audio,text,decoder; default: all)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: mmformer.ship.export.OPSET)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing mmformer directory")
    p.add_argument("--merge", action="store_true", help="a LoRA run's checkpoint: write the merged model")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--backend",
        choices=("torchao", "pt2e", "onnxruntime"),
        default="torchao",
        help="torchao (weight-only, GPU; the default); pt2e: x86 CPU int8 graphs compiled with inductor (static, "
        "calibrated with --calib: the fast one, its products as inductor's C++ GEMM templates; dynamic: oneDNN's "
        "kernels); onnxruntime: int8 ONNX graphs for the torch-free runner (dynamic, static)",
    )
    p.add_argument("--method", required=True, help="dynamic | int8-weight | int4-weight | static (torchao)")
    p.add_argument("--towers", help="pt2e / onnxruntime: comma-separated towers (image,audio,text,decoder)")
    p.add_argument("--calib", help="data manifest (CSV/TSV/JSONL) whose samples calibrate static int8")
    unset = {name: option.unset for name, option in artifacts.QUANTIZE_OPTIONS.items()}  # the defaults: "not given"
    p.add_argument(
        "--calib-samples", type=int, default=unset["calib_samples"], help="calibration samples read from --calib"
    )
    p.add_argument(
        "--group-size", type=int, default=unset["group_size"], help="input channels per int4 group (32, 64, 128)"
    )
    p.add_argument("--embeddings", action="store_true", help="int8 embedding tables (and a tied LM head) too")
    p.add_argument(
        "--float-storage",
        choices=("float32", "bfloat16", "float16"),
        default=unset["float_storage"],
        help="dtype of the tensors left in float in the file (bfloat16: a smaller file)",
    )
    p.add_argument("--device", default="cpu", help="where to quantize (int4 packs for this device)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing mmformer directory")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base model the adapter was trained on")
    p.add_argument(
        "--adapter", required=True, help="the adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing mmformer directory")


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder applied on top of --model")
    p.add_argument("--prompt", default=None, help="a learned context prompt file (CoOp) in place of --templates")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="comma-separated class names")
    names.add_argument("--classes-file", help="a UTF-8 text file of class names, one a line (names may hold commas, as "
                       "ImageNet's 'tench, Tinca tinca'; open_clip's IMAGENET_CLASSNAMES, one a line)")  # fmt: skip
    p.add_argument("--templates", default="{}", help="'|'-separated prompt templates with {} for the class name")
    p.add_argument("--modality", choices=("auto", "image", "audio"), default="auto")
    p.add_argument("--top", type=_at_least_one, default=3, help="classes shown per file")
    p.add_argument("--device", default="cpu")
    _compute_type_flag(p, False, "the encoders under bf16 autocast (bfloat16)")
    p.add_argument("files", nargs="+")


def _decoding_args(p: argparse.ArgumentParser, inputs: str = "files", what: str = "input files") -> None:
    """``caption``'s flags (``complete``'s too, with its prompts as ``inputs``): the model and DecodingOptions."""
    from mmformer.generation.options import DecodingOptions

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder applied on top of --model")
    p.add_argument("--prompt", default=None, help="a learned decoder prefix file (prompt tuning)")
    for flag, kwargs in dataclass_flags(DecodingOptions):
        p.add_argument(flag, **kwargs)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=_at_least_one, default=16)
    p.add_argument(inputs, nargs="+", help=what)


def _complete_args(p: argparse.ArgumentParser) -> None:
    _decoding_args(p, "prompts", "text prompts")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (reproducible samples)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="print each continuation as it is decoded (one prompt at a time; greedy or sampling, not beams)",
    )


def _transcribe_args(p: argparse.ArgumentParser) -> None:
    """``transcribe``'s flags: the model, the DecodingOptions each window is decoded with (less the names
    TranscribeOptions owns: temperature, language, task), TranscribeOptions, VadOptions as ``--vad-*``, the batch
    and the outputs."""
    from mmformer.generation.options import DecodingOptions
    from mmformer.longform.options import TranscribeOptions, VadOptions

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder applied on top of --model")
    p.add_argument("--prompt", default=None, help="a learned decoder prefix file (prompt tuning)")
    owned = {f.name for f in dataclasses.fields(TranscribeOptions)}
    for flag, kwargs in dataclass_flags(DecodingOptions):
        if flag[2:].replace("-", "_") not in owned:
            p.add_argument(flag, **kwargs)
    for flag, kwargs in dataclass_flags(TranscribeOptions):
        if flag == "--temperature":  # "0" (no fallback), "0,0.2,0.4" or the flag repeated (a schedule)
            kwargs.update(type=_float_list, help=kwargs["help"] + " (comma-separated or repeated)")
        p.add_argument(flag, **kwargs)
    p.add_argument(
        "--temperature-increment-on-fallback",
        type=float,
        default=None,
        help="fallback temperatures from the first --temperature up to 1.0 in these steps (openai-whisper's flag)",
    )
    p.add_argument(
        "--vad",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cut every file at its speech (Silero VAD) and decode the windows of all files in batches; --no-vad: "
        "consecutive windows; default: VAD for files longer than the model's window",
    )
    for flag, kwargs in dataclass_flags(VadOptions, prefix="vad-"):
        p.add_argument(flag, **kwargs)
    p.add_argument("--device", default="cpu")
    _compute_type_flag(
        p,
        "int8",
        "a Whisper checkpoint's audio encoder (the decoder stays float32): int8 quantized at "
        "load (PT2E dynamic, x86 CPUs; compiled on its first windows); bfloat16 under torch.autocast, the decoder's "
        "cross-attention keys/values kept in bf16",
    )
    p.add_argument("--batch-size", type=_at_least_one, default=16, help="windows decoded at once, drawn from all files")
    p.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="write each file's transcript as FILE.<format> in --output-dir as soon as the file is transcribed "
        "(default: print path<TAB>text)",
    )
    p.add_argument("--output-dir", default=None, help="folder for --output-format files (default: the current one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("files", nargs="+", help="audio files")


def _convert_args(p: argparse.ArgumentParser) -> None:
    from mmformer.convert import SOURCES  # names only: the converters themselves load when one is used

    p.add_argument(
        "--from",
        dest="source",
        default=None,
        choices=sorted(SOURCES),
        help="the converter for SRC (default: decided from its files; needed for bare state-dict files)",
    )
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--revision", default=None, help="a Hub branch, tag or commit (Hub ids)")
    p.add_argument("--overwrite", action="store_true")
    artifacts.add_convert_options(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder applied on top of --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="a TCP port 0-65535 (0: any free one)")
    p.add_argument("--max-batch-size", type=int, default=32, help="inputs per model call, across requests")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="larger request bodies get 413")
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=10800.0,
        help="longer recordings sent to /v1/audio/transcriptions get 413, decoded no further (default 3 hours)",
    )
    p.add_argument("--device", default="cpu")
    _compute_type_flag(
        p,
        "int8",
        "a Whisper checkpoint's transcriptions read their audio through its encoder in int8 "
        "(PT2E dynamic, quantized at start) or bfloat16 (autocast), as transcribe's; the other routes "
        "stay float32",
    )


# The training commands, LightningCLI's subcommands (mmformer.cli.training builds their options): their help
TRAIN_HELP = {
    "fit": "train a model (LightningCLI; `mmformer fit --help` lists every option)",
    "validate": "run the validation loop on a checkpoint",
    "test": "run the test loop on a checkpoint",
    "predict": "write predictions of a checkpoint",
}

# Every inference and interop sub-command, in the order listed: its one-line help and the builder of its options
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "export": ("write a pretrained directory, or each tower as ONNX / torch.export graphs", _export_args),
    "quantize": ("quantize a model: torchao, PT2E x86 int8 (compiled) or onnxruntime int8", _quantize_args),
    "merge": ("fold a LoRA adapter into its base model and save the plain model", _merge_args),
    "zeroshot": ("zero-shot classification of images or audio files", _zeroshot_args),
    "caption": ("caption image files", _decoding_args),
    "transcribe": ("transcribe audio files of any length", _transcribe_args),
    "complete": ("continue text prompts with a language model", _complete_args),
    "convert": ("convert a public checkpoint into a pretrained directory", _convert_args),
    "serve": ("serve a model over HTTP: OpenAI-compatible routes, zero-shot, a page at /", _serve_args),
}


def _compute_type_flag(p: argparse.ArgumentParser, int8: bool, what: str) -> None:
    """``--compute-type``: float32 (the default), bfloat16, auto (bfloat16 where the CPU has AMX; the choice is
    printed) and, with ``int8``, int8."""
    choices = ("float32", "int8", "bfloat16", "auto") if int8 else ("float32", "bfloat16", "auto")
    auto = "auto: bfloat16 where the CPU has AMX, else float32 (the choice is printed)"
    p.add_argument("--compute-type", choices=choices, default="float32", help=f"{what}; {auto}")


def dataclass_flags(cls: type, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """``argparse`` flags for every field of an options dataclass, so that the dataclass stays the one place its
    options, defaults and help live: ``max_new_tokens: int = 30`` → ``--max-new-tokens`` (type int, default 30);
    booleans get ``--flag/--no-flag``; a tuple of strings is a flag given once per item; the help comes from the
    field's ``metadata["help"]``; ``prefix`` names the flags of a group (``vad-`` → ``--vad-threshold``, stored as
    ``vad_threshold``); a number that may be None (``float | None``) also takes ``none``."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        optional = False
        if isinstance(kind, types.UnionType):  # "int | None" → int
            optional = type(None) in kind.__args__
            kind = next(k for k in kind.__args__ if k is not type(None))
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (tuple, list):  # "tuple[str, ...]" → --flag A --flag B
            kwargs.update(action="append", type=typing.get_args(kind)[0], default=None)
        else:
            kwargs["type"] = _or_none(kind) if optional and kind in (int, float) else kind
        flags.append(("--" + prefix + f.name.replace("_", "-"), kwargs))
    return flags


def dataclass_of(cls: type, args: argparse.Namespace, prefix: str = "", exclude: set[str] = frozenset(), **values):
    """An options dataclass from the flags :func:`dataclass_flags` made of it, parsed (a repeatable flag given no
    times, or a field in ``exclude``, keeps the field's default; ``values`` override fields)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        value = getattr(args, prefix + f.name)
        if not (isinstance(f.default, tuple) and value is None):
            kwargs[f.name] = value
    return cls(**{**kwargs, **values})


def _or_none(kind: type) -> Callable[[str], Any]:
    """The ``argparse`` type of an ``int | None`` or ``float | None`` field: ``none`` (any case) → None, as
    openai-whisper's ``optional_int`` / ``optional_float`` take it (``--no-speech-threshold none``: no silence
    skipping), else ``kind(text)``. A string field keeps "none" as text (an initial prompt may say it)."""
    expected = {int: "an int", float: "a number"}[kind]

    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} or none, got {text!r}") from None

    return parse


def _float_list(value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {value!r}") from None


def _at_least_one(text: str) -> int:
    """``--batch-size``, ``zeroshot --top``: refused by the parser (before the model loads) below 1, the error naming
    the flag, as ``transcribe_files`` refuses its ``batch_size`` (0 printed nothing, or "range() arg 3 must not be
    zero"; ``--top 0`` named the classifier's ``k``)."""
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    """``serve --port``: refused by the parser (before the model loads) outside 0-65535."""
    port = int(text) if text.strip().lstrip("-").isdigit() else None
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535 (0: any free one), got {text!r}")
    return port
