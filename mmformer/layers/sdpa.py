"""``F.scaled_dot_product_attention`` with one CPU rule: half-precision inputs that autograd will differentiate, over
short key sequences, run the kernel in float32.

On CPU the fused (flash) kernel's bf16 backward carries a large fixed cost per block of queries, while its forward
runs alike in both dtypes (torch 2.14.1, Intel Xeon with AMX; forward + backward, (B, nh, S, hs)): (32, 4, 40, 32)
bf16 16.8 ms, float32 2.2 ms; (32, 12, 50, 64) 41 vs 10 ms; (8, 6, 300, 64) 32 vs 30 ms; past the crossover the bf16
kernel wins — (8, 6, 750, 64) 94 vs 118 ms, (8, 16, 200, 128) 64 vs 82 ms. The crossover sits near S·hs ≈ 20k keys
× head size (hs 32: S ≈ 600; 64: ≈ 350; 128: ≈ 150), :data:`UPCAST_MAX_KEYS_X_HEAD`. Under ``torch.autocast("cpu",
torch.bfloat16)`` SDPA is one of the ops autocast lowers, so a bf16-mixed training step of short sequences spent most
of its time there: ViT-B/32-size CLIP step 478 → 331 ms with this rule (BENCHMARKS.md, "bf16 training on AMX"). The
projections around attention stay in the autocast dtype; inference (no grad) and CUDA are untouched.

Shape legend: B batch, nh heads, T query tokens, S key tokens, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPCAST_MAX_KEYS_X_HEAD = 20_480  # S * hs up to which the float32 kernel's forward + backward is the faster (CPU)


def upcast_for_backward(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether SDPA runs in float32: CPU half-precision ``q`` that requires grad, keys ``k`` (B, nkv, S, hs) short
    enough that the float32 kernel is the faster (:data:`UPCAST_MAX_KEYS_X_HEAD`)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.requires_grad
        and k.shape[-2] * k.shape[-1] <= UPCAST_MAX_KEYS_X_HEAD
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)`` (q (B, nh, T, hs), k/v (B, nkv, S, hs) → (B, nh, T, hs))
    in ``q``'s dtype, run in float32 where :func:`upcast_for_backward` says so (a float ``attn_mask`` too). Keys and
    values cached in another dtype (a KV cache's bf16 cross-attention keys/values) are met in theirs: the queries
    are cast to it, the output back."""
    if k.dtype != q.dtype:
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.to(k.dtype)
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, **kwargs).to(q.dtype)
    if not upcast_for_backward(q, k):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
