"""The ``mmformer`` sub-commands that write a model folder: ``export``, ``quantize`` (torchao, PT2E, onnxruntime),
``merge`` (a LoRA adapter into its base) and ``convert`` (a public checkpoint). Each takes the parsed flags of
:func:`mmformer.cli.main._parser` and prints what it wrote."""

from __future__ import annotations

import argparse

WRITE_OUT = ("export", "quantize", "merge", "convert")  # the commands here: each writes --out


def refuse_saved_out(args: argparse.Namespace) -> None:
    """``--out`` holding a saved model, export or int8 folder is refused before any work unless ``--overwrite`` (the
    save itself refuses it too, but only after loading, calibrating and quantizing)."""
    from pathlib import Path

    from mmformer.io.pretrained import ARTIFACT_FILES, CONFIG_NAME

    out = Path(args.out)
    if not args.overwrite and out.is_dir() and any((out / name).exists() for name in (CONFIG_NAME, *ARTIFACT_FILES)):
        raise ValueError(f"--out: {out} already holds a saved model or export; pass --overwrite to replace it")


def export(args: argparse.Namespace) -> None:
    from mmformer.io.auto import load_pretrained
    from mmformer.io.pretrained import CHECKPOINT_KEY, read_training_checkpoint

    if (args.ckpt is None) == (args.model is None):
        raise ValueError("pass exactly one of --ckpt (a training checkpoint) and --model (a pretrained folder)")
    if args.format == "pretrained" and args.ckpt is not None:
        record = read_training_checkpoint(args.ckpt).get(CHECKPOINT_KEY) if args.ckpt.endswith(".ckpt") else None
        if isinstance(record, dict) and (record.get("lora") or record.get("prompt")):  # an adaptation run
            from mmformer.tasks.adapt import export_checkpoint

            print(f"wrote {export_checkpoint(args.ckpt, args.out, merge=args.merge, overwrite=args.overwrite)}")
            return
    model = load_pretrained(args.ckpt or args.model)
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
    if args.backend != "torchao":
        return quantize_graphs(args)
    if args.towers:  # torchao quantizes every linear layer of the model
        raise ValueError(f"--towers: only with --backend pt2e or onnxruntime; got {args.towers!r} with torchao")
    source_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))  # before --out replaces it
    model = load_pretrained(args.model, device=args.device)
    calibration = None
    if args.method == "static":
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
            "--backend pt2e (compiled int8 graphs) or --backend onnxruntime (the torch-free runner)"
        )


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
    from mmformer.adapt.adapters import merge_and_unload
    from mmformer.io.auto import load_pretrained

    model = merge_and_unload(load_pretrained(args.base, adapter=args.adapter))
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def convert(args: argparse.Namespace) -> None:
    from mmformer.io.auto import from_pretrained

    model = from_pretrained(args.src, source=args.source, revision=args.revision)
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def _towers(value: str | None) -> list[str] | None:
    """``--towers image,audio`` → the names; None (every tower the model has) when not given."""
    return [t.strip() for t in value.split(",") if t.strip()] if value else None
