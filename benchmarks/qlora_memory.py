"""Memory of the base weights while fine-tuning: full fine-tuning in float32 and bf16 vs QLoRA (the frozen base's
linear layers in 4-bit NF4 through bitsandbytes, LoRA adapters on top), one captioning training step each.

For each mode: the base weights' bytes as the model holds them during training (4-bit weights with their block
scales; adapter tensors not counted), their ratio to float32 / bf16 full fine-tuning, the parameters that train, and
on CUDA the memory allocated by the weights and the peak of one training step (forward, backward, AdamW).

    python -m benchmarks.qlora_memory                       # the digits model's size (data/digits_model's config)
    python -m benchmarks.qlora_memory --size base --device cuda   # a ViT-B/Whisper-base-sized model, random weights
"""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, machine, parse_args, record, table
from mmformer import MultimodalTransformer
from mmformer.adapt import adapter_state, adapters, four_bit
from mmformer.adapt.adapters import LoraSettings
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig

SIZES = {
    "tiny": dict(width=64, depth=1, heads=4, vocab=64, image=32, patch=16, batch=2, length=8),
    "digits": None,  # data/digits_model's config
    "base": dict(width=768, depth=12, heads=12, vocab=32000, image=224, patch=16, batch=16, length=32),
}
MODES = ("full_fp32", "full_bf16", "qlora_nf4")


def model_config(size: str) -> tuple[ModelConfig, dict]:
    if size == "digits":
        from pathlib import Path

        from mmformer.io.pretrained import read_config

        config = read_config(Path("data/digits_model/config.json"), required=True)
        return config, dict(batch=32, length=8)
    s = SIZES[size]
    config = ModelConfig(
        stacks={"shared": StackConfig(width=s["width"], depth=s["depth"], n_heads=s["heads"], cross_attention=True)},
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        image=ImageConfig(image_size=[s["image"]] * 2, patch_size=s["patch"]),
        audio=AudioConfig(),
        text=TextConfig(vocab_size=s["vocab"], max_length=max(16, s["length"] + 1)),
        embed_dim=s["width"],
    )
    return config, s


def build(config: ModelConfig, mode: str, device: str) -> MultimodalTransformer:
    """The model as the mode trains it, on ``device``: every weight trainable (fp32 / bf16), or a 4-bit base with
    LoRA r=16 on every linear kind of the stack (its other frozen weights in bf16, as QLoRA keeps them)."""
    torch.manual_seed(0)
    model = MultimodalTransformer(copy.deepcopy(config)).to(device)
    if mode == "full_bf16":
        model.to(torch.bfloat16)
    elif mode == "qlora_nf4":
        model.to(torch.bfloat16)  # the frozen non-linear weights (embeddings, convolutions, norms) in 16 bits
        adapters.add_lora(model, LoraSettings(r=16, lora_alpha=32, target_modules=["all"], quantize="nf4"))
        for p in adapter_state.adapter_parameters(model).values():
            p.data = p.data.float()  # adapters train in float32, as peft keeps them
    return model.train()


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The stack's and heads' linear layers (the ones QLoRA quantizes; a tied LM head is the token table)."""
    tied = model.lm_head if model.lm_head is not None and model.config.tie_lm_head else None
    layers = []
    for name, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if ".lora_" in name or ".token_adapter" in name:
            continue  # the adapter's own layers
        if isinstance(base, torch.nn.Linear) and base is not tied and base not in layers:
            layers.append(base)
    return layers


def step(model: MultimodalTransformer, batch: dict, optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> float:
    device_type = batch["pixels"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
        memory, _ = model.encode_image_tokens(batch["pixels"].to(dtype))
        logits = model.decode(batch["ids"][:, :-1], memory)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["ids"][:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def measure(config: ModelConfig, shape: dict, mode: str, device: str, steps: int) -> dict:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    model = build(config, mode, device)
    dtype = torch.float32 if mode == "full_fp32" else torch.bfloat16
    row = {
        "mode": mode,
        "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "base_weights_MiB": four_bit.weight_bytes(model) / 2**20,
        "linear_MiB": sum(four_bit.weight_bytes(m) for m in linear_layers(model)) / 2**20,
    }
    if cuda:
        row["cuda_weights_MiB"] = (torch.cuda.memory_allocated() - before) / 2**20
    g = torch.Generator().manual_seed(1)
    side = config.image.image_size
    batch = {
        "pixels": torch.randn(shape["batch"], config.image.channels, *side, generator=g).to(device),
        "ids": torch.randint(3, config.text.vocab_size, (shape["batch"], shape["length"]), generator=g).to(device),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = [step(model, batch, optimizer, dtype) for _ in range(steps)]
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    if cuda:
        row["cuda_step_peak_MiB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    del model, optimizer
    return row


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: base on cuda, else digits")
    p.add_argument("--steps", type=int, default=3)
    args = parse_args(p, argv)
    size = "tiny" if args.tiny else args.size or ("base" if torch.device(args.device).type == "cuda" else "digits")
    config, shape = model_config(size)
    rows = [measure(config, shape, mode, args.device, 2 if args.tiny else args.steps) for mode in MODES]
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:
        r["size"] = size
        r["vs_fp32"] = by_mode["full_fp32"]["base_weights_MiB"] / r["base_weights_MiB"]
        r["vs_bf16"] = by_mode["full_bf16"]["base_weights_MiB"] / r["base_weights_MiB"]
        r["linear_vs_bf16"] = by_mode["full_bf16"]["linear_MiB"] / r["linear_MiB"]
    columns = ["size", "mode", "trainable_M", "base_weights_MiB", "vs_fp32", "vs_bf16", "linear_vs_bf16"]
    columns += [c for c in ("cuda_weights_MiB", "cuda_step_peak_MiB") if c in rows[0]] + ["loss_first", "loss_last"]
    print(f"QLoRA base-weight memory ({machine().get('gpu', machine()['cpu'])}, device {args.device})")
    print(table(rows, columns))
    record("qlora_memory", rows, args)


if __name__ == "__main__":
    main()
