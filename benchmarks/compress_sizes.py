"""The int8 backends at the issue's sizes (``python -m benchmarks.compress sizes``): random-weight models of ViT-B/32
dimensions (open_clip's ViT-B-32: 224 px, patch 32, width 768, 12 layers; built and converted by
:func:`benchmarks.common.clip_pair`) and whisper-tiny dimensions (:func:`benchmarks.generate.whisper_pair`, with
whisper-tiny's 1500 audio positions: a 30-s log-mel window), every backend against float32 of the same model.

Per size and backend: encode time (the image encoder of ViT-B/32, the audio encoder of whisper-tiny on 30-s log-mel)
and, for whisper-tiny, decode time (greedy transcription at batch ``--batch`` from log-mel: the encoder and
``--new-tokens`` tokens after bos; the model's end-of-text row is scaled down, so every backend decodes the same
number of tokens, checked), both against PyTorch float32 eager, timed in interleaved repeats
(:func:`benchmarks.common.interleaved`); ``decoder`` is decode − encode, the decoder's own share. Also the largest
absolute difference of the encoder output from float32's (the image embeddings; whisper's audio states, what the
decoder reads) next to float32's largest magnitude — a sanity figure, not a target, but an int8 row whose difference
exceeds a quarter of that magnitude is flagged and not counted as meeting the target —, the share of decoded ids
equal to float32's, the files' size, the preparation time (quantization, calibration, export) and the first call's
(compile).

Backends: ``fp32`` (PyTorch eager), ``pt2e dynamic`` / ``pt2e static`` (X86 inductor quantizer, compiled:
:mod:`mmformer.compress.pt2e`; the static one calibrated on random inputs), ``torchao dynamic``
(:func:`mmformer.compress.quantization.quantize`), ``onnx fp32`` (the ONNX export, :mod:`mmformer.ship.export`, run by
:class:`mmformer.ship.onnx_runner.OnnxModel`), ``onnxruntime dynamic`` / ``static`` (its int8 versions,
:func:`mmformer.compress.onnx_quantization.quantize_export`) and ``bf16 autocast`` — chosen by capability
(:func:`mmformer.compress.cpu_precision.bf16_choice`: n/a with its reason on a CPU without AMX unless ``--bf16 force``;
``--tiny`` forces it so that its path runs everywhere). Only the timed towers are quantized and exported (ViT-B/32:
the image tower; whisper-tiny: the audio encoder and the decoder). A backend that fails to prepare is printed as n/a
with the error, never with a figure.

The targets line (issue #26): on a CPU with VNNI or AMX, int8 ≥ 1.5× float32 for encode and decode; without, ≥ 1.15×.

Memory at the whisper-tiny size (batch 8 at 30 s), peak resident, measured per run: fp32 with the PT2E or torchao
backends about 2 GB; each onnxruntime backend (its ONNX export and sessions: the CPU arena grows with every input and
cache shape) 5-7 GB more — fp32 + ONNX fp32 + both onnxruntime int8 went past 14.7 GB. Run the onnxruntime backends
at that size in separate runs (``--backends "fp32,onnxruntime dynamic"``) on a machine with less than 20 GB free.

Shape legend: B batch, C channels, H×W pixels, M mel bins, Nf mel frames, N audio tokens, D width, E embedding size.

    python -m benchmarks.compress sizes [--sizes vit-b-32,whisper-tiny] [--backends fp32,pt2e dynamic,...]
                                        [--new-tokens 32] [--bf16 auto|force] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIZES = ("vit-b-32", "whisper-tiny")
BACKENDS = ("fp32", "pt2e dynamic", "pt2e static", "torchao dynamic", "onnx fp32", "onnxruntime dynamic",
            "onnxruntime static", "bf16 autocast")  # fmt: skip
INT8 = tuple(b for b in BACKENDS if b.startswith(("pt2e", "torchao", "onnxruntime")))
SANE = 0.25  # an int8 output further from float32's than this share of its largest magnitude is not counted as met
COLUMNS = ["size", "backend", "file_MB", "prepare_s", "first_call_s", "encode_ms", "encode_speedup", "decode_ms",
           "decode_speedup", "decoder_ms", "decoder_speedup", "max_abs_diff", "fp32_max_abs", "same_ids",
           "meets_target", "note"]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sizes`` section's options (on :mod:`benchmarks.compress`'s parser)."""
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated backends of the backends and sizes sections (fp32 always runs)",
    )
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per row of the timed decode")
    p.add_argument("--bf16", choices=("auto", "force"), default="auto",
                   help="bf16 autocast row: auto = where the CPU has AMX bf16 (else n/a), force = always")  # fmt: skip


