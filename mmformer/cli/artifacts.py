"""The ``mmformer`` sub-commands that write a model folder: ``export``, ``quantize`` (torchao, PT2E, onnxruntime),
``merge`` (a LoRA adapter into its base) and ``convert`` (a public checkpoint). Each takes the parsed flags of
:func:`mmformer.cli.parser.build` and prints what it wrote."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

WRITE_OUT = ("export", "quantize", "merge", "convert")  # the commands here: each writes --out
BACKENDS = ("torchao", "pt2e", "onnxruntime")  # quantize --backend


@dataclass(frozen=True)
class QuantizeOption:
    """One of ``mmformer quantize``'s options beside --model, --method and --out: the value it has when not given,
    and the requests that read it (--backend, --method); given to any other, it is refused, not ignored."""

    unset: Any
    backends: tuple[str, ...] = BACKENDS
    methods: tuple[str, ...] | None = None  # None: every method of those backends

    def reads(self, backend: str, method: str) -> bool:
        return backend in self.backends and (self.methods is None or method in self.methods)

    def readers(self) -> str:
        backends = [] if self.backends == BACKENDS else [f"--backend {' or '.join(self.backends)}"]
        return " ".join(backends + ([f"--method {' or '.join(self.methods)}"] if self.methods else []))


# Which quantize options each backend and method reads: the one place that knows, and of their defaults (the
# quantize parser takes its defaults from the unset values)
QUANTIZE_OPTIONS = {
    "towers": QuantizeOption(None, backends=("pt2e", "onnxruntime")),  # torchao quantizes every linear layer
    "calib": QuantizeOption(None, methods=("static",)),
    "calib_samples": QuantizeOption(128, methods=("static",)),
    "group_size": QuantizeOption(32, backends=("torchao",), methods=("int4-weight",)),
    "embeddings": QuantizeOption(False, backends=("torchao",)),
    "float_storage": QuantizeOption("float32", backends=("torchao",)),
}


def refuse_saved_out(args: argparse.Namespace) -> None:
    """``--out`` holding a saved model, export or int8 folder is refused before any work unless ``--overwrite`` (the
    save itself refuses it too, but only after loading, calibrating and quantizing)."""
    from pathlib import Path

    from mmformer.io.pretrained import ARTIFACT_FILES, CONFIG_NAME

    out = Path(args.out)
    if not args.overwrite and out.is_dir() and any((out / name).exists() for name in (CONFIG_NAME, *ARTIFACT_FILES)):
        raise ValueError(f"--out: {out} already holds a saved model or export; pass --overwrite to replace it")


def export(args: argparse.Namespace) -> None:
    """A pretrained folder or graphs of ``--model``, or of what a training run's ``--ckpt`` learned (see
    :func:`mmformer.tasks.adapt.export_checkpoint`: an adapter, a prompt, a model, the merged model)."""
    from mmformer.io.auto import load_pretrained

    if (args.ckpt is None) == (args.model is None):
        raise ValueError("pass exactly one of --ckpt (a training checkpoint) and --model (a pretrained folder)")
    if args.merge and args.ckpt is None:
        raise ValueError(
            f"--merge: only with --ckpt (a LoRA run's checkpoint), got --model {args.model}; an adapter folder merges "
            "into its base with `mmformer merge --base DIR --adapter DIR --out DIR`"
        )
    if args.ckpt is not None and args.format == "pretrained":
        from mmformer.tasks.adapt import export_checkpoint

        print(f"wrote {export_checkpoint(args.ckpt, args.out, merge=args.merge, overwrite=args.overwrite)}")
        return
    if args.ckpt is not None:
        from mmformer.tasks.adapt import checkpoint_model

        model = checkpoint_model(args.ckpt, merge=args.merge)
    else:
        model = load_pretrained(args.model)
    if args.format == "pretrained":
        model.save_pretrained(args.out, overwrite=args.overwrite)
    else:
        from mmformer.ship.export import OPSET, export

        towers = _towers(args.towers)
        export(model, args.out, format=args.format, towers=towers, opset=args.opset or OPSET, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def quantize_folder(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mmformer.compress.quantization import METHODS, calibration_batches, quantize
    from mmformer.io.auto import load_pretrained

    methods = METHODS if args.backend == "torchao" else ("dynamic", "static")
    if args.method not in methods:
        got = f"{args.method!r} (--backend {args.backend})"
        raise ValueError(f"--method: expected one of {', '.join(methods)}, got {got}")
    if args.method == "static" and not args.calib:
        raise ValueError("--method static needs --calib MANIFEST (samples whose activation ranges set the scales)")
    refuse_unread_options(args)
    _check_quantize_values(args)
    if args.backend != "torchao":
        return quantize_graphs(args)
    source_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))  # before --out replaces it
    model = load_pretrained(args.model, device=args.device)
    calibration = None
    if args.method == "static":
        _check_static_graphs(model)
        calibration = calibration_batches(model, args.calib, max_samples=args.calib_samples)
    quantize(
        model,
        args.method,
        calibration=calibration,
        group_size=args.group_size,
        embeddings=args.embeddings,
        float_storage=args.float_storage,
    )
    model.save_pretrained(args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    ratio = f" ({source_bytes / size:.2f}x smaller)" if Path(args.model).is_dir() and size else ""
    print(f"wrote {args.out}: {len(model.quantization.modules)} layers {args.method}, {size:,} bytes{ratio}")
    if args.method in ("dynamic", "static") and str(args.device).startswith("cpu"):
        # a user quantizes to go faster: torchao's int8 activations are slower than float32 on CPUs
        print(
            "note: torchao's dynamic/static int8 makes a smaller file, but runs slower than float32 on CPUs (the "
            "digits model: 0.66x encode, 0.34x transcription, BENCHMARKS.md); for speed on an x86 CPU use "
            "--backend pt2e (compiled int8 graphs) or --backend onnxruntime (the torch-free runner)",
            file=sys.stderr,  # an advisory: stdout carries the result alone
        )


def refuse_unread_options(args: argparse.Namespace) -> None:
    """A quantize option given to a backend or method that does not read it (:data:`QUANTIZE_OPTIONS`) is refused,
    naming what reads it: ``--embeddings`` with ``--backend pt2e`` quantized without int8 tables, silently."""
    for name, option in QUANTIZE_OPTIONS.items():
        value = getattr(args, name)
        if value != option.unset and not option.reads(args.backend, args.method):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag}: only with {option.readers()}; got {value!r} with --backend {args.backend} --method "
                f"{args.method}, which does not read it"
            )


def _check_quantize_values(args: argparse.Namespace) -> None:
    """Values the library would refuse only after loading, or under its own argument names: ``--device meta`` (a
    model of shapes without values has nothing to quantize; the loader named a missing tensor) and ``--calib-samples``
    below 1 (``calibration_batches`` named its ``max_samples``)."""
    if str(args.device).split(":")[0] == "meta":
        raise ValueError(f"--device: expected a device that holds the weights' values (cpu, cuda), got {args.device!r}")
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples: expected an int >= 1, got {args.calib_samples}")


def _check_static_graphs(model: Any) -> None:
    """torchao's static int8 calibrates every tower through its exported graph (as ``--backend pt2e`` does: see
    :func:`mmformer.compress.quantization.static_configs`); a model whose towers do not all export is refused here
    for that reason — the exporter's own words are about ``--towers``, which torchao does not take."""
    from mmformer.ship.exportable import graphs

    try:
        graphs(model)
    except ValueError as e:
        reason = str(e).removeprefix("towers: ")
        raise ValueError(
            f"--method static: torchao calibrates every tower of the model through its exported graph, and {reason}"
        ) from e


