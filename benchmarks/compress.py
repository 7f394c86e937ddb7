"""Compress and ship, measured on the shipped digits model (``data/digits_model``, whatever it holds) and the digits
test split: distillation into a quarter-size student, quantization per method, and export to ONNX / torch.export.

    python -m benchmarks.compress distill  [--steps N] [--out runs/compress]   # trains two students (long: nice it)
    python -m benchmarks.compress quantize [--calib data/digits/val.jsonl]
    python -m benchmarks.compress export
    python -m benchmarks.compress backends [--backends "pt2e static,..."]      # int8 backends + bf16 vs float32
    python -m benchmarks.compress all --tiny --no-save                         # the smoke run (the test suite runs
                                                                               # it in three parts), on a one-block
                                                                               # copy of the model
    python -m benchmarks.compress backends --model DIR                         # another digits-trained model

Distillation trains two students of about a quarter of the teacher's parameters (the teacher's config with half its
width) for the demo's step budget (configs/digits.yaml), with the teacher's tokenizer: one on the labels alone, one
with ``--model.distill.teacher data/digits_model``; the table gives the four demo metrics of both and of the teacher.

Quantization applies each method of :mod:`mmformer.compress.quantization` to the teacher (static int8 calibrated on the
validation split; "compact" adds the int8 token table and bf16 storage of what stays float; QAT fine-tunes the
teacher with fake quantization for ``--qat-steps`` and converts), saves and re-loads it, and reports file size, the
demo metrics and CPU encode / transcribe time at batch 8 next to fp32 in the same run (peers alternate, see
benchmarks/common.py).

Backends compares, on the same model, float32 with each int8 backend — PT2E dynamic / static (compiled with
inductor; :mod:`mmformer.compress.pt2e`), torchao dynamic, onnxruntime dynamic / static QDQ of the ONNX export
(against the float ONNX export) — and bf16 autocast (``--backends`` picks some): encode (image + audio) and greedy
transcription time at batch 8, zero-shot accuracy and WER on test and test_hard, file size, the CPU's flags.

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

from benchmarks import compress_sizes
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
    from mmformer.demos.digits import evaluate as demo_evaluate

    results = demo_evaluate(model_dir, manifest)
    return {k: results[k] for k in [*METRICS, "speech_cer"]}


def one_block_copy(model_dir: Path, out: Path) -> Path:
    """The model in ``model_dir`` with only the first block of each stack (its weights; the rest as they are), saved
    to ``out`` with the model's processor: what ``--tiny`` measures, so that a smoke run's exports, quantizations and
    evaluations go through every line of the full run with a quarter of the digits model's graph."""
    import dataclasses

    import mmformer

    model = mmformer.load_pretrained(model_dir)
    stacks = {
        name: dataclasses.replace(stack, depth=min(stack.depth, 1)) for name, stack in model.config.stacks.items()
    }
    copy = mmformer.MultimodalTransformer(dataclasses.replace(model.config, stacks=stacks))
    kept = copy.state_dict().keys()
    copy.load_state_dict({k: v for k, v in model.state_dict().items() if k in kept}, strict=True)
    copy.save_pretrained(out, processor=model.processor)
    return out


