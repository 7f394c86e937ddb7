"""``F.scaled_dot_product_attention`` with one CPU rule: half-precision inputs that autograd will differentiate run
the kernel in float32.

On CPU the fused (flash) kernel's bf16 backward took 7–8× its float32 time while its forward runs alike in both
(torch 2.14.1, one thread, Intel Xeon with AMX; q, k, v (32, 4, 40, 32), forward + backward: bf16 17.8 ms, float32
2.4 ms). Under ``torch.autocast("cpu", torch.bfloat16)`` SDPA is one of the ops autocast lowers, so a bf16-mixed
training step spent most of its time there: ViT-B/32-size CLIP step 478 → 331 ms with this rule (BENCHMARKS.md,
"bf16 training on AMX"). The projections around attention stay in the autocast dtype; inference (no grad) and CUDA
are untouched.

Shape legend: B batch, nh heads, T query tokens, S key tokens, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast_for_backward(q: torch.Tensor) -> bool:
    """Whether SDPA runs in float32 for ``q``: a CPU half-precision tensor that requires grad."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)`` (q (B, nh, T, hs), k/v (B, nkv, S, hs) → (B, nh, T, hs))
    in ``q``'s dtype, run in float32 where :func:`upcast_for_backward` says so (a float ``attn_mask`` too)."""
    if not upcast_for_backward(q):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
