"""One CLIP contrastive training step (forward + backward + AdamW) in mmformer and in open_clip, same weights.

open_clip's ``CLIP`` is built from a config dict; mmformer's model is ``convert.from_open_clip`` of that very model.
Both get the same inputs, the same loss (:class:`mmformer.tasks.losses.ContrastiveLoss`) and the same AdamW settings
(``foreach`` on CPU, ``fused`` on CUDA). Steps alternate between the peers and the median of the repeats is kept.
The FLOPs of one step are counted with ``FlopCounterMode``; utilisation is against a large ``torch.mm`` in the same
dtype measured in the same run.

    python -m benchmarks.train_step                        # CPU size, float32 and bf16 autocast
    python -m benchmarks.train_step --size gpu --device cuda --dtypes bf16 --compile
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    DTYPES,
    add_clip_arguments,
    base_parser,
    clip_inputs,
    clip_pair,
    count_flops,
    interleaved,
    machine,
    matmul_peak,
    parse_args,
    record,
    resolve_clip_size,
    table,
)
from mmformer.convert import from_open_clip
from mmformer.tasks.losses import ContrastiveLoss

_FLOPS: dict[tuple, dict[str, int]] = {}


def make_step(model, encode: Callable, optimizer: torch.optim.Optimizer, dtype: torch.dtype, device: str):
    """A closure running one training step of ``model``; ``encode`` returns (image, text) features."""
    loss_fn = ContrastiveLoss()
    device_type = torch.device(device).type
    autocast = dtype != torch.float32

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            image, text = encode()
            loss = loss_fn(image, text, model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        return loss

    return step


def adamw(model: torch.nn.Module, device: str) -> torch.optim.AdamW:
    fast = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, **fast)


def run(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    dtype, device = DTYPES[dtype_name], args.device
    peer, ours, cfg = clip_pair(args.size, device)
    compiled = None
    if args.compile:  # a second conversion (same weights), its blocks compiled as the training task's `compile` does
        compiled = from_open_clip(peer).to(device).train()
        for stack in compiled.stacks.values():
            for block in stack.blocks:
                block.compile()
    batch = args.batch or cfg["batch"]
    pixels, ids, mask = clip_inputs(ours, cfg, batch, device)

    steps = {
        "open_clip": make_step(
            peer,
            lambda: (peer.encode_image(pixels, normalize=True), peer.encode_text(ids, normalize=True)),
            adamw(peer, device),
            dtype,
            device,
        ),
        "mmformer": make_step(
            ours,
            lambda: (ours.encode_image(pixels), ours.encode_text(ids, mask)),
            adamw(ours, device),
            dtype,
            device,
        ),
    }
    compile_s = None
    if compiled is not None:
        steps["mmformer+compile"] = make_step(
            compiled,
            lambda: (compiled.encode_image(pixels), compiled.encode_text(ids, mask)),
            adamw(compiled, device),
            dtype,
            device,
        )
        start = time.perf_counter()
        steps["mmformer+compile"]()  # the first call compiles
        compile_s = time.perf_counter() - start

    # model FLOPs do not depend on the autocast dtype: count them once per size and batch (a counted step is slow)
    key = (args.size, batch)
    if key not in _FLOPS:
        _FLOPS[key] = {name: count_flops(step) for name, step in steps.items() if "compile" not in name}
    flops = _FLOPS[key]
    seconds = interleaved(steps, warmup=args.warmup, repeats=args.repeats, device=device)
    peak = matmul_peak(dtype, device, n=args.matmul_size, repeats=args.repeats)
    rows = []
    for name, s in seconds.items():
        step_flops = flops.get(name, flops["mmformer"])  # a compiled step does the same model FLOPs
        rows.append(
            {
                "dtype": dtype_name,
                "impl": name,
                "batch": batch,
                "step_ms": 1e3 * s,
                "samples_per_s": batch / s,
                "vs_open_clip": seconds["open_clip"] / s,
                "GFLOP_per_step": step_flops / 1e9,
                "GFLOP_per_s": step_flops / s / 1e9,
                "peak_GFLOP_per_s": peak / 1e9,
                "utilisation": step_flops / s / peak,
                **({"compile_s": compile_s} if "compile" in name else {}),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    add_clip_arguments(p, dtypes="float32,bf16")
    p.add_argument(
        "--compile", action="store_true", help="also time mmformer with every block torch.compile'd (model.compile)"
    )
    p.add_argument("--matmul-size", type=int, default=None, help="side of the square torch.mm for the peak")
    args = parse_args(p, argv)
    resolve_clip_size(args)
    if args.tiny:
        args.matmul_size = args.matmul_size or 128
    rows = [row for name in args.dtypes.split(",") for row in run(args, name)]
    print(f"CLIP train step (fwd+bwd+AdamW), size={args.size}, {machine()}")
    columns = ["dtype", "impl", "batch", "step_ms", "samples_per_s", "vs_open_clip", "GFLOP_per_step"]
    columns += ["GFLOP_per_s", "peak_GFLOP_per_s", "utilisation"] + (["compile_s"] if args.compile else [])
    print(table(rows, columns))
    record("train_step", rows, args)


if __name__ == "__main__":
    main()
