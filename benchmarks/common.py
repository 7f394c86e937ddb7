"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a matmul peak, tables and JSON lines.

Peers run in the same process, alternating repeat by repeat, so that a noisy machine slows both alike and the
ratios hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5, device="cpu") -> dict:
    """Median seconds per call of each function, timed alternately after ``warmup`` untimed calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype: torch.dtype, device="cpu", n: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square ``torch.mm`` in ``dtype``: the machine's practical matmul peak.

    Both operand layouts are timed — ``a @ b`` and ``a @ bᵀ`` (the layout of ``nn.Linear``) — and the faster one
    counts: on CPUs without native bf16 the plain layout takes a slow fallback that would understate the peak.
    """
    n = n or (8192 if torch.device(device).type == "cuda" else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    fns = {"nn": lambda: torch.mm(a, b), "nt": lambda: torch.mm(a, b.t())}
    once = interleaved(fns, warmup=1, repeats=1, device=device)  # pick the faster layout, then time only it
    best = min(once, key=once.get)
    return 2 * n**3 / interleaved({best: fns[best]}, warmup=0, repeats=repeats, device=device)[best]


def machine() -> dict:
    from mmformer.compress.cpu_precision import cpu_model  # the one reader of the CPU's model name

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) in ``columns`` order."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def record(benchmark: str, rows: list[dict], args: argparse.Namespace, path: Path | None = None) -> None:
    """Append the rows as JSON lines with the machine and the arguments, unless ``--no-save``."""
    if getattr(args, "no_save", False):
        return
    path = path or RESULTS
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as f:
        for row in rows:
            f.write(
                json.dumps({"benchmark": benchmark, "time": stamp, "machine": machine(), "args": vars(args), **row})
            )
            f.write("\n")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smallest sizes: a smoke run for the test suite")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results.jsonl")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads for every peer (default: torch's, one per core); on a shared, busy machine one "
        "thread avoids the spin-waits of threads that are not scheduled",
    )
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then apply ``--threads``, so that every peer and the matmul peak run with the same thread count."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---------------------------------------------------------------------------------------------- FLOP counting
_CPU_SDPA_REGISTERED = False


def _register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels (it knows only the CUDA ones), with the same
    formula: 4·B·nh·T·S·hs forward, causal masking not discounted."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _CPU_SDPA_REGISTERED = True


def count_flops(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call of ``fn`` (matmuls, convolutions and attention, as ``FlopCounterMode`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- CLIP peers
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CLIP_SIZES = {
    # ViT 128 px / patch 16 / width 384 / depth 6; text width 256 / depth 6 / context 32
    "cpu": dict(
        embed_dim=256,
        vision_cfg=dict(image_size=128, patch_size=16, width=384, layers=6, head_width=64),
        text_cfg=dict(context_length=32, vocab_size=49408, width=256, heads=4, layers=6),
        batch=32,
    ),
    # ViT-B/16 at 224 (open_clip's ViT-B-16 config)
    "gpu": dict(
        embed_dim=512,
        vision_cfg=dict(image_size=224, patch_size=16, width=768, layers=12, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
        batch=256,
    ),
    # smoke-test size for the suite
    "tiny": dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        batch=2,
    ),
}


def add_clip_arguments(p: argparse.ArgumentParser, dtypes: str) -> None:
    """The CLIP benchmarks' size, dtypes (default ``dtypes``) and batch options."""
    p.add_argument("--size", choices=tuple(CLIP_SIZES), default=None, help="default: gpu on cuda, else cpu")
    p.add_argument("--dtypes", default=dtypes, help="comma-separated: float32 (no autocast), bf16, fp16")
    p.add_argument("--batch", type=int, default=None, help="default: the size's batch (32 cpu, 256 gpu)")


def resolve_clip_size(args: argparse.Namespace) -> None:
    """``--tiny``: the tiny size, one repeat and one warm-up; otherwise the size defaults to the device's."""
    if args.tiny:
        args.size, args.repeats, args.warmup = "tiny", 1, 1
    args.size = args.size or ("gpu" if torch.device(args.device).type == "cuda" else "cpu")


def clip_pair(size: str | dict, device: torch.device | str = "cpu", seed: int = 0):
    """An open_clip ``CLIP`` built from a config dict (a :data:`CLIP_SIZES` name, or such a dict) and the mmformer
    model converted from it (equal weights).

    Returns (open_clip model, mmformer model, config dict), both in train mode on ``device``.
    """
    import open_clip

    from mmformer.convert import from_open_clip

    cfg = CLIP_SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(seed)
    peer = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    ours = from_open_clip(peer)
    return peer.to(device).train(), ours.to(device).train(), cfg


def clip_inputs(model, cfg: dict, batch: int, device: torch.device | str = "cpu", seed: int = 0):
    """Normalised pixels (B, 3, H, W), token ids (B, T) — bos, random tokens, eos, zero padding, as CLIP's tokenizer
    lays them out — and their attention mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    size, T = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    text = model.config.text
    bos, eos = text.bos_id if text.bos_id is not None else text.eos_id - 1, text.eos_id
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.zeros(batch, T, dtype=torch.long)
    lengths = torch.randint(min(4, T), T + 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, n - 1] = bos, eos
        ids[i, 1 : n - 1] = torch.randint(1, min(bos, eos), (n - 2,), generator=g)
    return pixels.to(device), ids.to(device), (ids != 0).to(device)
