"""CLIP training throughput as users train: captions of COCO-like lengths (:mod:`benchmarks.lengths`), open_clip fed
as its tokenizer feeds it (every caption padded to the fixed context of 77) against mmformer fed by its own
collation: padded to the batch's longest caption (``Collator``) and packed, padding-free (``Collator(packing=True)``,
:class:`mmformer.layers.Documents`).

Same weights (mmformer's model is ``convert.from_open_clip`` of the open_clip model), same images, the same caption
tokens, the same loss (:class:`~mmformer.tasks.losses.ContrastiveLoss`) and AdamW; a step is forward + backward +
optimizer step; peers alternate repeat by repeat and the median is kept. Each repeat draws a new batch of caption
lengths from the same seeded stream for every peer. The model is open_clip's CPU benchmark size (ViT 128 px,
patch 16, width 384, depth 6; text width 256, depth 6) with the real context of 77; ``--size gpu`` is ViT-B/16;
the ``-b32`` sizes have patch 32 (ViT-B/32 proportions: fewer image tokens, so the text tower weighs more).

    python -m benchmarks.clip_train [--size cpu|cpu-b32|gpu|gpu-b32] [--batch 64] [--dtypes float32]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import (
    CLIP_SIZES,
    DTYPES,
    base_parser,
    clip_pair,
    interleaved,
    machine,
    parse_args,
    record,
    table,
)
from benchmarks.lengths import CLIP_CONTEXT, caption_tokens
from benchmarks.train_step import adamw, make_step
from mmformer.layers import Documents


def _with(size: dict, **vision) -> dict:
    return {**size, "vision_cfg": {**size["vision_cfg"], **vision}}


_CPU = {**CLIP_SIZES["cpu"], "text_cfg": {**CLIP_SIZES["cpu"]["text_cfg"], "context_length": CLIP_CONTEXT}}
SIZES = {
    # ViT-B/16 proportions (64 image tokens at 128 px), and ViT-B/32 proportions (16 image tokens): the text tower's
    # share of a step, and so what packing can save, is about 1/3 and 2/3 of the step at context 77
    "cpu": _CPU,
    "cpu-b32": _with(_CPU, patch_size=32),
    "gpu": CLIP_SIZES["gpu"],  # ViT-B/16 at 224 px: 196 image tokens, the text tower ~1/6 of the step
    "gpu-b32": _with(CLIP_SIZES["gpu"], patch_size=32),  # ViT-B/32 at 224 px: 49 image tokens
    "tiny": {**CLIP_SIZES["tiny"], "text_cfg": {**CLIP_SIZES["tiny"]["text_cfg"], "context_length": 12}},
}


def caption_batches(model, cfg: dict, batch: int, n: int, device, seed: int = 0) -> list[dict]:
    """``n`` batches: pixels, and the same captions as open_clip rows (B, 77), mmformer padded rows (B, longest)
    with their mask, and mmformer packed ids (1, N) with their lengths."""
    g = torch.Generator().manual_seed(seed)
    text = model.config.text
    context, size = cfg["text_cfg"]["context_length"], cfg["vision_cfg"]["image_size"]
    bos, eos = (text.bos_id if text.bos_id is not None else text.eos_id - 1), text.eos_id
    batches = []
    for _ in range(n):
        lengths = caption_tokens(batch, g, context=context)
        rows = torch.zeros(batch, context, dtype=torch.long)
        for i, length in enumerate(lengths.tolist()):
            rows[i, 0], rows[i, length - 1] = bos, eos
            rows[i, 1 : length - 1] = torch.randint(1, min(bos, eos), (length - 2,), generator=g)
        mask = torch.arange(context)[None] < lengths[:, None]
        longest = int(lengths.max())
        batches.append(
            {
                "pixels": torch.randn(batch, 3, size, size, generator=g).to(device),
                "open_clip": rows.to(device),
                "padded": rows[:, :longest].to(device),
                "mask": mask[:, :longest].to(device),
                "packed": rows[mask][None].to(device),
                "lengths": lengths.to(device),
            }
        )
    return batches


def run(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    dtype, device = DTYPES[dtype_name], args.device
    cfg = SIZES[args.size]
    peer, ours, _ = clip_pair(cfg, device)
    batch = args.batch or cfg["batch"]
    data = caption_batches(ours, cfg, batch, 4, device)
    streams = {name: itertools.cycle(data) for name in ("open_clip", "padded", "packed")}

    def encode(name: str):
        def call():
            b = next(streams[name])
            if name == "open_clip":
                return peer.encode_image(b["pixels"], normalize=True), peer.encode_text(b["open_clip"], normalize=True)
            if name == "padded":
                return ours.encode_image(b["pixels"]), ours.encode_text(b["padded"], b["mask"])
            docs = Documents(b["lengths"])  # what the training task builds from the batch's text_lengths
            return ours.encode_image(b["pixels"]), ours.encode_text(b["packed"], documents=docs)

        return call

    models = {"open_clip": peer, "padded": ours, "packed": ours}
    optimizers = {"open_clip": adamw(peer, device), "ours": adamw(ours, device)}
    steps = {
        name: make_step(model, encode(name), optimizers["open_clip" if name == "open_clip" else "ours"], dtype, device)
        for name, model in models.items()
    }
    seconds = interleaved(steps, warmup=args.warmup, repeats=args.repeats, device=device)
    real = float(sum(b["lengths"].sum() for b in data)) / len(data)
    row = {"dtype": dtype_name, "batch": batch, "text_tokens": round(real / batch, 1)}
    row["padded_tokens"] = round(sum(b["padded"].numel() for b in data) / len(data) / batch, 1)
    row |= {f"{name}_samples_s": batch / s for name, s in seconds.items()}
    row["padded_vs_open_clip"] = seconds["open_clip"] / seconds["padded"]
    row["packed_vs_open_clip"] = seconds["open_clip"] / seconds["packed"]
    return [row]


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, its ``--tiny`` sizes applied (gpu_check reuses it)."""
    p = base_parser(__doc__)
    p.add_argument("--size", choices=tuple(s for s in SIZES if s != "tiny"), default=None, help="default: gpu/cpu")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32 (no autocast), bf16, fp16")
    p.add_argument("--batch", type=int, default=None, help="default: the size's batch (32 cpu, 256 gpu)")
    args = parse_args(p, argv)
    if args.tiny:
        args.size, args.repeats, args.warmup = "tiny", 1, 1
    args.size = args.size or ("gpu" if torch.device(args.device).type == "cuda" else "cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    rows = [row for name in args.dtypes.split(",") for row in run(args, name)]
    print(
        f"CLIP training on COCO-like caption lengths (open_clip: context {CLIP_CONTEXT}), size={args.size}, {machine()}"
    )
    columns = ["dtype", "batch", "text_tokens", "padded_tokens", "open_clip_samples_s", "padded_samples_s"]
    columns += ["packed_samples_s", "padded_vs_open_clip", "packed_vs_open_clip"]
    print(table(rows, columns))
    record("clip_train", rows, args)


if __name__ == "__main__":
    main()