def quantize_graphs(args: argparse.Namespace) -> None:
    """``--backend pt2e`` (x86 int8 graphs, compiled at use) or ``onnxruntime`` (an int8 ONNX export)."""
    import tempfile

    from mmformer.compress.quantization import calibration_batches
    from mmformer.io.auto import load_pretrained

    model = load_pretrained(args.model, device=args.device).eval()
    towers = _towers(args.towers)
    calibration = None
    if args.method == "static":
        calibration = calibration_batches(model, args.calib, max_samples=args.calib_samples)
    if args.backend == "pt2e":
        from mmformer.compress import pt2e

        quantized = pt2e.quantize(model, args.method, calibration=calibration, towers=towers)
        quantized.save_pretrained(args.out, overwrite=args.overwrite)
        graphs = sorted(quantized.graphs)
    else:
        from mmformer.compress.onnx_quantization import quantize_export
        from mmformer.ship.export import export

        with tempfile.TemporaryDirectory() as scratch:
            source = export(model, f"{scratch}/float", format="onnx", towers=towers)
            quantize_export(source, args.out, args.method, model=model, calibration=calibration,
                            overwrite=args.overwrite)  # fmt: skip
            graphs = sorted(p.stem for p in source.glob("*.onnx"))
    print(f"wrote {args.out}: {args.backend} {args.method} int8 graphs {', '.join(graphs)}")


