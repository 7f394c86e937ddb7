"""The demo's training step (configs/digits.yaml) as ``make demo`` runs it, without Lightning and the loader: the
recipe's own augmented, packed batches, made beforehand from its data module; a step is the task's weighted loss
(every objective) + backward + its AdamW. Variants alternate step by step on the same batches:

- ``grouped``: the audio front end in length groups on CPU (``AudioEmbedder.length_groups``, the default);
- ``whole``: every clip's front end padded to the batch's longest (the path of exports, compiled models and GPUs);
- ``bf16``: the default under ``torch.autocast("cpu", torch.bfloat16)`` (fast only where the CPU has AMX).

Reported: mean and median seconds per step, and each variant against ``grouped`` (mean: long batches count as
often as the recipe draws them). The weights move with every step, so each variant sees a slightly different model:
timings, not losses, are compared.

    python -m benchmarks.digits_step [--config configs/digits.yaml] [--steps 24] [--threads 1] [--variants ...]
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings

import torch

from benchmarks.common import base_parser, machine, parse_args, record, table
from mmformer.demos.digits import share_cores, usable_cores

VARIANTS = ("grouped", "whole", "bf16")


def recipe(config: str, steps: int, batch_size: int | None):
    """The config's task (its optimizer, for a schedule of the config's steps) and ``steps`` training batches."""
    from mmformer.cli.training import build_cli

    args = ["--config", config, "--data.num_workers", "0"]
    if batch_size:
        args += ["--data.batch_size", str(batch_size)]
    with warnings.catch_warnings():  # LightningCLI's "args and sys.argv both given": the benchmark's own flags
        warnings.filterwarnings("ignore", "LightningCLI's args parameter")
        cli = build_cli(args, run=False)
    task, data = cli.model, cli.datamodule
    data.setup("fit")
    batches = iter(data.train_dataloader())
    batches = [next(batches) for _ in range(steps)]
    task.schedule = dataclasses.replace(task.schedule, max_steps=cli.trainer.max_steps)
    optimizers = task.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers[0][0]
    return task.train(), optimizer, batches


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--steps", type=int, default=24, help="batches, each run once per variant (after --warmup)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    args = parse_args(p, argv)
    if args.tiny:
        args.steps, args.warmup, args.batch_size = 3, 1, args.batch_size or 4
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        p.error(f"--variants: expected names of {list(VARIANTS)}, got {unknown}")
    if args.threads is None:  # make demo's compute threads (every core; its loader worker runs in their idle moments)
        torch.set_num_threads(share_cores(usable_cores())[0])
    task, optimizer, batches = recipe(args.config, args.steps, args.batch_size)
    embed = task.model.audio_embed

    def step(variant: str, batch: dict) -> float:
        if variant == "whole":  # this instance only, for this step
            embed.length_groups = lambda audio, lengths: None
        start = time.perf_counter()
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=variant == "bf16"):
                parts, _ = task._losses(batch, "train")
                loss = sum(task.weights[name] * value for name, value in parts.items())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            vars(embed).pop("length_groups", None)
        return time.perf_counter() - start

    for batch in batches[: args.warmup]:
        for variant in variants:
            step(variant, batch)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for batch in batches:
        for variant in variants:
            times[variant].append(step(variant, batch))
    fill = [float(b["audio_lengths"].sum() / (b["audio_lengths"].numel() * b["audio"].shape[-1])) for b in batches]
    base = statistics.mean(times[variants[0]])
    rows = [
        {
            "variant": v,
            "mean_s": statistics.mean(t),
            "median_s": statistics.median(t),
            f"vs_{variants[0]}": base / statistics.mean(t),
        }
        for v, t in times.items()
    ]
    print(f"{machine()}; {len(batches)} steps of {args.config}, batch {batches[0]['audio'].shape[0]}, "
          f"real samples in the padded audio batch {min(fill):.2f}-{max(fill):.2f}")  # fmt: skip
    print(table(rows, ["variant", "mean_s", "median_s", f"vs_{variants[0]}"]))
    record("digits_step", rows, args)


if __name__ == "__main__":
    main()