# ---------------------------------------------------------------------------------------------- distillation
def student_config(out: Path, steps: int | None, teacher: dict | None, tiny: bool, model_dir: Path) -> Path:
    """configs/digits.yaml with half the teacher's width (about a quarter of its parameters), the teacher's tokenizer,
    its own output folders and, for the distilled student, the teacher."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    width = json.loads((model_dir / "config.json").read_text())["stacks"]["shared"]["width"] // 2
    model = config["model"]
    model["model"]["stacks"]["shared"]["width"] = width
    model["model"]["embed_dim"] = width
    if teacher is not None:
        model.update(teacher)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(out)
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    trainer["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
    if steps is not None:
        trainer["max_steps"] = steps
    if tiny:
        trainer["limit_val_batches"] = 0
        config["data"]["batch_size"] = 8
    config["data"]["tokenizer"] = str(model_dir / "tokenizer.json")
    config["data"]["packing"] = False  # distillation reads padded batches (both students, for a like comparison)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_student(
    out: Path, steps: int | None, teacher: dict | None, tiny: bool, model_dir: Path, workers: int | None = None
) -> tuple[Path, float, int]:
    """Train one student; its exported folder, training seconds and parameter count."""
    import mmformer
    from mmformer.demos.digits import share_cores, train

    _, workers = share_cores(os.cpu_count() or 1, workers=workers)  # loader processes, as the demo picks them
    start = time.perf_counter()
    ckpt = train(str(student_config(out, steps, teacher, tiny, model_dir)), out, workers)
    seconds = time.perf_counter() - start
    model = mmformer.load_pretrained(ckpt)
    model.save_pretrained(out / "model")
    return out / "model", seconds, sum(p.numel() for p in model.parameters())


def distill(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    import mmformer

    teacher = mmformer.load_pretrained(args.model)
    rows = [{"model": "teacher", "params": sum(p.numel() for p in teacher.parameters()),
             **evaluate(args.model, manifest)}]  # fmt: skip
    options = {"distill": {"teacher": str(args.model), "temperature": args.temperature, "weight": args.distill_weight,
                           "feature_weight": args.feature_weight}}  # fmt: skip
    variant = f"distilled_T{args.temperature:g}_w{args.distill_weight:g}_f{args.feature_weight:g}"
    for name, teacher_path in (("student, labels only", None), ("student, distilled", options)):
        folder = out / (variant if teacher_path else "labels_only")
        load = load_average()
        if args.reuse and (folder / "model" / "model.safetensors").is_file():
            model_dir, seconds, params = folder / "model", float("nan"), None
        else:
            model_dir, seconds, params = train_student(
                folder, args.steps, teacher_path, args.tiny, args.model, args.workers
            )
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
    print(f"distilled with {options}")
    print("targets: distilled beats labels-only on every metric; >= 95 % of the teacher's zero-shot accuracies")
    for metric in METRICS:
        print(f"  beats labels-only on {metric}: {distilled[f'beats_labels_only:{metric}']}")
    for metric in ("image_zeroshot_acc", "audio_zeroshot_acc"):
        print(f"  {metric} of the teacher's: {distilled[f'of_teacher:{metric}']:.3f}")
    return rows


# ---------------------------------------------------------------------------------------------- quantization
def timing_inputs(manifest: Path, batch: int, model_dir: Path) -> dict:
    """The first ``batch`` test rows as model inputs, through the model's processor."""
    import mmformer
    from mmformer.demos.digits import read_manifest

    rows = read_manifest(manifest)[:batch]
    processor = mmformer.Processor.from_pretrained(model_dir)
    return {**processor(images=[r["image"] for r in rows], audio=[r["audio_filepath"] for r in rows]),
            "files": [r["audio_filepath"] for r in rows]}  # fmt: skip


def qat_finetune(out: Path, steps: int, tiny: bool, model_dir: Path, lr: float = 2e-5) -> Path:
    """Fine-tune the model for ``steps`` with fake quantization (dynamic int8) at a low learning rate; the
    task converts it when fit ends. Returns the quantized model's folder."""
    import yaml

    import mmformer
    from mmformer.cli.training import build_cli

    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["model"] = json.loads((model_dir / "config.json").read_text())
    for key in ("format_version", "mmformer_version"):
        config["model"]["model"].pop(key, None)
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.05}}
    config["model"].update(qat={"method": "dynamic"}, schedule={"warmup_steps": min(20, steps)}, optimizer=optimizer)
    config["model"].pop("zeroshot", None)
    trainer = config["trainer"]
    trainer.update(max_steps=steps, default_root_dir=str(out), limit_val_batches=0, callbacks=[], logger=False,
                   enable_checkpointing=False)  # fmt: skip
    config["data"]["tokenizer"] = str(model_dir / "tokenizer.json")
    if tiny:
        config["data"]["batch_size"] = 8
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = build_cli(["--config", str(out / "qat.yaml")], run=False)
    teacher = mmformer.load_pretrained(model_dir)
    cli.model.model.load_state_dict(teacher.state_dict())  # FakeQuantizedLinear keeps nn.Linear's keys
    cli.trainer.fit(cli.model, cli.datamodule)
    model = cli.model.model  # converted by the task at the end of fit
    model.processor = teacher.processor
    model.save_pretrained(out / "model")
    return out / "model"


