"""Attention forward+backward time and peak memory versus sequence length: mmformer's fused SDPA path against the
naive reference that materialises softmax(QKᵀ)V.

    python -m benchmarks.attention [--device cuda] [--lengths 256,1024,4096,8192]
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import base_parser, interleaved, machine, parse_args, record, table
from mmformer.config import StackConfig
from mmformer.layers.attention import Attention, reference_attention

ROOT = Path(__file__).resolve().parent.parent


class NaiveAttention(torch.nn.Module):
    """The same weights as ``Attention`` but scores computed explicitly (the reference used by the tests)."""

    def __init__(self, fused: Attention):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fused
        B, T, _ = x.shape
        q, k, v = a.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, a.n_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        out = reference_attention(q, k, v, causal=True)
        return a.proj(out.transpose(1, 2).reshape(B, T, -1))


def _build(args, T: int):
    """The attention layer, its naive twin (same weights) and an input (B, T, D), deterministic for ``args``."""
    torch.manual_seed(0)
    fused = Attention(StackConfig(width=args.width, n_heads=args.heads)).to(args.device)
    naive = NaiveAttention(fused)
    x = torch.randn(args.batch, T, args.width, device=args.device, requires_grad=True)
    steps = {
        "fused": lambda: fused(x, causal=True).sum().backward(),
        "naive": lambda: naive(x).sum().backward(),
    }
    return steps, x


def _memory_child(args) -> None:
    """Child process: build the inputs, run one variant once (or nothing, for the baseline) and print the
    process's peak resident memory in bytes."""
    T, variant = args.memory_child
    steps, _ = _build(args, int(T))
    if variant != "baseline":
        steps[variant]()
    print(_peak_rss())


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, the high-water mark of its own address space. (Not
    ``ru_maxrss``, which Linux carries over from the parent's image across fork + exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the closest measure


def _cpu_peak(args, T: int, variant: str) -> int:
    cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-child", str(T), variant]
    cmd += ["--width", str(args.width), "--heads", str(args.heads), "--batch", str(args.batch)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def peak_memory(args, T: int) -> dict[str, int]:
    """Peak bytes each variant allocates above its inputs in one forward+backward.

    CUDA: the allocator's peak statistics. CPU: each variant runs once in a fresh process and its peak resident
    memory (a high-water mark, which the allocator's reuse of freed blocks cannot hide) is compared with a baseline
    process that builds the same module and inputs and stops there (the smaller of two such baselines).
    """
    if torch.device(args.device).type == "cuda":
        steps, _ = _build(args, T)
        peaks = {}
        for name, fn in steps.items():
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        return peaks
    base = min(_cpu_peak(args, T, "baseline") for _ in range(1 if args.tiny else 2))
    return {name: max(_cpu_peak(args, T, name) - base, 0) for name in ("fused", "naive")}


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--memory-child", nargs=2, metavar=("T", "VARIANT"), help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    if args.memory_child:
        return _memory_child(args)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.tiny:
        lengths, args.width, args.repeats, args.warmup = [128], 32, 1, 1
    for fn in _build(args, lengths[0])[0].values():  # one-time initialisation (kernels, thread pool) off the clock
        fn()
    rows = []
    for T in lengths:
        steps, _ = _build(args, T)
        seconds = interleaved(steps, warmup=args.warmup, repeats=args.repeats, device=args.device)
        del steps
        mem = peak_memory(args, T)
        rows.append(
            {
                "T": T,
                "fused_ms": 1e3 * seconds["fused"],
                "naive_ms": 1e3 * seconds["naive"],
                "speedup": seconds["naive"] / seconds["fused"],
                "fused_MiB": mem["fused"] / 2**20,
                "naive_MiB": mem["naive"] / 2**20,
                "memory_ratio": mem["naive"] / mem["fused"] if mem["fused"] else float("nan"),
            }
        )
    print(f"attention fwd+bwd, causal, B={args.batch}, D={args.width}, heads={args.heads}, {machine()}")
    print(table(rows, ["T", "fused_ms", "naive_ms", "speedup", "fused_MiB", "naive_MiB", "memory_ratio"]))
    record("attention", rows, args)


if __name__ == "__main__":
    main()