def chosen_backends(value: str) -> list[str]:
    """``--backends`` as a list, float32 first (every row's base)."""
    return ["fp32", *(b for b in _choices(value, BACKENDS, "backends") if b != "fp32")]


def _choices(value: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise ValueError(f"--{name}: expected a comma-separated subset of {list(allowed)}, got {value!r}")
    return items


# ---------------------------------------------------------------------------------------------- the two models
def vit_b_32() -> dict:
    """open_clip's ViT-B-32: the ViT-B/16 config of :data:`benchmarks.common.CLIP_SIZES` with patch 32."""
    from benchmarks.common import CLIP_SIZES

    base = CLIP_SIZES["gpu"]
    return dict(base, vision_cfg=dict(base["vision_cfg"], patch_size=32))


def whisper_tiny() -> dict:
    """whisper-tiny's dimensions (:data:`benchmarks.generate.WHISPER_SIZES`) with its 1500 audio positions (30 s)."""
    from benchmarks.generate import WHISPER_SIZES

    return dict(WHISPER_SIZES["whisper-tiny"], source_positions=1500)


@dataclass
class Subject:
    """One size's float model, its timed inputs and calibration batches, and the towers the backends quantize."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # pixel_values (B, C, H, W) | features (B, M, Nf) with lengths (B,)
    calibration: list[dict]
    towers: list[str]
    decodes: bool
    prompt: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (B, 1) bos


def clip_subject(tiny: bool, batch: int) -> Subject:
    """ViT-B/32 (``--tiny``: :data:`CLIP_SIZES`' tiny) converted from open_clip, random pixels; the image tower only
    (the timed encoder; calibration batches carry CLIP-laid-out texts as the calibration reader expects)."""
    from benchmarks.common import clip_inputs, clip_pair

    _, model, cfg = clip_pair("tiny" if tiny else vit_b_32())
    model.eval()
    pixels, _, _ = clip_inputs(model, cfg, batch, seed=1)
    calibration = []
    for seed in (2, 3)[: 1 if tiny else 2]:
        p, ids, mask = clip_inputs(model, cfg, batch, seed=seed)
        calibration.append({"pixel_values": p, "input_ids": ids, "attention_mask": mask})
    return Subject("vit-b-32", model, {"pixel_values": pixels}, calibration, ["image"], decodes=False)


def whisper_subject(tiny: bool, batch: int) -> Subject:
    """whisper-tiny (``--tiny``: :data:`WHISPER_SIZES`' smoke size) converted from a random Hugging Face Whisper; the
    log-mel of seeded noise at the full window; calibration: noise clips with random texts (the decoder step's
    positions included)."""
    from benchmarks.generate import noise_calibration, whisper_pair

    _, model = whisper_pair("smoke" if tiny else whisper_tiny())
    model.eval()
    text = model.config.text
    g = torch.Generator().manual_seed(1)
    wave = 0.1 * torch.randn(batch, model.config.audio.window_samples, generator=g)  # (B, S)
    lengths = torch.full((batch,), wave.shape[1], dtype=torch.long)
    with torch.no_grad():
        features, frames = model.audio_embed.features(wave, lengths), model.audio_embed.features.frames(lengths)
    calibration = noise_calibration(model, 2 if tiny else 4, g)
    prompt = torch.full((batch, 1), text.bos_id, dtype=torch.long)
    return Subject("whisper-tiny", model, {"features": features, "lengths": frames}, calibration, ["audio", "decoder"],
                   decodes=True, prompt=prompt)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the backends
@dataclass
class Peer:
    """A prepared backend: encode → the compared encoder output, decode → ids (B, 1 + new tokens) or None."""

    encode: Callable[[], torch.Tensor]
    decode: Callable[[], torch.Tensor] | None
    file_bytes: int
    prepare_s: float
    note: str = ""


def _files(directory: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in directory.glob(pattern))


def torch_peer(model, s: Subject, n: int, autocast: bool = False) -> tuple[Callable, Callable | None]:
    """A float or torchao model's encode / decode (under forced bf16 autocast if asked)."""
    from mmformer.compress.cpu_precision import inference_autocast

    x = s.inputs

    def encode() -> torch.Tensor:
        with inference_autocast(autocast):
            if "pixel_values" in x:
                return model.encode_image(x["pixel_values"]).float()
            return model.encode_audio_tokens(audio_features=x["features"], feature_lengths=x["lengths"])[0].float()

    def decode() -> torch.Tensor:
        with inference_autocast(autocast):
            return model.generate(audio_features=x["features"], prompt_ids=s.prompt, max_new_tokens=n)

    return encode, decode if s.decodes else None


def pt2e_peer(q, s: Subject, n: int) -> tuple[Callable, Callable | None]:
    x = s.inputs

    def encode() -> torch.Tensor:
        if "pixel_values" in x:
            return q.run("image_encoder", x["pixel_values"])[0]
        return q.run("audio_encoder", x["features"], x["lengths"])[1]

    def decode() -> torch.Tensor:
        return q.generate(audio_features=x["features"], feature_lengths=x["lengths"], prompt_ids=s.prompt,
                          max_new_tokens=n)  # fmt: skip

    return encode, decode if s.decodes else None


def onnx_peer(directory: Path, s: Subject, n: int) -> tuple[Callable, Callable | None]:
    from mmformer.ship.onnx_runner import OnnxModel

    runner = OnnxModel(directory, threads=torch.get_num_threads())
    feed = {k: v.numpy() for k, v in s.inputs.items()}

    def encode() -> torch.Tensor:
        if "pixel_values" in feed:
            return torch.from_numpy(runner._run("image_encoder", pixel_values=feed["pixel_values"])[0])
        out = runner._run("audio_encoder", input_features=feed["features"], feature_lengths=feed["lengths"])
        return torch.from_numpy(out[1])

    def decode() -> torch.Tensor:
        _, states, mask = runner._run("audio_encoder", input_features=feed["features"], feature_lengths=feed["lengths"])
        return torch.from_numpy(runner.generate(states, mask, n))

    return encode, decode if s.decodes else None


def prepare(name: str, s: Subject, out: Path, args: argparse.Namespace, compile: bool, onnx_source: dict) -> Peer:
    """Quantize / export / calibrate ``s.model`` for backend ``name`` (timed), writing its files under ``out``."""
    from mmformer.compress import pt2e
    from mmformer.compress.onnx_quantization import quantize_export
    from mmformer.compress.quantization import quantize
    from mmformer.ship.export import export

    n, start = args.new_tokens, time.perf_counter()
    if name == "fp32" or name == "bf16 autocast":
        encode, decode = torch_peer(s.model, s, n, autocast=name == "bf16 autocast")
        if name == "fp32":
            s.model.save_pretrained(out / "fp32")
        return Peer(encode, decode, _files(out / "fp32", "*.safetensors"), 0.0)
    if name.startswith("pt2e"):
        q = pt2e.quantize(s.model, name.split()[1], calibration=s.calibration, towers=s.towers, compile=compile)
        seconds = time.perf_counter() - start
        path = q.save_pretrained(out / name.replace(" ", "_"))
        note = "compiled (inductor)" if compile else "not compiled (--tiny)"
        return Peer(*pt2e_peer(q, s, n), _files(path, "*.safetensors"), seconds, note)
    if name == "torchao dynamic":
        model = quantize(copy.deepcopy(s.model), "dynamic")
        seconds = time.perf_counter() - start
        model.save_pretrained(out / "torchao_dynamic")
        return Peer(*torch_peer(model, s, n), _files(out / "torchao_dynamic", "*.safetensors"), seconds, "eager")
    if "source" not in onnx_source:  # the float export, shared by the three onnx rows
        onnx_source["source"] = export(s.model, out / "onnx_fp32", format="onnx", towers=s.towers)
        onnx_source["seconds"] = time.perf_counter() - start
    source, export_s = onnx_source["source"], onnx_source["seconds"]
    if name == "onnx fp32":
        return Peer(*onnx_peer(source, s, n), _files(source, "*.onnx*"), export_s, f"{'+'.join(s.towers)} graphs")
    method = name.split()[1]
    path = quantize_export(source, out / name.replace(" ", "_"), method, model=s.model, calibration=s.calibration)
    seconds = time.perf_counter() - start
    return Peer(*onnx_peer(path, s, n), _files(path, "*.onnx*"), seconds, f"+ export {export_s:.0f} s")


# ---------------------------------------------------------------------------------------------- the section
def target(report: dict) -> tuple[float, str]:
    """The issue's int8 speedup target for this CPU, and its class."""
    if report["fast_int8"]:
        return 1.5, "VNNI/AMX-INT8 (" + ", ".join(f for f in report["flags"] if "vnni" in f or "amx" in f) + ")"
    return 1.15, "no VNNI/AMX"


def not_available(s: Subject, name: str, error: Exception) -> dict:
    """The row of a backend that could not run at this size: n/a and the error's first line."""
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return {"size": s.name, "backend": name, "note": f"n/a: {type(error).__name__}: {reason}"}


def first_call(peer: Peer, s: Subject, n: int) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """Seconds of the first encode (+ decode) call (compilation included), the encoder output and the ids, whose
    length is checked: every backend must decode the same ``n`` tokens per row."""
    start = time.perf_counter()
    output = peer.encode()
    ids = None
    if peer.decode is not None:
        ids = peer.decode()
        want = (s.prompt.shape[0], s.prompt.shape[1] + n)
        if tuple(ids.shape) != want:
            raise RuntimeError(f"decoded ids of shape {tuple(ids.shape)}, expected {want} (a fixed token count)")
    return time.perf_counter() - start, output, ids


def size_rows(s: Subject, backends: list[str], out: Path, args: argparse.Namespace, goal: float) -> list[dict]:
    """Prepare every backend for one size, time them interleaved, and the table rows (n/a ones with their reason)."""
    from benchmarks.common import interleaved
    from mmformer.compress.cpu_precision import bf16_choice

    compile = args.compile or not args.tiny  # the PT2E graphs are meant to run compiled; the smoke run skips it
    bf16_on, bf16_why = bf16_choice(True if args.bf16 == "force" or args.tiny else None)
    peers: dict[str, Peer] = {}
    rows = {}
    onnx_source: dict = {}
    for name in backends:
        if name == "bf16 autocast" and not bf16_on:
            rows[name] = {"size": s.name, "backend": name, "note": f"n/a: {bf16_why}"}
            continue
        try:
            peers[name] = prepare(name, s, out, args, compile, onnx_source)
        except Exception as e:  # a backend that cannot serve this size: its reason, never a figure
            if name == "fp32":
                raise
            rows[name] = not_available(s, name, e)
            continue
        print(f"{s.name} / {name}: prepared in {peers[name].prepare_s:.1f} s", flush=True)
    first, ids = {}, {}
    reference = None
    for name, peer in list(peers.items()):  # first calls: compile time, outputs against float32's, token counts
        try:
            first[name], output, ids[name] = first_call(peer, s, args.new_tokens)
        except Exception as e:  # e.g. a graph inductor cannot compile at this size: its reason, never a figure
            if name == "fp32":
                raise
            del peers[name]
            rows[name] = not_available(s, name, e)
            continue
        reference = output.double() if reference is None else reference
        diff = float((output.double() - reference).abs().max())
        scale = float(reference.abs().max())
        rows[name] = {"size": s.name, "backend": name, "max_abs_diff": diff, "fp32_max_abs": scale}
    load = os.getloadavg()[0]
    encode_s = interleaved({n: p.encode for n, p in peers.items()}, warmup=args.warmup, repeats=args.repeats)
    decode_s = {}
    if s.decodes:
        decode_s = interleaved({n: p.decode for n, p in peers.items()}, warmup=args.warmup, repeats=args.repeats)
    fp32 = "fp32"
    for name, peer in peers.items():
        row = rows[name]
        row.update(file_MB=peer.file_bytes / 1e6, prepare_s=peer.prepare_s, first_call_s=first[name], note=peer.note,
                   encode_ms=1e3 * encode_s[name], encode_speedup=encode_s[fp32] / encode_s[name])  # fmt: skip
        row["load"] = load
        speedups = [row["encode_speedup"]]
        if s.decodes:
            row.update(decode_ms=1e3 * decode_s[name], decode_speedup=decode_s[fp32] / decode_s[name],
                       same_ids=float((ids[name] == ids[fp32]).float().mean()))  # fmt: skip
            own, base = decode_s[name] - encode_s[name], decode_s[fp32] - encode_s[fp32]
            row.update(decoder_ms=1e3 * own, decoder_speedup=base / own if own > 0 else math.nan)
            speedups.append(row["decode_speedup"])
        if name in INT8:
            sane = row["max_abs_diff"] <= SANE * row["fp32_max_abs"]
            row["meets_target"] = sane and all(x >= goal for x in speedups)
            if not sane:  # a fast wrong answer is no speedup
                row["note"] = f"{row['note']}; OUTPUT OFF float32's (max abs diff > {SANE:g} of its magnitude)"
    return [rows[name] for name in backends if name in rows]


def sizes_section(args: argparse.Namespace, out: Path, manifest: Path) -> list[dict]:
    """Every backend at ViT-B/32 and whisper-tiny dimensions (``--tiny``: smoke dimensions) against float32."""
    from benchmarks.common import table
    from mmformer.compress.cpu_precision import bf16_choice, cpu_report

    del manifest  # random-weight models, random inputs
    sizes = _choices(args.sizes, SIZES, "sizes")
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 4)  # within the smoke model's 16 positions
    backends = chosen_backends(args.backends)
    report = cpu_report()
    goal, kind = target(report)
    rows = []
    for size in sizes:
        build = clip_subject if size == "vit-b-32" else whisper_subject
        start = time.perf_counter()
        subject = build(args.tiny, args.batch)
        subject.name += " (smoke dims)" if args.tiny else ""
        print(f"{size}: built in {time.perf_counter() - start:.1f} s", flush=True)
        folder = out / size
        folder.mkdir(parents=True, exist_ok=True)
        done = size_rows(subject, backends, folder, args, goal)
        rows += done
        if len(sizes) > 1 and size != sizes[-1]:  # a long run keeps what it measured so far
            print(f"{size} done:\n{table(done, COLUMNS)}", flush=True)
        # the next size is built without this one's models, compiled graphs and sessions beside it (kept, the full
        # run grew to 20 GB and was killed for memory on a 23-GB machine)
        del subject, done
        torch._dynamo.reset()
        gc.collect()
    print(table(rows, COLUMNS))
    print(f"cpu: {report}; {bf16_choice()[1]}")
    print(f"batch {args.batch}, {torch.get_num_threads()} thread(s), {args.new_tokens} new tokens per row (greedy), "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up(s), load average "
          f"{rows[0].get('load', float('nan')):.2f} at the first timing; speedups against PyTorch float32 eager; "
          "decoder = decode − encode; max_abs_diff: the image embeddings (ViT-B/32) or the audio states "
          "(whisper-tiny) against float32's")  # fmt: skip
    print(f"targets: this CPU is {kind}: int8 >= {goal:g}x float32 for encode and decode at both sizes "
          "(>= 1.5x with VNNI or AMX, >= 1.15x without)" + ("; --tiny: smoke dimensions, where they do not apply"
                                                           if args.tiny else ""))  # fmt: skip
    for row in rows:
        if row["backend"] in INT8:
            verdict = row["note"] if "meets_target" not in row else ("met" if row["meets_target"] else "missed")
            verdict += " (its output is off float32's)" if "OUTPUT OFF" in row["note"] else ""
            print(f"  {row['size']} / {row['backend']}: {verdict}")
    return rows
