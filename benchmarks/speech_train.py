"""Speech-to-text training throughput as users train: clips of 2–15 s (LibriSpeech-like, :mod:`benchmarks.lengths`),
Hugging Face ``WhisperForConditionalGeneration`` fed as its feature extractor feeds it (every clip padded to 30 s:
3000 log-mel frames; labels padded with -100 to the batch's longest transcript, as its fine-tuning collator does)
against mmformer with the same weights (``convert.from_hf_whisper``), fed its own way: log-mel of each clip's real
frames, padded to the batch's longest clip (``padded``), or packed padding-free (``packed``: the encoder and the
decoder see no padding token, attention stays within each clip and transcript).

Log-mel features are computed outside the step for every peer (Hugging Face's extractor runs in the data loader);
a step is forward + teacher-forced cross-entropy + backward + AdamW. Peers alternate repeat by repeat, each on the
same seeded batches; samples/s is the median.

    python -m benchmarks.speech_train [--size whisper-tiny] [--batch 8]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch

from benchmarks.common import DTYPES, base_parser, interleaved, machine, parse_args, record, table
from benchmarks.generate import N_MELS, START, WHISPER_SIZES, hf_whisper_config
from benchmarks.lengths import FRAMES_PER_SECOND, WHISPER_SECONDS, clip_seconds, transcript_tokens
from mmformer.layers import Documents
from mmformer.tasks.losses import caption_loss, document_targets, teacher_forcing

SIZES = {
    "whisper-tiny": dict(WHISPER_SIZES["whisper-tiny"], source_positions=1500, seconds=(2.0, 15.0), batch=8),
    "smoke": dict(WHISPER_SIZES["smoke"], source_positions=100, seconds=(0.3, 1.5), batch=2),
}


def whisper_pair(size: str, seed: int = 0):
    """A random Hugging Face Whisper of these dimensions (30 s of input at whisper-tiny) and its conversion."""
    from transformers import WhisperForConditionalGeneration
    from transformers.utils import logging

    from mmformer.convert import from_hf_whisper

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = WhisperForConditionalGeneration(hf_whisper_config(SIZES[size])).train()
    return hf, from_hf_whisper(hf).train()


def speech_batches(size: str, batch: int, n: int, device, seed: int = 0) -> list[dict]:
    """``n`` batches of clips and transcripts in the three layouts."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    full = 2 * s["source_positions"]  # the encoder's input frames: 3000 = 30 s at whisper-tiny
    frames_per_second = full / WHISPER_SECONDS if size == "smoke" else FRAMES_PER_SECOND
    eos, vocab = s["vocab"] - 1, s["vocab"]
    out = []
    for _ in range(n):
        seconds = clip_seconds(batch, g, *s["seconds"])
        frames = (seconds * frames_per_second).long().clamp(max=full)
        frames += frames % 2  # whole encoder positions (the strided conv halves them)
        lengths = transcript_tokens(seconds).clamp(max=s["target_positions"])
        features = torch.randn(batch, N_MELS, full, generator=g)
        real = torch.arange(full)[None] < frames[:, None]
        features = features * real[:, None, :]  # silence (zeros) past each clip, as padding
        ids = torch.full((batch, int(lengths.max())), eos)
        for i, length in enumerate(lengths.tolist()):
            ids[i, 0], ids[i, length - 1] = START, eos
            ids[i, 1 : length - 1] = torch.randint(4, vocab - 1, (length - 2,), generator=g)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # HF shifts them right behind decoder_start_token_id
        longest = int(frames.max())
        out.append(
            {
                "hf_features": features.to(device),
                "hf_labels": labels.to(device),
                "features": features[:, :, :longest].to(device),
                "frames": frames.to(device),
                "ids": ids.to(device),
                "mask": mask.to(device),
                "packed": ids[mask][None].to(device),
                "lengths": lengths.to(device),
                "seconds": float(seconds.sum()),
            }
        )
    return out


def training_step(loss: Callable[[], torch.Tensor], optimizer, dtype: torch.dtype, device: str) -> Callable:
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            value = loss()
        value.backward()
        optimizer.step()
        return value

    return step


def run(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    from benchmarks.train_step import adamw

    dtype, device = DTYPES[dtype_name], args.device
    hf, ours = whisper_pair(args.size)
    hf, ours = hf.to(device), ours.to(device)
    batch = args.batch or SIZES[args.size]["batch"]
    data = speech_batches(args.size, batch, 3, device)
    streams = {name: itertools.cycle(data) for name in ("hf", "padded", "packed")}

    def hf_loss() -> torch.Tensor:
        b = next(streams["hf"])
        return hf(input_features=b["hf_features"], labels=b["hf_labels"]).loss

    def padded_loss() -> torch.Tensor:
        b = next(streams["padded"])
        tokens, mask = ours.encode_audio_tokens(audio_features=b["features"], feature_lengths=b["frames"])
        dec_ids, dec_mask, targets = teacher_forcing(b["ids"], b["mask"])
        return caption_loss(ours.decode(dec_ids, tokens, mask, dec_mask), targets)

    def packed_loss() -> torch.Tensor:
        b = next(streams["packed"])
        tokens, memory_docs = ours.encode_audio_documents(audio_features=b["features"], feature_lengths=b["frames"])
        docs = Documents(b["lengths"])
        logits = ours.decode(b["packed"], tokens, documents=docs, memory_documents=memory_docs)
        return caption_loss(logits, document_targets(b["packed"], docs))

    optimizer_hf, optimizer_ours = adamw(hf, device), adamw(ours, device)
    steps = {
        "hf": training_step(hf_loss, optimizer_hf, dtype, device),
        "padded": training_step(padded_loss, optimizer_ours, dtype, device),
        "packed": training_step(packed_loss, optimizer_ours, dtype, device),
    }
    seconds = interleaved(steps, warmup=args.warmup, repeats=args.repeats, device=device)
    row = {
        "dtype": dtype_name,
        "batch": batch,
        "mean_clip_s": round(sum(b["seconds"] for b in data) / len(data) / batch, 2),
    }
    row |= {f"{name}_samples_s": batch / s for name, s in seconds.items()}
    row["padded_vs_hf"] = seconds["hf"] / seconds["padded"]
    row["packed_vs_hf"] = seconds["hf"] / seconds["packed"]
    return [row]


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, its ``--tiny`` sizes applied (gpu_check reuses it)."""
    p = base_parser(__doc__)
    p.add_argument("--size", choices=("whisper-tiny",), default="whisper-tiny")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32 (no autocast), bf16, fp16")
    p.add_argument("--batch", type=int, default=None, help="default: 8")
    p.set_defaults(repeats=3, warmup=1)
    args = parse_args(p, argv)
    if args.tiny:
        args.size, args.repeats, args.warmup = "smoke", 1, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    rows = [row for name in args.dtypes.split(",") for row in run(args, name)]
    print(f"speech-to-text training on 2–15 s clips (Hugging Face: 30 s), size={args.size}, {machine()}")
    columns = ["dtype", "batch", "mean_clip_s", "hf_samples_s", "padded_samples_s", "packed_samples_s"]
    columns += ["padded_vs_hf", "packed_vs_hf"]
    print(table(rows, columns))
    record("speech_train", rows, args)


if __name__ == "__main__":
    main()