def quantize_section(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    import mmformer
    from benchmarks.common import interleaved
    from mmformer.compress.quantization import calibration_batches, quantize
    from mmformer.generation.decoding import generate

    dirs = {"fp32": out / "fp32"}  # the shipped model is stored in float16: sizes compare with its float32 file
    mmformer.load_pretrained(args.model).save_pretrained(dirs["fp32"])
    compact = {"embeddings": True, "float_storage": "bfloat16"}  # int8 token table, float rest stored as bf16
    variants = [("dynamic", "dynamic", {}), ("dynamic compact", "dynamic", compact), ("int8-weight", "int8-weight", {}),
                ("int4-weight", "int4-weight", {}), ("int4-weight compact", "int4-weight", compact),
                ("static", "static", {})]  # fmt: skip
    for name, method, options in variants:
        model = mmformer.load_pretrained(args.model)
        calibration = None
        if method == "static":
            calibration = calibration_batches(model, args.calib, max_samples=16 if args.tiny else 128)
        start = time.perf_counter()
        quantize(model, method, calibration=calibration, **options)
        seconds = time.perf_counter() - start
        dirs[name] = out / name.replace(" ", "_")
        model.save_pretrained(dirs[name])
        print(f"{name}: quantized in {seconds:.1f} s")
    dirs["qat-dynamic"] = qat_finetune(out / "qat", args.qat_steps, args.tiny, args.model, args.qat_lr)

    load = load_average()
    inputs = timing_inputs(manifest, args.batch, args.model)
    models = {name: mmformer.load_pretrained(path) for name, path in dirs.items()}

    def encode(m):
        image, audio = m.encode_image, m.encode_audio
        if args.compile:  # torchao's kernels are meant to run compiled: the eager path quantizes in many small ops
            image, audio = torch.compile(image, dynamic=False), torch.compile(audio, dynamic=False)

        def call():
            with torch.inference_mode():
                image(inputs["pixel_values"])
                audio(inputs["audio"], inputs["audio_lengths"])

        return call

    def transcribe(m):
        def call():
            generate(m, audio=inputs["audio"], audio_lengths=inputs["audio_lengths"], max_new_tokens=8)

        return call

    encode_s = interleaved({n: encode(m) for n, m in models.items()}, warmup=args.warmup, repeats=args.repeats)
    transcribe_s = interleaved({n: transcribe(m) for n, m in models.items()}, warmup=args.warmup,
                               repeats=args.repeats)  # fmt: skip
    size = {n: (Path(d) / "model.safetensors").stat().st_size for n, d in dirs.items()}
    rows = []
    for name, path in dirs.items():
        metrics = evaluate(Path(path), manifest)
        row = {"method": name, "file_MB": size[name] / 1e6, "smaller": size["fp32"] / size[name], **metrics}
        row.update(encode_ms=1e3 * encode_s[name], encode_speedup=encode_s["fp32"] / encode_s[name])
        row.update(transcribe_ms=1e3 * transcribe_s[name], transcribe_speedup=transcribe_s["fp32"] / transcribe_s[name])
        rows.append({**row, "load_at_start": load})
    fp32 = rows[0]
    for row in rows[1:]:
        for metric in ("image_zeroshot_acc", "audio_zeroshot_acc"):
            row[f"d_{metric}"] = row[metric] - fp32[metric]
        for metric in ("caption_cer", "speech_wer"):
            row[f"d_{metric}"] = row[metric] - fp32[metric]
    columns = ["method", "file_MB", "smaller", *METRICS, "encode_ms", "encode_speedup", "transcribe_ms",
               "transcribe_speedup"]  # fmt: skip
    print(table(rows, columns))
    print(f"batch {args.batch}, {torch.get_num_threads()} thread(s), compiled encoders: {args.compile}, "
          f"load average {load:.2f} at the start")  # fmt: skip
    print("targets: int8 within 1 point of fp32 accuracy and +0.02 WER/CER; int8 files >= 3.5x smaller; dynamic int8 "
          "encode >= 1.3x faster; QAT int8 at least as accurate as static int8")  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- export
def export_section(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    import mmformer
    from benchmarks.common import interleaved
    from mmformer.ship import export, exportable, programs
    from mmformer.ship.onnx_runner import OnnxModel

    model = mmformer.load_pretrained(args.model)
    seconds = {}
    for fmt in export.FORMATS:
        start = time.perf_counter()
        export.export(model, out / fmt, format=fmt)
        seconds[fmt] = time.perf_counter() - start
        print(f"{fmt}: exported in {seconds[fmt]:.1f} s")
    args.float_onnx = str(out / "onnx")  # the backends section of the same run reads it: the same float32 model
    threads = torch.get_num_threads()
    runner = OnnxModel(out / "onnx", threads=threads)
    inputs = timing_inputs(manifest, args.batch, args.model)
    processor = model.processor
    features = model.audio_embed.features(inputs["audio"], inputs["audio_lengths"])
    frames = model.audio_embed.features.frames(inputs["audio_lengths"])
    text = processor(
        text=[f"{w}" for w in ["zero", "one", "two", "three", "four", "five", "six", "seven"]][: args.batch]
    )
    with torch.no_grad():
        memory, memory_mask = model.encode_audio_tokens(inputs["audio"], inputs["audio_lengths"])
        bos = torch.full((memory.shape[0], 1), model.config.text.bos_id)
        _, keys, values, cross_k, cross_v = exportable.DecoderPrefill(model)(bos, memory, memory_mask)
    graph_inputs = {
        "image_encoder": (inputs["pixel_values"],),
        "audio_encoder": (features, frames),
        "text_encoder": (text["input_ids"], text["attention_mask"]),
        "decoder_model": (bos, memory, memory_mask),
        "decoder_with_past_model": (bos, memory_mask, keys, values, *cross_k, *cross_v),
    }
    modules = {g.name: g.module for g in exportable.graphs(model)}
    config = json.loads((out / "onnx" / export.EXPORT_CONFIG).read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows = []
    load = load_average()
    for name, args_ in graph_inputs.items():
        session = ort.InferenceSession(str(out / "onnx" / config["graphs"][name]["file"]), options)
        feed = {n: t.numpy() for n, t in zip(config["graphs"][name]["inputs"], args_)}
        program = programs.load_program(out / "torch-export" / f"{name}.pt2").module()
        with torch.no_grad():
            expected = modules[name](*args_)
            from_program = program(*args_)
        from_onnx = session.run(None, feed)
        diff = max(float(np.abs(o.astype(np.float64) - e.double().numpy()).max()) for o, e in zip(from_onnx, expected))
        diff_program = max(float((p.double() - e.double()).abs().max()) for p, e in zip(from_program, expected))

        def eager(module=modules[name], a=args_):
            with torch.inference_mode():
                module(*a)

        def exported_program(module=program, a=args_):
            with torch.inference_mode():
                module(*a)

        times = interleaved({"pytorch": eager, "torch.export": exported_program,
                             "onnxruntime": lambda s=session, f=feed: s.run(None, f)},
                            warmup=args.warmup, repeats=args.repeats)  # fmt: skip
        rows.append({"graph": name, "max_abs_diff_onnx": diff, "max_abs_diff_torch_export": diff_program,
                     "pytorch_ms": 1e3 * times["pytorch"], "torch_export_ms": 1e3 * times["torch.export"],
                     "onnxruntime_ms": 1e3 * times["onnxruntime"], "load_at_start": load})  # fmt: skip
    files = inputs["files"]
    times = interleaved({"pytorch": lambda: model.transcribe(files, max_new_tokens=8),
                         "onnxruntime": lambda: runner.transcribe(files, max_new_tokens=8)},
                        warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    same = runner.transcribe(files, max_new_tokens=8) == model.transcribe(files, max_new_tokens=8)
    rows.append({"graph": f"greedy transcription (batch {len(files)}, files → text)", "same_text": same,
                 "pytorch_ms": 1e3 * times["pytorch"], "onnxruntime_ms": 1e3 * times["onnxruntime"],
                 "load_at_start": load})  # fmt: skip
    print(table(rows, ["graph", "max_abs_diff_onnx", "max_abs_diff_torch_export", "pytorch_ms", "torch_export_ms",
                       "onnxruntime_ms", "same_text"]))  # fmt: skip
    print(f"batch {args.batch}, {threads} thread(s) for torch and onnxruntime; export took " +
          ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- entry point
# ---------------------------------------------------------------------------------------------- int8 backends
def split_manifest(split: str, limit: int | None, out: Path, name: str | None = None) -> Path:
    """A digits split (``test``, ``test_hard``), or its first ``limit`` rows, paths made absolute, written to
    ``out/<name or split>.jsonl``."""
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    for row in rows:
        row["image"], row["audio_filepath"] = str(DATA / row["image"]), str(DATA / row["audio_filepath"])
    path = out / f"{name or split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TorchBackend:
    """A float, torchao or PT2E model (same call signatures) run on processed tensors, under bf16 autocast if
    asked: encode (image + audio), greedy transcription, zero-shot embeddings."""

    def __init__(self, model, processor, autocast: bool = False):
        self.model, self.processor, self.autocast = model, processor, autocast

    def _context(self):
        from mmformer.compress.cpu_precision import inference_autocast

        return inference_autocast(self.autocast)

    def inputs(self, rows: list[dict]) -> dict:
        return self.processor(images=[r["image"] for r in rows], audio=[r["audio_filepath"] for r in rows])

    def encode(self, x: dict) -> tuple:
        with self._context():
            return (self.model.encode_image(x["pixel_values"]).float(),
                    self.model.encode_audio(x["audio"], x["audio_lengths"]).float())  # fmt: skip

    def texts(self, texts: list[str]):
        t = self.processor(text=texts)
        with self._context():
            return self.model.encode_text(t["input_ids"], t["attention_mask"]).float()

    def transcribe(self, x: dict, n: int) -> list[str]:
        with self._context():
            ids = self.model.generate(audio=x["audio"], audio_lengths=x["audio_lengths"], max_new_tokens=n)
        return self.processor.tokenizer.batch_decode(ids)


class OnnxBackend:
    """An ONNX export (float or int8) through the torch-free runner, on its own preprocessed arrays."""

    def __init__(self, directory: Path):
        from mmformer.ship.onnx_runner import OnnxModel

        self.runner = OnnxModel(directory, threads=torch.get_num_threads())

    def inputs(self, rows: list[dict]) -> dict:
        features, lengths = self.runner.log_mel(self.runner.load_audio([r["audio_filepath"] for r in rows]))
        return {"pixel_values": self.runner.preprocess_images([r["image"] for r in rows]), "features": features,
                "lengths": lengths}  # fmt: skip

    def encode(self, x: dict) -> tuple:
        image = self.runner._run("image_encoder", pixel_values=x["pixel_values"])[0]
        audio = self.runner._run("audio_encoder", input_features=x["features"], feature_lengths=x["lengths"])[0]
        return torch.from_numpy(image), torch.from_numpy(audio)

    def texts(self, texts: list[str]):
        return torch.from_numpy(self.runner.encode_text(texts))

    def transcribe(self, x: dict, n: int) -> list[str]:
        _, states, mask = self.runner._run("audio_encoder", input_features=x["features"], feature_lengths=x["lengths"])
        return self.runner.detokenize(self.runner.generate(states, mask, n)[:, 1:])


def backend_metrics(backend, manifest: Path, batch: int = 50) -> dict:
    """Image and audio zero-shot accuracy on the single digits, and greedy WER on every row."""
    from torchmetrics.functional.text import word_error_rate

    from mmformer.demos.digits import WORDS, read_manifest

    rows = read_manifest(manifest)
    classes = torch.nn.functional.normalize(backend.texts(WORDS), dim=-1)
    hits, total, transcripts = {"image": 0, "audio": 0}, 0, []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        x = backend.inputs(chunk)
        single = torch.tensor([len(r["digits"]) == 1 for r in chunk])
        labels = torch.tensor([int(r["digits"]) if len(r["digits"]) == 1 else -1 for r in chunk])
        for name, embeds in zip(("image", "audio"), backend.encode(x)):
            predicted = (embeds @ classes.T).argmax(dim=-1)
            hits[name] += int((predicted == labels)[single].sum())
        total += int(single.sum())
        transcripts += backend.transcribe(x, 8)
    return {"image_zeroshot_acc": hits["image"] / max(total, 1), "audio_zeroshot_acc": hits["audio"] / max(total, 1),
            "speech_wer": float(word_error_rate(transcripts, [r["text"] for r in rows]))}  # fmt: skip


def backends_section(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    """Every int8 backend (and bf16 autocast) of the shipped model against its float32 self: encode (image + audio)
    and greedy transcription time at batch ``--batch``, zero-shot accuracy and WER on test and test_hard, file size.
    """
    import mmformer
    from benchmarks.common import interleaved
    from mmformer.compress import pt2e
    from mmformer.compress.cpu_precision import bf16_choice, cpu_report
    from mmformer.compress.onnx_quantization import quantize_export
    from mmformer.compress.quantization import calibration_batches, quantize
    from mmformer.ship.export import export

    del manifest  # both splits are read here
    out.mkdir(parents=True, exist_ok=True)
    limit = args.limit
    splits = {s: split_manifest(s, limit, out) for s in ("test", "test_hard")}
    float_model = mmformer.load_pretrained(args.model).float().eval()
    processor = float_model.processor
    calibration = calibration_batches(float_model, args.calib, max_samples=16 if args.tiny else 128)
    compile = args.compile or not args.tiny  # the PT2E graphs are meant to run compiled; the smoke run skips it
    float_model.save_pretrained(out / "fp32")
    sizes = {"fp32": (out / "fp32" / "model.safetensors").stat().st_size}
    backends = {"fp32": TorchBackend(float_model, processor)}
    chosen = set(compress_sizes.chosen_backends(args.backends))
    for method in ("dynamic", "static"):
        name = f"pt2e {method}"
        if name not in chosen:
            continue
        q = pt2e.quantize(mmformer.load_pretrained(out / "fp32"), method, calibration=calibration, compile=compile)
        path = q.save_pretrained(out / name.replace(" ", "_"))
        sizes[name] = sum(f.stat().st_size for f in path.glob("*.safetensors"))  # float weights + qparams
        # the smoke run times the model in memory: reloading traces every graph again (tests/test_quantization_pt2e.py
        # shows the reload identical, in a fresh process)
        backends[name] = TorchBackend(q if args.tiny else pt2e.load(path, compile=compile), processor)
    if "torchao dynamic" in chosen:
        torchao = quantize(mmformer.load_pretrained(out / "fp32"), "dynamic")
        torchao.save_pretrained(out / "torchao_dynamic")
        sizes["torchao dynamic"] = (out / "torchao_dynamic" / "model.safetensors").stat().st_size
        backends["torchao dynamic"] = TorchBackend(mmformer.load_pretrained(out / "torchao_dynamic"), processor)
    if chosen & {"onnx fp32", "onnxruntime dynamic", "onnxruntime static"}:  # the float export: the int8 ones' base
        # the export section's float ONNX export when it ran before in this run (exporting takes most of a minute)
        source = Path(args.float_onnx) if args.float_onnx else export(float_model, out / "onnx_fp32", format="onnx")
        backends["onnx fp32"] = OnnxBackend(source)
        sizes["onnx fp32"] = sum(f.stat().st_size for f in source.glob("*.onnx"))
    for method in ("dynamic", "static"):
        name = f"onnxruntime {method}"
        if name in chosen:
            path = quantize_export(source, out / name.replace(" ", "_"), method, model=float_model,
                                   calibration=calibration)  # fmt: skip
            sizes[name] = sum(f.stat().st_size for f in path.glob("*.onnx"))
            backends[name] = OnnxBackend(path)
    if "bf16 autocast" in chosen:
        backends["bf16 autocast"] = TorchBackend(float_model, processor, autocast=True)
        sizes["bf16 autocast"] = sizes["fp32"]

    load = load_average()
    rows_in = split_manifest("test", args.batch, out, name="timing")  # not the scored split's file
    from mmformer.demos.digits import read_manifest

    timing_rows = read_manifest(rows_in)
    inputs = {name: b.inputs(timing_rows) for name, b in backends.items()}
    encode_s = interleaved({n: (lambda b=b, x=inputs[n]: b.encode(x)) for n, b in backends.items()},
                           warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    decode_s = interleaved({n: (lambda b=b, x=inputs[n]: b.transcribe(x, 8)) for n, b in backends.items()},
                           warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    rows = []
    for name, backend in backends.items():
        base = "onnx fp32" if name.startswith("onnx") else "fp32"
        row = {"backend": name, "file_MB": sizes[name] / 1e6, "encode_ms": 1e3 * encode_s[name],
               "encode_speedup": encode_s[base] / encode_s[name], "decode_ms": 1e3 * decode_s[name],
               "decode_speedup": decode_s[base] / decode_s[name], "vs": base}  # fmt: skip
        for split, path in splits.items():
            for metric, value in backend_metrics(backend, path).items():
                row[f"{split}_{metric}"] = value
        rows.append({**row, "load_at_start": load})
    by_name = {r["backend"]: r for r in rows}
    for row in rows:
        base = by_name[row["vs"]]
        for split in splits:
            for metric in ("image_zeroshot_acc", "audio_zeroshot_acc", "speech_wer"):
                row[f"d_{split}_{metric}"] = row[f"{split}_{metric}"] - base[f"{split}_{metric}"]
    columns = ["backend", "vs", "file_MB", "encode_ms", "encode_speedup", "decode_ms", "decode_speedup"]
    columns += [f"{s}_{m}" for s in splits for m in ("image_zeroshot_acc", "audio_zeroshot_acc", "speech_wer")]
    print(table(rows, columns))
    print(f"cpu: {cpu_report()}; {bf16_choice()[1]}")
    print(
        f"batch {args.batch}, {torch.get_num_threads()} thread(s), PT2E compiled: {compile}, load average {load:.2f}"
        " at the start; onnxruntime rows against the float ONNX export, the others against the float32 model"
    )
    print("targets: int8 never slower than float32 on the digits model; every metric within 1 point / +0.01 WER")
    return rows


SECTIONS = ("distill", "quantize", "export", "backends", "sizes")


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "section", nargs="*", default=["all"], choices=(*SECTIONS, "all"), help="sections to run (in the order above)"
    )
    p.add_argument(
        "--model", type=Path, default=MODEL, help="the model measured (a pretrained folder trained on digits)"
    )
    p.add_argument("--out", default="runs/compress", help="where students, quantized models and exports go")
    p.add_argument("--steps", type=int, default=None, help="student training steps (default: the demo's budget)")
    p.add_argument("--reuse", action="store_true", help="evaluate students already trained under --out")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: as the demo)")
    p.add_argument("--temperature", type=float, default=1.0, help="distill.temperature of the distilled student")
    p.add_argument("--distill-weight", type=float, default=0.5, help="distill.weight of the distilled student")
    p.add_argument("--feature-weight", type=float, default=0.0, help="distill.feature_weight of the distilled student")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test rows only")
    p.add_argument("--batch", type=int, default=8, help="batch of the timed encode / transcribe calls")
    p.add_argument("--calib", default=str(DATA / "val.jsonl"), help="calibration manifest of static int8")
    p.add_argument("--qat-steps", type=int, default=200, help="QAT fine-tuning steps from the shipped model")
    p.add_argument("--qat-lr", type=float, default=2e-5, help="learning rate of the QAT fine-tuning")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd encoders (fp32 and quantized alike)")
    compress_sizes.add_arguments(p)
    args = parse_args(p, argv)
    if args.threads is None:
        torch.set_num_threads(1)  # as the demo: the digits model's matmuls do not parallelise on 2 shared cores
    if args.tiny:
        args.steps, args.limit, args.qat_steps, args.repeats, args.warmup = 2, args.limit or 8, 2, 1, 0
    args.float_onnx = None  # set by the export section
    sections = SECTIONS if "all" in args.section else tuple(s for s in SECTIONS if s in args.section)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if args.tiny else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        manifest = test_manifest(args.limit, out)
        if args.tiny:  # the same code on a one-block copy of the model: exports, quantization and metrics run faster
            args.model = one_block_copy(args.model, out / "one_block_model")
        print(f"machine: {machine()}; load average {load_average():.2f}")
        for section in sections:
            run = {"distill": distill, "quantize": quantize_section, "export": export_section,
                   "backends": backends_section, "sizes": compress_sizes.sizes_section}[section]  # fmt: skip
            rows = run(args, out / section, manifest)
            record(f"compress.{section}", rows, args)


if __name__ == "__main__":
    main()
