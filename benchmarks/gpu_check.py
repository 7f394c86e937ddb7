"""The GPU check: one command, about 5–8 minutes on one H100/H200, every row on its own (a failing row prints its
error and the check goes on), a table per row on stdout and one JSON line per result in ``--out``/gpu_check.jsonl,
written as soon as the row ends (so a cut-off run keeps what it measured).

Rows (``--rows`` picks some, comma-separated):

- ``sdpa``: which SDPA kernel really runs, from the profiler's CUDA kernel names, for bf16 training (forward +
  backward) and a bf16 decoding step: padded text (``is_causal``, no mask), padded with a key-padding mask, packed
  documents through nested jagged tensors and through per-document dense rows; and whether each still runs with SDPA
  restricted to the flash kernel (``sdpa_kernel(FLASH_ATTENTION)``).
- ``packed_attention``: one causal attention op, bf16 forward + backward, on COCO-like captions (batch 256, width
  512, 8 heads): padded to 77, padded to the longest, packed jagged, packed dense, and FlexAttention with a
  document block mask (compiled), the measurement that picks the packed backend on GPUs.
- ``mfu``: a ViT-B/16-size CLIP training step (batch 256, bf16-mixed autocast, fused AdamW): model-FLOP
  utilisation (FLOPs counted by ``FlopCounterMode``) against the measured bf16 matmul peak and the card's
  nominal dense bf16 peak, with ``torch.compile`` (every block, as ``MultimodalTask(compile=True)``) off and on;
  the compiled step's graph breaks are counted (dynamo's counters; expected 0). Target ≥ 45 % compiled.
- ``fp16``: a Lightning fit of a few steps in ``16-mixed`` precision: the GradScaler is in use, the loss finite.
- ``decode``: greedy decoding at whisper-tiny dimensions, batch 8, 64 new tokens: Hugging Face ``generate``
  (dynamic cache, and static cache) against mmformer eager and ``compile=True``. Target ≥ 3× at batch 8.
- ``graph_decode``: greedy decoding at whisper-small dimensions, batch 8, 64 new tokens: Hugging Face ``generate``
  with its static cache and ``torch.compile`` (its fastest mode) against mmformer's static cache with the step
  captured as a CUDA graph (``cache="static", compile=True``: ``mode="reduce-overhead"``); ids compared. Target
  ≥ 1.25× HF's fastest, token-identical.
- ``speech_train``, ``clip_train``: the training-throughput benchmarks at GPU sizes (bf16; clip_train needs
  open_clip).
- ``fsdp``: FSDP2 (``--trainer.strategy fsdp``, :class:`mmformer.tasks.parallel.FSDP2Strategy`) against DDP, a
  4-step fit of the training task each, weights compared: on one GPU, and on every GPU of the machine where there
  are several (those fits run in a child process that Lightning launches once per GPU).

``--tiny`` runs every row that can at a smoke size on the CPU (the CUDA-only ones print why they skip): the test
suite does, so the script is known to run before it meets a GPU.

    python -m benchmarks.gpu_check --out $OUT [--rows sdpa,mfu] [--budget-s 450]

The prepared command for an H100/H200 (one call of the device tool, within its 10 minutes: the issue's rows first,
rows that would start after --budget-s skip)::

    python -m benchmarks.gpu_check --out $OUT --rows fsdp,graph_decode,mfu,decode,sdpa --budget-s 480
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import count_flops, interleaved, machine, table

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity


class Skip(Exception):
    """A row that cannot run here (the reason is printed and recorded)."""


# ---------------------------------------------------------------------------------------------- helpers
def cuda(ctx: argparse.Namespace) -> None:
    if ctx.device.type != "cuda":
        raise Skip("needs CUDA")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA-synchronised)."""
    return interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device)["fn"]


def kernel_names(fn: Callable[[], Any]) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches that look like attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    keys = ("flash", "fmha", "attention", "attn", "cudnn", "efficient", "sdpa")
    return sorted(n[:90] for n in names if any(k in n.lower() for k in keys))


