"""Compress and ship, measured on the shipped digits model (``data/digits_model``, whatever it holds) and the digits
test split: distillation into a quarter-size student, quantization per method, and export to ONNX / torch.export.

    python -m benchmarks.compress distill  [--steps N] [--out runs/compress]   # trains two students (long: nice it)
    python -m benchmarks.compress quantize [--calib data/digits/val.jsonl]
    python -m benchmarks.compress export
    python -m benchmarks.compress all --tiny --no-save                         # the test suite's smoke run

Distillation trains two students of about a quarter of the teacher's parameters (the teacher's config with half its
width) for the demo's step budget (configs/digits.yaml), with the teacher's tokenizer: one on the labels alone, one
with ``--model.teacher data/digits_model``; the table gives the four demo metrics of both and of the teacher.

Quantization applies each method of :mod:`mmformer.quantization` to the teacher (static int8 calibrated on the
validation split; QAT fine-tunes the teacher with fake quantization for ``--qat-steps`` and converts), saves and
re-loads it, and reports file size, the demo metrics and CPU encode / transcribe time at batch 8 next to fp32 in the
same run (peers alternate, see benchmarks/common.py).

Export writes the ONNX and torch.export graphs of every tower and the decoder step and reports the largest
difference from PyTorch and the time per call, and a full greedy transcription through onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import base_parser, machine, parse_args, record, table

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "digits_model"
DATA = ROOT / "data" / "digits"
CONFIG = ROOT / "configs" / "digits.yaml"
METRICS = ["image_zeroshot_acc", "audio_zeroshot_acc", "caption_cer", "speech_wer"]


def load_average() -> float:
    return os.getloadavg()[0]


def test_manifest(limit: int | None, out: Path) -> Path:
    """The digits test split, or its first ``limit`` rows (paths made absolute) for a smoke run."""
    manifest = DATA / "test.jsonl"
    if limit is None:
        return manifest
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()][:limit]
    for row in rows:
        row["image"], row["audio_filepath"] = str(DATA / row["image"]), str(DATA / row["audio_filepath"])
    path = out / "test_subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(model_dir: Path, manifest: Path) -> dict:
    """The demo's four metrics (and speech CER) through the public API."""
    from mmformer.demo import evaluate as demo_evaluate

    results = demo_evaluate(model_dir, manifest)
    return {k: results[k] for k in [*METRICS, "speech_cer"]}


# ---------------------------------------------------------------------------------------------- distillation
def student_config(out: Path, steps: int | None, teacher: Path | None, tiny: bool) -> Path:
    """configs/digits.yaml with half the teacher's width (about a quarter of its parameters), the teacher's tokenizer,
    its own output folders and, for the distilled student, the teacher."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    width = json.loads((MODEL / "config.json").read_text())["stacks"]["shared"]["width"] // 2
    model = config["model"]
    model["model"]["stacks"]["shared"]["width"] = width
    model["model"]["embed_dim"] = width
    if teacher is not None:
        model["teacher"] = str(teacher)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(out)
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    trainer["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
    if steps is not None:
        trainer["max_steps"] = steps
    if tiny:
        trainer["limit_val_batches"] = 0
        config["data"]["batch_size"] = 8
    config["data"]["tokenizer"] = str(MODEL / "tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_student(out: Path, steps: int | None, teacher: Path | None, tiny: bool) -> tuple[Path, float, int]:
    """Train one student; its exported folder, training seconds and parameter count."""
    import mmformer
    from mmformer.demo import train

    start = time.perf_counter()
    ckpt = train(str(student_config(out, steps, teacher, tiny)), out)
    seconds = time.perf_counter() - start
    model = mmformer.load_pretrained(ckpt)
    model.save_pretrained(out / "model")
    return out / "model", seconds, sum(p.numel() for p in model.parameters())


def distill(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    import mmformer

    teacher = mmformer.load_pretrained(MODEL)
    rows = [{"model": "teacher", "params": sum(p.numel() for p in teacher.parameters()), **evaluate(MODEL, manifest)}]
    for name, teacher_path in (("student, labels only", None), ("student, distilled", MODEL)):
        folder = out / ("distilled" if teacher_path else "labels_only")
        load = load_average()
        if args.reuse and (folder / "model" / "model.safetensors").is_file():
            model_dir, seconds, params = folder / "model", float("nan"), None
        else:
            model_dir, seconds, params = train_student(folder, args.steps, teacher_path, args.tiny)
        if params is None:
            params = sum(p.numel() for p in mmformer.load_pretrained(model_dir).parameters())
        rows.append({"model": name, "params": params, **evaluate(model_dir, manifest), "train_s": seconds,
                     "load_at_start": load})  # fmt: skip
    teacher_row, plain, distilled = rows
    for metric in METRICS:
        better = distilled[metric] >= plain[metric] if "acc" in metric else distilled[metric] <= plain[metric]
        distilled[f"beats_labels_only:{metric}"] = better
    for metric in ("image_zeroshot_acc", "audio_zeroshot_acc"):
        distilled[f"of_teacher:{metric}"] = distilled[metric] / max(teacher_row[metric], 1e-9)
    print(table(rows, ["model", "params", *METRICS, "speech_cer", "train_s", "load_at_start"]))
    print("targets: distilled beats labels-only on every metric; >= 95 % of the teacher's zero-shot accuracies")
    for metric in METRICS:
        print(f"  beats labels-only on {metric}: {distilled[f'beats_labels_only:{metric}']}")
    for metric in ("image_zeroshot_acc", "audio_zeroshot_acc"):
        print(f"  {metric} of the teacher's: {distilled[f'of_teacher:{metric}']:.3f}")
    return rows


# ---------------------------------------------------------------------------------------------- entry point
SECTIONS = ("distill", "quantize", "export")


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("section", choices=(*SECTIONS, "all"))
    p.add_argument("--out", default="runs/compress", help="where students, quantized models and exports go")
    p.add_argument("--steps", type=int, default=None, help="student training steps (default: the demo's budget)")
    p.add_argument("--reuse", action="store_true", help="evaluate students already trained under --out")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test rows only")
    p.add_argument("--batch", type=int, default=8, help="batch of the timed encode / transcribe calls")
    p.add_argument("--calib", default=str(DATA / "val.jsonl"), help="calibration manifest of static int8")
    p.add_argument("--qat-steps", type=int, default=200, help="QAT fine-tuning steps from the shipped model")
    args = parse_args(p, argv)
    if args.threads is None:
        torch.set_num_threads(1)  # as the demo: the digits model's matmuls do not parallelise on 2 shared cores
    if args.tiny:
        args.steps, args.limit, args.qat_steps, args.repeats, args.warmup = 2, args.limit or 20, 2, 1, 0
    sections = SECTIONS if args.section == "all" else (args.section,)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if args.tiny else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        manifest = test_manifest(args.limit, out)
        print(f"machine: {machine()}; load average {load_average():.2f}")
        for section in sections:
            rows = {"distill": distill}[section](args, out / section, manifest)
            record(f"compress.{section}", rows, args)


if __name__ == "__main__":
    main()