def merge(args: argparse.Namespace) -> None:
    """--adapter folded into --base, saved as a plain model. A quantized base is refused: its weights cannot take the
    adapter's update without being quantized again (peft failed inside its torchao layer)."""
    from mmformer.adapt.adapter_files import load_adapter
    from mmformer.adapt.adapters import merge_and_unload
    from mmformer.io.auto import load_pretrained

    base = load_pretrained(args.base)
    quantization = getattr(base, "quantization", None)
    if quantization is not None:
        raise ValueError(
            f"--base: {args.base} holds {quantization.method} quantized weights (quantization_config in its "
            "config.json), which an adapter cannot be merged into; merge into the float model, then quantize: "
            f"`mmformer merge --base FLOAT_MODEL --adapter {args.adapter} --out DIR`, then `mmformer quantize "
            f"--model DIR --method {quantization.method} --out ...`"
        )
    model = merge_and_unload(load_adapter(base, args.adapter))
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


CONVERTER_FLAGS = {"model_name": "--model-name"}  # convert's flags that reach the converter, by its argument names
MODEL_NAME_SOURCES = ("timm_vit", "open_clip")  # the converters (--from) whose model_name --model-name gives


def add_convert_options(p: argparse.ArgumentParser) -> None:
    """``mmformer convert``'s flags that reach the converter (beside SRC, --from, --out), kept beside
    :func:`convert`, which reads them."""
    p.add_argument(
        "--model-name",
        default=None,
        help="the architecture of a bare state-dict file, named as its library does. With --from timm_vit: the timm "
        "model (e.g. vit_small_patch16_224), built by timm without a download and filled exactly; not needed beside "
        "timm's config.json. A state dict of another image size or depth than the architecture's default converts "
        "from Python: mmformer.convert.from_timm_vit(PATH, model_name=..., img_size=...). With --from open_clip: the "
        "open_clip model (e.g. ViT-H-14, ViT-B-32-quickgelu, as open_clip.create_model takes it), whose config gives "
        "the head width and activation (without one, or an open_clip_config.json beside the file, OpenAI's "
        "defaults hold: 64-wide heads, QuickGELU)",
    )


def convert(args: argparse.Namespace) -> None:
    from mmformer.io.auto import from_pretrained

    options = _converter_options(args)
    try:
        model = from_pretrained(args.src, source=args.source, revision=args.revision, model_kwargs=options)
    except ValueError as e:  # the converter names its argument; the user typed (or left out) the flag
        flag = next((f for name, f in CONVERTER_FLAGS.items() if str(e).startswith(f"{name}:")), None)
        if flag is None:
            raise
        raise ValueError(f"{flag}: {e}") from e
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def _converter_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The converter's keyword arguments from convert's flags (:func:`add_convert_options`); None without any."""
    model_name = getattr(args, "model_name", None)  # absent from a parser built without add_convert_options
    if model_name is None:
        return None
    if args.source not in MODEL_NAME_SOURCES:
        raise ValueError(
            f"--model-name: only for --from {' or '.join(MODEL_NAME_SOURCES)} (a bare state dict of that library), "
            f"got --from {args.source}"
        )
    return {"model_name": model_name}


def _towers(value: str | None) -> list[str] | None:
    """``--towers image,audio`` → the names; None (every tower the model has) when not given."""
    return [t.strip() for t in value.split(",") if t.strip()] if value else None