def flash_only(fn: Callable[[], Any]) -> str:
    """'yes' if ``fn`` runs with SDPA restricted to the flash kernel, else the error (SDPA refuses, not falls back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fn()
        return "yes"
    except RuntimeError as e:
        return f"no ({str(e).splitlines()[0][:80]})"


def caption_lengths(n: int, seed: int = 0, context: int = 77) -> torch.Tensor:
    from benchmarks.lengths import caption_tokens

    return caption_tokens(n, torch.Generator().manual_seed(seed), context=context)


def clip_config(tiny: bool):
    """ViT-B/16 CLIP (configs/clip_vit_b16_webdataset.yaml's model, without drop-path), or a smoke size."""
    from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig

    if tiny:
        vision, text, image, vocab, embed = (
            dict(width=32, depth=1, n_heads=2),
            dict(width=32, depth=1, n_heads=2),
            32,
            64,
            16,
        )
    else:
        vision, text, image, vocab, embed = (
            dict(width=768, depth=12, n_heads=12),
            dict(width=512, depth=12, n_heads=8),
            224,
            49408,
            512,
        )
    return ModelConfig(
        stacks={"vision": StackConfig(**vision), "text": StackConfig(**text)},
        routes={"image": "vision", "text": "text"},
        image=ImageConfig(image_size=[image, image], patch_size=16, pre_norm=True, patch_bias=False),
        audio=None,
        text=TextConfig(
            vocab_size=vocab, max_length=77, causal=True, pool="eot", pad_id=0, bos_id=vocab - 2, eos_id=vocab - 1
        ),
        embed_dim=embed,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- rows
def row_sdpa(ctx: argparse.Namespace) -> list[dict]:
    cuda(ctx)
    from mmformer.config import StackConfig
    from mmformer.layers import Attention, Documents

    device, dtype = ctx.device, torch.bfloat16
    attn = Attention(StackConfig(width=512, n_heads=8)).to(device, dtype)
    lengths = caption_lengths(64)
    docs = Documents(lengths.to(device))
    T = int(lengths.max())
    padded = torch.randn(64, T, 512, device=device, dtype=dtype, requires_grad=True)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
    packed = torch.randn(1, docs.tokens, 512, device=device, dtype=dtype, requires_grad=True)
    jagged, dense = Documents(docs.lengths, backend="jagged"), Documents(docs.lengths, backend="dense")

    def train(x, causal=True, **kw):
        return lambda: attn(x, causal=causal, **kw).sum().backward()

    cases = {
        "train padded, is_causal (no mask)": train(padded),
        "train padded, key-padding mask, bidirectional": train(padded, mask=mask, causal=False),
        "train packed, jagged": train(packed, documents=jagged),
        "train packed, dense per document": train(packed, documents=dense),
    }
    # a decoding step: one query against a KV cache of 100 positions, and cross-attention over 150 memory tokens
    from mmformer.config import AudioConfig, ModelConfig, TextConfig
    from mmformer.model import MultimodalTransformer

    stacks = {
        "enc": StackConfig(width=384, depth=1, n_heads=6),
        "dec": StackConfig(width=384, depth=2, n_heads=6, cross_attention=True),
    }
    config = ModelConfig(
        stacks=stacks,
        routes={"audio": "enc", "decoder": "dec"},
        image=None,
        audio=AudioConfig(n_mels=80, max_frames=300),
        text=TextConfig(vocab_size=1000, max_length=256),
        embed_dim=None,
    )
    model = MultimodalTransformer(config).to(device, dtype).eval()
    memory = torch.randn(8, 150, 384, device=device, dtype=dtype)
    cache = model.make_cache(8, 256)  # room for the prompt and the few steps below
    with torch.no_grad():
        model.decode(torch.ones(8, 100, dtype=torch.long, device=device), memory, cache=cache)

    def step():
        with torch.no_grad():
            model.decode_step(torch.ones(8, 1, dtype=torch.long, device=device), cache=cache)

    cases["decode step (KV cache, cross-attention)"] = step
    rows = []
    for name, fn in cases.items():
        fn()  # warm-up
        rows.append({"case": name, "flash_only": flash_only(fn), "kernels": "; ".join(kernel_names(fn)) or "-"})
    return rows


def row_packed_attention(ctx: argparse.Namespace) -> list[dict]:
    import torch.nn.functional as F

    from mmformer.layers import Documents, document_attention

    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, nh, hs, context = (256, 8, 64, 77) if not ctx.tiny else (4, 2, 8, 12)
    lengths = caption_lengths(B, context=context)
    docs = Documents(lengths.to(device))
    T, N = int(lengths.max()), docs.tokens
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    q77, k77, v77 = (make(B, nh, context, hs) for _ in range(3))
    qT, kT, vT = (make(B, nh, T, hs) for _ in range(3))
    qp, kp, vp = (make(N, nh, hs) for _ in range(3))

    def padded(q, k, v):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def packed(backend):
        d = Documents(docs.lengths, backend=backend)
        if backend == "jagged":
            return lambda: document_attention(qp, kp, vp, d, d, causal=True).sum().backward()

        def dense():  # the dense backend's core: per-document rows padded to the longest, is_causal
            rows = [d.pad(t[None]).transpose(1, 2) for t in (qp, kp, vp)]  # (n, nh, L, hs)
            out = F.scaled_dot_product_attention(*rows, is_causal=True).transpose(1, 2)
            d.unpad(out).sum().backward()

        return dense

    cases = {"padded to 77": padded(q77, k77, v77), "padded to longest": padded(qT, kT, vT)}
    cases["packed dense"] = packed("dense")
    if device.type == "cuda":
        cases["packed jagged"] = packed("jagged")
        try:
            cases["flex (compiled)"] = flex_case(docs, qp, kp, vp)
        except Exception as e:  # noqa: BLE001  (report, keep the other cases)
            print(f"  flex: {type(e).__name__}: {e}", flush=True)
    rows = []
    for name, fn in cases.items():
        seconds = timed(fn, device, repeats=ctx.repeats, warmup=2)
        rows.append(
            {
                "case": name,
                "tokens": N if "packed" in name or "flex" in name else B * (context if "77" in name else T),
                "ms": 1e3 * seconds,
            }
        )
    base = rows[0]["ms"]
    for r in rows:
        r["vs_padded_77"] = base / r["ms"]
    return rows


def flex_case(docs, q, k, v) -> Callable[[], None]:
    """FlexAttention over the packed row with a causal document block mask, compiled (the block mask is built per
    batch inside the timed call, as a training step would)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = docs.tokens
    ids = docs.document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    flex = torch.compile(flex_attention)
    qf, kf, vf = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, nh, N, hs)

    def call():
        block_mask = create_block_mask(mask_mod, None, None, N, N, device=q.device)
        flex(qf, kf, vf, block_mask=block_mask).sum().backward()

    return call


def clip_step(model, batch: int, device, compile: bool, packed: bool = False):
    from mmformer.layers import Documents
    from mmformer.tasks.losses import ContrastiveLoss

    if compile:
        for stack in model.stacks.values():
            for block in stack.blocks:
                block.compile()
    text = model.config.text
    size = model.config.image.image_size[0]
    pixels = torch.randn(batch, 3, size, size, device=device)
    lengths = caption_lengths(batch, context=77)
    ids = torch.randint(1, text.bos_id, (batch, 77))
    ids[torch.arange(batch), lengths - 1] = text.eos_id
    ids[torch.arange(77)[None] >= lengths[:, None]] = 0
    ids = ids.to(device)
    docs = Documents(lengths.to(device)) if packed else None
    packed_ids = ids[ids != 0][None] if packed else None
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    loss_fn = ContrastiveLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            image = model.encode_image(pixels)
            # CLIP's causal text tower with end-of-text pooling needs no mask (open_clip passes none either)
            txt = model.encode_text(packed_ids, documents=docs) if packed else model.encode_text(ids)
            loss = loss_fn(image, txt, model.logit_scale.exp())
        loss.backward()
        optimizer.step()

    return step


def bf16_peak(device) -> float:
    from benchmarks.common import matmul_peak

    return matmul_peak(torch.bfloat16, device, n=8192 if device.type == "cuda" else 256, repeats=5)


def row_mfu(ctx: argparse.Namespace) -> list[dict]:
    from mmformer.model import MultimodalTransformer

    device = ctx.device
    batch = 4 if ctx.tiny else 256
    peak = bf16_peak(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    rows = []
    variants = [("eager", False, False), ("eager, packed text", False, True), ("compiled", True, False)]
    flops_of = {}
    for label, compile, packed in variants:
        if compile and ctx.tiny:
            continue  # compiling is the GPU run's business; the smoke run checks the eager path
        torch.manual_seed(0)
        model = MultimodalTransformer(clip_config(ctx.tiny)).to(device).train()
        step = clip_step(model, batch, device, compile, packed)
        from torch._dynamo.utils import counters

        counters.clear()
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        breaks = sum(counters["graph_break"].values())
        if packed not in flops_of:  # counted eagerly; a compiled step does the same model FLOPs
            flops_of[packed] = count_flops(step)
        flops = flops_of[packed]
        seconds = timed(step, device, repeats=ctx.repeats, warmup=2)
        row = {"step": label, "batch": batch, "step_ms": 1e3 * seconds, "samples_s": batch / seconds}
        row |= {"TFLOP_step": flops / 1e12, "TFLOP_s": flops / seconds / 1e12, "peak_TFLOP_s": peak / 1e12}
        row["mfu_vs_measured_peak"] = flops / seconds / peak
        if nominal:
            row["mfu_vs_nominal"] = flops / seconds / (nominal * 1e12)
        row["first_step_s"] = first
        if compile:
            row["graph_breaks"] = breaks
        rows.append(row)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    return rows


def loss_log(losses: list) -> Any:
    """A Lightning callback that appends each training step's loss to ``losses``."""
    import lightning as L

    class LossLog(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    return LossLog()


def tiny_task_data(n: int = 32):
    """A tiny image–text task, its tokenizer-fed collated batches as a DataLoader (no files)."""
    from torch.utils.data import DataLoader

    from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
    from mmformer.data.collate import Collator
    from mmformer.preprocess.tokenizer import Tokenizer
    from mmformer.tasks import MultimodalTask

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tok = Tokenizer.train([" ".join(words)] * 4, vocab_size=300)
    g = torch.Generator().manual_seed(0)
    samples = [
        {
            "image": torch.randn(3, 32, 32, generator=g),
            "text": " ".join(words[int(d)] for d in str(i)),
            "source": str(i),
        }
        for i in range(n)
    ]
    config = ModelConfig(
        stacks={"shared": StackConfig(width=64, depth=2, n_heads=4, cross_attention=True)},
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        image=ImageConfig(image_size=[32, 32], patch_size=8),
        audio=None,
        text=TextConfig(vocab_size=tok.vocab_size, max_length=16),
        embed_dim=32,
    )
    loader = DataLoader(samples, batch_size=8, collate_fn=Collator(tok))
    return MultimodalTask(config, schedule={"warmup_steps": 1, "max_steps": 4}, generation={"evaluate": False}), loader


def fit_rows(ctx: argparse.Namespace, strategy: Callable[[Any], Any] | None = None, **trainer_kwargs) -> list[dict]:
    """A 4-step Lightning fit of the tiny task; ``strategy(task)`` builds the strategy (default: Lightning's)."""
    import lightning as L

    task, loader = tiny_task_data()
    if strategy is not None:
        trainer_kwargs["strategy"] = strategy(task)
    losses = []

    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[loss_log(losses)],
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(task, loader)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return [
        {
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "steps": trainer.global_step,
            "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "grad_scaler": None if scaler is None else f"scale {scaler.get_scale():g}",
            "seconds": time.perf_counter() - start,
        }
    ]


def row_fp16(ctx: argparse.Namespace) -> list[dict]:
    cuda(ctx)
    return fit_rows(ctx, precision="16-mixed")


def fit_weights(strategy: str, devices: int, accelerator: str = "cuda") -> tuple[dict[str, torch.Tensor], list]:
    """A 4-step fit of the tiny task under ``strategy`` (``fsdp``: FSDP2, float32 parameters, so that it can equal
    DDP exactly; ``ddp``) on ``devices`` devices: the (consolidated) weights on rank 0 and the losses."""
    import lightning as L

    from mmformer.tasks.parallel import FSDP2Strategy

    torch.manual_seed(0)
    task, loader = tiny_task_data()
    losses = []

    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=FSDP2Strategy() if strategy == "fsdp" else strategy,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[loss_log(losses)],
        use_distributed_sampler=True,
    )
    trainer.fit(task, loader)
    state = {}
    for name, value in task.model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # an FSDP2 shard (DTensor)
        state[name] = full.detach().float().cpu().reshape(-1)  # the (1,) logit scale of FSDP2 compares as 0-d
    return state, losses


def fsdp_worker(spec: str) -> None:
    """``--fsdp-worker STRATEGY:DEVICES:FILE``: one multi-GPU fit (Lightning re-runs this command once per GPU);
    rank 0 writes the weights (safetensors) and losses (JSON beside them)."""
    from safetensors.torch import save_file

    strategy, devices, path = spec.split(":", 2)
    state, losses = fit_weights(strategy, int(devices))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        Path(path + ".json").write_text(json.dumps(losses))


def compare_fits(label: str, a: tuple[dict, list], b: tuple[dict, list], seconds: float) -> dict:
    (wa, la), (wb, lb) = a, b
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa) if wa.keys() == wb.keys() else float("inf")
    scale = max(v.abs().max().item() for v in wb.values())
    return {
        "case": label,
        "steps": len(la),
        "max_abs_weight_diff": diff,
        "equal_1e-5_rel": diff <= 1e-5 * max(1.0, scale),
        "fsdp_last_loss": la[-1] if la else None,
        "ddp_last_loss": lb[-1] if lb else None,
        "seconds": seconds,
    }


def row_fsdp(ctx: argparse.Namespace) -> list[dict]:
    """FSDP2 against DDP: one GPU in this process, then every GPU (where there are several) in child processes."""
    import subprocess
    import tempfile

    cuda(ctx)
    start = time.perf_counter()
    rows = [compare_fits("1 GPU", fit_weights("fsdp", 1), fit_weights("ddp", 1), time.perf_counter() - start)]
    n = torch.cuda.device_count()
    if n > 1:
        from safetensors.torch import load_file

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            fits = {}
            for strategy in ("fsdp", "ddp"):
                path = f"{tmp}/{strategy}.safetensors"
                cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--fsdp-worker", f"{strategy}:{n}:{path}"]
                subprocess.run(cmd, check=True, timeout=300)
                fits[strategy] = (load_file(path), json.loads(Path(path + ".json").read_text()))
        rows.append(compare_fits(f"{n} GPUs", fits["fsdp"], fits["ddp"], time.perf_counter() - start))
    return rows


def decoding_rows(peers: dict, device: Any, ctx: Any, *, tokens: int, warmup: int, same: str) -> list[dict]:
    """Tokens/s of each decoding peer (its first call timed apart), and whether its ids equal the first peer's; a
    peer that fails is a row with its error, and the others still run."""
    rows, reference = [], None
    for name, fn in peers.items():
        try:
            start = time.perf_counter()
            ids = fn()
            first = time.perf_counter() - start
            seconds = timed(fn, device, repeats=ctx.repeats, warmup=warmup)
        except Exception as e:  # noqa: BLE001  (one peer failing keeps the others)
            rows.append({"peer": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        reference = ids if reference is None else reference
        rows.append(
            {
                "peer": name,
                "tok_s": tokens / seconds,
                "first_call_s": first,
                same: bool(torch.equal(ids.cpu(), reference.cpu())),
            }
        )
    return rows


def row_decode(ctx: argparse.Namespace) -> list[dict]:
    from transformers import GenerationConfig, GenerationMixin

    from benchmarks.generate import N_MELS, START, WHISPER_SIZES, whisper_pair
    from mmformer.generation.decoding import generate

    device = ctx.device
    size = "smoke" if ctx.tiny else "whisper-tiny"
    batch, n = (2, 4) if ctx.tiny else (8, 64)
    hf, ours = whisper_pair(size)
    hf, ours = hf.to(device), ours.to(device)
    frames = 2 * WHISPER_SIZES[size]["source_positions"]
    features = torch.randn(batch, N_MELS, frames, generator=torch.Generator().manual_seed(0)).to(device)
    prompt = torch.full((batch, 1), START, device=device)
    eos = hf.config.eos_token_id

    def hf_call(**extra):
        config = GenerationConfig(
            bos_token_id=1, pad_token_id=eos, eos_token_id=eos, decoder_start_token_id=START, do_sample=False,
            num_beams=1, max_new_tokens=n, **extra,
        )  # fmt: skip
        return lambda: GenerationMixin.generate(
            hf, input_features=features, decoder_input_ids=prompt, generation_config=config
        )

    peers = {
        "hf (dynamic cache)": hf_call(),
        "hf (static cache)": hf_call(cache_implementation="static"),
        "mmformer eager": lambda: generate(ours, audio_features=features, max_new_tokens=n),
        "mmformer compile=True": lambda: generate(ours, audio_features=features, max_new_tokens=n, compile=True),
    }
    if ctx.tiny:
        peers.pop("mmformer compile=True")
    rows = decoding_rows(peers, device, ctx, tokens=batch * n, warmup=1, same="same_ids")
    base = next((r["tok_s"] for r in rows if r["peer"] == "hf (dynamic cache)" and "tok_s" in r), None)
    for r in rows:
        if base and "tok_s" in r:
            r["vs_hf"] = r["tok_s"] / base
    torch._dynamo.reset()
    return rows


def row_graph_decode(ctx: argparse.Namespace) -> list[dict]:
    """mmformer's static cache with a CUDA-graph step against Hugging Face's fastest mode (static cache +
    ``torch.compile`` of the model's forward), whisper-small dimensions, batch 8, greedy."""
    from transformers import GenerationConfig, GenerationMixin

    from benchmarks.generate import N_MELS, START, WHISPER_SIZES, whisper_pair
    from mmformer.generation.decoding import generate

    device = ctx.device
    size = "smoke" if ctx.tiny else "whisper-small"
    batch, n = (2, 4) if ctx.tiny else (8, 64)
    hf, ours = whisper_pair(size)
    hf, ours = hf.to(device).eval(), ours.to(device).eval()
    frames = 2 * WHISPER_SIZES[size]["source_positions"]
    features = torch.randn(batch, N_MELS, frames, generator=torch.Generator().manual_seed(0)).to(device)
    prompt = torch.full((batch, 1), START, device=device)
    eos = hf.config.eos_token_id
    config = GenerationConfig(
        bos_token_id=1, pad_token_id=eos, eos_token_id=eos, decoder_start_token_id=START, do_sample=False,
        num_beams=1, max_new_tokens=n, cache_implementation="static",
    )  # fmt: skip
    if device.type == "cuda":
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)  # HF's documented fast path

    peers = {
        "hf static cache + torch.compile": lambda: GenerationMixin.generate(
            hf, input_features=features, decoder_input_ids=prompt, generation_config=config
        ),
        "mmformer eager (dynamic cache)": lambda: generate(ours, audio_features=features, max_new_tokens=n),
        "mmformer static cache, eager": lambda: generate(ours, audio_features=features, max_new_tokens=n,
                                                         cache="static"),
        "mmformer static cache + CUDA graph": lambda: generate(
            ours, audio_features=features, max_new_tokens=n, cache="static", compile=True
        ),
    }  # fmt: skip
    if ctx.tiny:
        peers.pop("mmformer static cache + CUDA graph")  # compiling is the GPU run's business
    rows = decoding_rows(peers, device, ctx, tokens=batch * n, warmup=2, same="same_ids_as_hf")
    base = next((r["tok_s"] for r in rows if r["peer"].startswith("hf") and "tok_s" in r), None)
    for r in rows:
        if base and "tok_s" in r:
            r["vs_hf_fastest"] = r["tok_s"] / base
    torch._dynamo.reset()
    return rows


def row_benchmark(name: str) -> Callable[[argparse.Namespace], list[dict]]:
    def run(ctx: argparse.Namespace) -> list[dict]:
        import importlib

        if name == "clip_train":
            try:
                import open_clip  # noqa: F401
            except ImportError as e:
                raise Skip("needs open_clip (pip install open_clip_torch)") from e
        module = importlib.import_module(f"benchmarks.{name}")
        argv = ["--no-save", "--device", str(ctx.device), "--repeats", str(ctx.repeats)]
        if ctx.tiny:
            runs = [argv + ["--tiny"]]
        elif name == "speech_train":
            runs = [argv + ["--dtypes", "bf16", "--batch", "64"]]
        else:
            runs = [argv + ["--dtypes", "bf16", "--size", size] for size in ("gpu", "gpu-b32")]
        rows = []
        for run_argv in runs:
            args = module.arguments(run_argv)
            rows += [{"size": args.size, **r} for dtype in args.dtypes.split(",") for r in module.run(args, dtype)]
        return rows

    return run


ROWS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {  # quick checks first, compiling rows later
    "sdpa": row_sdpa,
    "packed_attention": row_packed_attention,
    "fp16": row_fp16,
    "fsdp": row_fsdp,
    "decode": row_decode,
    "graph_decode": row_graph_decode,
    "mfu": row_mfu,
    "speech_train": row_benchmark("speech_train"),
    "clip_train": row_benchmark("clip_train"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, among {', '.join(ROWS)}")
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.jsonl (e.g. $OUT)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=450.0, help="rows that would start after this many seconds skip")
    p.add_argument("--tiny", action="store_true", help="smoke sizes (CPU): what the test suite runs")
    p.add_argument("--fsdp-worker", help=argparse.SUPPRESS)  # STRATEGY:DEVICES:FILE, the fsdp row's child process
    args = p.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker)
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    args.device = torch.device(args.device)
    if args.tiny:
        args.repeats = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "gpu_check.jsonl"
    info = machine()
    print(f"gpu_check: {info}, rows {rows}, results → {results}", flush=True)
    start = time.perf_counter()
    failures = 0
    for name in rows:
        elapsed = time.perf_counter() - start
        began = time.perf_counter()
        try:
            if elapsed > args.budget_s:
                raise Skip(f"time budget spent ({elapsed:.0f} s > --budget-s {args.budget_s:.0f})")
            found = ROWS[name](args)
            status = "ok"
        except Skip as e:
            found, status = [{"reason": str(e)}], "skipped"
        except Exception as e:  # noqa: BLE001  (every row catches its own failure; the check goes on)
            traceback.print_exc()
            found, status, failures = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}], "error", failures + 1
        finally:
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - began
        print(f"\n[{name}] {status} in {seconds:.1f} s", flush=True)
        columns = list(dict.fromkeys(k for r in found for k in r))
        print(table(found, columns), flush=True)
        with open(results, "a") as f:
            for r in found:
                record = {
                    "check": name,
                    "status": status,
                    "row_seconds": seconds,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                f.write(json.dumps({**record, "machine": info, "tiny": args.tiny, **r}, default=str) + "\n")
    print(f"\ngpu_check done in {time.perf_counter() - start:.0f} s; {failures} row(s) failed; {results}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
