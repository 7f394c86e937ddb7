"""``mmformer.layers.sdpa``: the SDPA call of every attention, with half-precision CPU training run in float32.

Shape legend: B batch, nh heads, T query tokens, S key tokens, hs head size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmformer.config import StackConfig
from mmformer.layers import Attention
from mmformer.layers.sdpa import UPCAST_MAX_KEYS_X_HEAD, sdpa, upcast_for_backward


def _qkv(dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, 7, 16, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]  # (B, nh, T, hs)


@pytest.fixture
def kernel_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype of ``q`` at every call of ``F.scaled_dot_product_attention`` (recorded, then run as it is)."""
    seen, kernel = [], F.scaled_dot_product_attention

    def record(q, *args, **kwargs):
        seen.append(q.dtype)
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_runs_the_kernel_in_float32(dtype, kernel_dtypes):
    q, k, v = _qkv(dtype, grad=True)
    mask = torch.zeros(2, 7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")).to(dtype)
    out = sdpa(q, k, v, attn_mask=mask)
    assert kernel_dtypes == [torch.float32]
    assert out.dtype == dtype
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float()).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the float32 kernel's result, rounded once
    out.float().square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, attn_mask=mask.double()).to(dtype).float().square().sum().backward()
    for mine, theirs in zip((q, k, v), ref):
        assert mine.grad.dtype == dtype
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=2e-2, atol=2e-2)


def test_autocast_does_not_lower_the_float32_kernel_again():
    """SDPA is on autocast's lower-precision list: inside ``torch.autocast`` the float32 inputs would be cast back."""
    q, k, v = _qkv(torch.bfloat16, grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out = sdpa(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,grad", [(torch.float32, True), (torch.bfloat16, False)])
def test_other_calls_are_sdpa_itself(dtype, grad, kernel_dtypes):
    q, k, v = _qkv(dtype, grad)
    assert not upcast_for_backward(q, k)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert kernel_dtypes == [dtype, dtype]


def test_long_keys_keep_the_half_precision_kernel(kernel_dtypes):
    """Past the crossover (S * hs > UPCAST_MAX_KEYS_X_HEAD) the bf16 kernel is the faster: it runs as it is."""
    q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    k = v = torch.randn(1, 1, UPCAST_MAX_KEYS_X_HEAD // 64 + 1, 64, dtype=torch.bfloat16)
    assert not upcast_for_backward(q, k)
    assert upcast_for_backward(q, k[:, :, :-1])
    sdpa(q, k, v)
    sdpa(q, k[:, :, :-1], v[:, :, :-1])
    assert kernel_dtypes == [torch.bfloat16, torch.float32]


def test_bf16_mixed_attention_layer_matches_float64():
    """An attention layer trained under bf16 autocast: output and weight gradients near float64 (bf16 rounding)."""
    torch.manual_seed(0)
    layer = Attention(StackConfig(width=64, n_heads=4, depth=1))
    x = torch.randn(2, 9, 64)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    ref = Attention(StackConfig(width=64, n_heads=4, depth=1)).double()
    ref.load_state_dict(layer.state_dict())
    want = ref(x.double(), causal=True)
    want.square().mean().backward()
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=5e-2, atol=5e-3, msg=name)
