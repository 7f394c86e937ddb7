"""Inference throughput: images/s and texts/s under ``torch.inference_mode()``, mmformer against open_clip with the
same weights (mmformer's model is ``convert.from_open_clip`` of the open_clip model), both in eval mode.

    python -m benchmarks.encode [--size cpu|gpu] [--batch 64] [--dtypes float32,bf16]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    DTYPES,
    add_clip_arguments,
    base_parser,
    clip_inputs,
    clip_pair,
    interleaved,
    machine,
    parse_args,
    record,
    resolve_clip_size,
    table,
)


def run(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    dtype, device = DTYPES[dtype_name], args.device
    peer, ours, cfg = clip_pair(args.size, device)
    peer.eval(), ours.eval()
    batch = args.batch or cfg["batch"]
    pixels, ids, mask = clip_inputs(ours, cfg, batch, device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def timed(fn):
        def call():
            with torch.inference_mode(), autocast:
                return fn()

        return call

    peers = {
        "image": {
            "open_clip": timed(lambda: peer.encode_image(pixels, normalize=True)),
            "mmformer": timed(lambda: ours.encode_image(pixels)),
        },
        "text": {
            "open_clip": timed(lambda: peer.encode_text(ids, normalize=True)),
            "mmformer": timed(lambda: ours.encode_text(ids, mask)),
        },
    }
    rows = []
    for modality, fns in peers.items():
        a, b = fns["open_clip"](), fns["mmformer"]()
        diff = (a.float() - b.float()).abs().max().item()
        seconds = interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=device)
        rows.append(
            {
                "dtype": dtype_name,
                "modality": modality,
                "batch": batch,
                "open_clip_per_s": batch / seconds["open_clip"],
                "mmformer_per_s": batch / seconds["mmformer"],
                "vs_open_clip": seconds["open_clip"] / seconds["mmformer"],
                "max_abs_diff": diff,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    add_clip_arguments(p, dtypes="float32")
    args = parse_args(p, argv)
    resolve_clip_size(args)
    rows = [row for name in args.dtypes.split(",") for row in run(args, name)]
    print(f"CLIP encoders, inference_mode, size={args.size}, {machine()}")
    columns = ["dtype", "modality", "batch", "open_clip_per_s", "mmformer_per_s", "vs_open_clip", "max_abs_diff"]
    print(table(rows, columns))
    record("encode", rows, args)


if __name__ == "__main__":
    main()
