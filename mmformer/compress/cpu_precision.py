"""What the CPU computes fast, and bf16 inference where it has the matrix units for it.

bf16 runs on any CPU (PyTorch emulates it where there is no instruction for it, slowly); it is faster than float32
across the board with AMX (``amx_bf16``: Intel Sapphire Rapids and later). With AVX-512 BF16 alone (``avx512_bf16``:
AMD Zen 4, Intel Cooper Lake) it is faster only for large matrix products — measured on a 2-core Zen 4 (BENCHMARKS.md,
2026-12-05): a ViT-B/32 image encoder 1.93× and a whisper-tiny audio encoder 1.48× float32 at batch 8, but
whisper-tiny's decoder steps 0.52× and the digits demo's training step 0.74× (1.17× one-threaded on a Zen 4 after
SDPA's small-shape backward moved to float32, 2026-12-06, but slower than float32 in the demo's two-thread `mmformer
fit`) — so the automatic choice stays AMX and ``enabled=True`` turns it on for an encoder-bound job there. int8
matrix products gain from AVX-512 VNNI / AMX-INT8. :func:`cpu_report` says what this CPU has
(``torch.backends.cpu.get_cpu_capability()`` and the ``/proc/cpuinfo`` flags); :func:`inference_autocast` runs a
block under ``torch.autocast("cpu", torch.bfloat16)`` when the CPU has AMX (or when asked), and says why not
otherwise.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: macOS, Windows)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has AMX bf16 tiles (the matrix unit that makes bf16 faster than float32)."""
    return "amx_bf16" in (cpu_flags() if flags is None else flags)


def cpu_report(flags: frozenset[str] | None = None) -> dict[str, object]:
    """The CPU's model, PyTorch's capability level, the flags that matter here, and the choices they imply."""
    flags = cpu_flags() if flags is None else flags
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in FLAGS if f in flags],
        "fast_bf16": has_amx_bf16(flags),  # AMX tiles
        "fast_int8": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),  # VNNI dot products or AMX-INT8
    }


def bf16_choice(enabled: bool | None = None, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether to run in bf16, and why: ``enabled`` None decides by the CPU (AMX bf16), True/False force it."""
    if enabled is not None:
        return bool(enabled), f"bf16 autocast {'on' if enabled else 'off'}: asked for"
    if has_amx_bf16(flags):
        return True, "bf16 autocast on: this CPU has AMX bf16 tiles"
    if "avx512_bf16" in (cpu_flags() if flags is None else flags):
        return False, (
            f"bf16 autocast off: this CPU ({cpu_model()}) has no AMX bf16 (amx_bf16 flag); its AVX-512 BF16 speeds up "
            "large encoders (ViT-B/32 1.93x) but slows decoding steps (0.52x): force it with enabled=True (the "
            "CLI: --compute-type bfloat16)"
        )
    return False, (
        f"bf16 autocast off: this CPU ({cpu_model()}) has no AMX bf16 (amx_bf16 flag), where bf16 is not faster "
        "than float32; force it with enabled=True (the CLI: --compute-type bfloat16)"
    )


@contextlib.contextmanager
def inference_autocast(enabled: bool | None = None) -> Iterator[tuple[bool, str]]:
    """``with inference_autocast() as (on, why):`` — the block runs under ``torch.autocast("cpu", torch.bfloat16)``
    and ``torch.inference_mode()`` when :func:`bf16_choice` says so (by default: where the CPU has AMX bf16)."""
    on, why = bf16_choice(enabled)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
        yield on, why
