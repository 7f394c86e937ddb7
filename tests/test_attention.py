"""Attention parity: every variant of :class:`mmformer.layers.Attention` (float32, through SDPA) equals a float64
``softmax(QKᵀ/√hs + bias + mask) V`` written here from the module's own weights, to 1e-5.

Shape legend: B batch, T query tokens, S key tokens, D width, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from mmformer.config import StackConfig
from mmformer.layers import Attention, reference_attention

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-5

VARIANTS = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "qk_rmsnorm": dict(qk_norm=True, norm="rmsnorm"),
    "rope": dict(position="rope"),
    "rope_gqa_qk_norm": dict(position="rope", n_kv_heads=2, qk_norm=True),
    "alibi": dict(position="alibi"),
    "alibi_6_heads": dict(position="alibi", width=24, n_heads=6),
    "alibi_mqa": dict(position="alibi", n_kv_heads=1),
    "no_bias": dict(bias=False),
}
MASKS = ["none", "padding", "causal", "causal_right_padding", "causal_left_padding"]


# ---------------------------------------------------------------- an independent float64 reference
def _norm64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm / RMSNorm over the last dim, in float64, from the module's affine parameters."""
    w = module.weight.double()
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps) * w + module.bias.double()
    assert isinstance(module, nn.RMSNorm)
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + module.eps) * w


def _rope64(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) by the angle pos * theta^(-2i/hs) (GPT-NeoX / LLaMA layout)."""
    hs = x.shape[-1]
    half = hs // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hs)  # (hs/2,)
    angle = positions.double()[:, None] * freq[None, :]  # (T, hs/2)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)


def _alibi_slopes64(n: int) -> torch.Tensor:
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if n & (n - 1) == 0:
        return torch.tensor(geometric(n), dtype=torch.float64)
    closest = 2 ** int(math.floor(math.log2(n)))
    return torch.tensor(geometric(closest) + geometric(2 * closest)[0::2][: n - closest], dtype=torch.float64)


def _linear64(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def naive_attention(
    attn: Attention,
    cfg: StackConfig,
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    memory: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module's output recomputed in float64 with a materialised (T, S) score matrix.

    Self-attention: queries are the last T of S = T positions. Cross-attention takes keys/values from ``memory`` and
    uses no relative positions (as Whisper and T5): RoPE and ALiBi apply to self-attention only.
    """
    nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = x.double()
    B, T, _ = x.shape
    if memory is None:
        q, k, v = _linear64(attn.qkv, x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    else:
        q = _linear64(attn.q, x)
        k, v = _linear64(attn.kv, memory.double()).chunk(2, dim=-1)
    S = k.shape[1]
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, S, nkv, hs).transpose(1, 2)  # (B, nkv, S, hs)
    v = v.view(B, S, nkv, hs).transpose(1, 2)
    if cfg.qk_norm:
        q, k = _norm64(attn.q_norm, q), _norm64(attn.k_norm, k)
    self_attention = memory is None
    if self_attention and cfg.position == "rope":
        q = _rope64(q, torch.arange(S - T, S), cfg.rope_theta)
        k = _rope64(k, torch.arange(S), cfg.rope_theta)
    # GQA: key/value head g serves query heads g*nh/nkv … (g+1)*nh/nkv - 1
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, S)
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    if self_attention and cfg.position == "alibi":
        distance = (i - j) if causal else (i - j).abs()
        scores = scores - _alibi_slopes64(nh)[:, None, None] * distance.double()
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    out = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v  # (B, nh, T, hs)
    return _linear64(attn.proj, out.transpose(1, 2).reshape(B, T, nh * hs))


# ---------------------------------------------------------------- helpers
def _attention(cfg: StackConfig, cross: bool = False) -> Attention:
    attn = Attention(cfg, cross=cross).eval()
    with torch.no_grad():  # non-trivial norm affines so that qk_norm's parameters matter
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(0.2 * torch.randn_like(norm.bias))
    return attn


def _padding_mask(lengths: list[int], length: int, *, left: bool = False) -> torch.Tensor:
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, S), right padded
    return mask.flip(1) if left else mask


def _random_mask(batch: int, length: int) -> torch.Tensor:
    """Arbitrary (not necessarily contiguous) key padding with at least one real key per row."""
    mask = torch.rand(batch, length) < 0.6
    mask[torch.arange(batch), torch.randint(length, (batch,))] = True
    return mask


def _shapes(seed: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))


def _case(mode: str, B: int, T: int) -> tuple[torch.Tensor | None, bool, torch.Tensor]:
    """(key mask, causal, which query positions to compare) for one mask mode."""
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    everything = torch.ones(B, T, dtype=torch.bool)
    if mode == "none":
        return None, False, everything
    if mode == "padding":
        return _random_mask(B, T), False, everything
    if mode == "causal":
        return None, True, everything
    # Causal attention with padding: only real queries are defined (a padded query of a right-padded row may see the
    # padding keys, by design: is_causal alone is exact for real positions).
    mask = _padding_mask(lengths, T, left=mode == "causal_left_padding")
    return mask, True, mask


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", MASKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_self_attention_matches_float64_reference(make_stack_config, variant, mode):
    cfg = make_stack_config(**VARIANTS[variant])
    attn = _attention(cfg)
    B, T = _shapes(zlib.crc32(f"{variant}/{mode}".encode()))
    mask, causal, compare = _case(mode, B, T)
    x = 2 * torch.randn(B, T, cfg.width)
    out = attn(x, mask=mask, causal=causal)
    expected = naive_attention(attn, cfg, x, mask=mask, causal=causal)
    assert out.dtype == torch.float32 and out.shape == (B, T, cfg.width)
    torch.testing.assert_close(out.double()[compare], expected[compare], rtol=0, atol=ATOL)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "qk_norm", "rope", "alibi", "no_bias"])
def test_cross_attention_matches_float64_reference(make_stack_config, variant, with_mask):
    cfg = make_stack_config(**VARIANTS[variant])
    attn = _attention(cfg, cross=True)
    B, T, S = 3, 4, 7  # query and memory lengths differ
    x, memory = 2 * torch.randn(B, T, cfg.width), 2 * torch.randn(B, S, cfg.width)
    memory_mask = _random_mask(B, S) if with_mask else None
    out = attn(x, mask=memory_mask, memory=memory)
    expected = naive_attention(attn, cfg, x, mask=memory_mask, memory=memory)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=ATOL)


def test_cross_attention_ignores_causal_flag(make_stack_config):
    attn = _attention(make_stack_config(), cross=True)
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x, memory=memory, causal=True), attn(x, memory=memory))


def test_cross_attention_without_memory_is_a_clear_error(make_stack_config):
    attn = _attention(make_stack_config(), cross=True)
    with pytest.raises(ValueError, match="memory"):
        attn(torch.randn(1, 2, 16))


def test_core_reference_attention_agrees_with_this_one(make_stack_config):
    """The core's test helper ``reference_attention`` is itself right (other test files use it)."""
    cfg = make_stack_config(n_kv_heads=2)
    B, nh, nkv, T, hs = 2, cfg.n_heads, 2, 5, cfg.head_dim
    q, k, v = torch.randn(B, nh, T, hs).double(), torch.randn(B, nkv, T, hs).double(), torch.randn(B, nkv, T, hs)
    v = v.double()
    mask = _padding_mask([5, 3], T)
    scores = q @ k.repeat_interleave(nh // nkv, 1).transpose(-1, -2) / math.sqrt(hs)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & mask[:, None, None, :]
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(nh // nkv, 1)
    torch.testing.assert_close(reference_attention(q, k, v, mask=mask, causal=True), expected)


# ---------------------------------------------------------------- GQA / MQA against MHA with the same weights
def _repeat_kv_rows(weight: torch.Tensor, n_kv: int, n_heads: int) -> torch.Tensor:
    """(nkv*hs, ...) k or v projection rows → (nh*hs, ...): each kv head copied for its group of query heads."""
    hs = weight.shape[0] // n_kv
    rows = weight.reshape(n_kv, hs, *weight.shape[1:])
    return rows.repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * hs, *weight.shape[1:])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_equals_mha_with_repeated_kv_weights(make_stack_config, n_kv_heads):
    gqa_cfg, mha_cfg = make_stack_config(n_kv_heads=n_kv_heads), make_stack_config()
    gqa, mha = _attention(gqa_cfg), _attention(mha_cfg)
    nh, hs = gqa_cfg.n_heads, gqa_cfg.head_dim
    state = gqa.state_dict()
    for name in ("weight", "bias"):
        q, k, v = state[f"qkv.{name}"].split([nh * hs, n_kv_heads * hs, n_kv_heads * hs])
        state[f"qkv.{name}"] = torch.cat([q, _repeat_kv_rows(k, n_kv_heads, nh), _repeat_kv_rows(v, n_kv_heads, nh)])
    mha.load_state_dict(state)
    x, mask = torch.randn(2, 6, 16), _padding_mask([6, 4], 6)
    for causal in (False, True):
        torch.testing.assert_close(gqa(x, mask=mask, causal=causal), mha(x, mask=mask, causal=causal))


def test_n_kv_heads_equal_to_n_heads_is_mha(make_stack_config):
    """n_kv_heads = n_heads is plain multi-head attention: the same outputs as torch's own nn.MultiheadAttention
    loaded with the module's weights (its in_proj rows are q | k | v, as mmformer's fused qkv)."""
    explicit, default = make_stack_config(n_kv_heads=4), make_stack_config()
    assert explicit == default and explicit.n_kv_heads == explicit.n_heads
    attn = _attention(explicit)
    torch_mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(attn.qkv.weight)
        torch_mha.in_proj_bias.copy_(attn.qkv.bias)
        torch_mha.out_proj.weight.copy_(attn.proj.weight)
        torch_mha.out_proj.bias.copy_(attn.proj.bias)
    x, mask = torch.randn(2, 5, 16), _padding_mask([5, 3], 5)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)  # torch's convention: True = may not attend
    expected, _ = torch_mha(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(attn(x, causal=True), expected, rtol=0, atol=ATOL)
    expected, _ = torch_mha(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(attn(x, mask=mask), expected, rtol=0, atol=ATOL)


def test_multi_query_cross_attention_equals_mha(make_stack_config):
    mqa, mha = _attention(make_stack_config(n_kv_heads=1), cross=True), _attention(make_stack_config(), cross=True)
    state = mqa.state_dict()
    for name in ("weight", "bias"):
        k, v = state[f"kv.{name}"].chunk(2)
        state[f"kv.{name}"] = torch.cat([_repeat_kv_rows(k, 1, 4), _repeat_kv_rows(v, 1, 4)])
    mha.load_state_dict(state)
    x, memory, mask = torch.randn(2, 3, 16), torch.randn(2, 5, 16), _padding_mask([5, 2], 5)
    torch.testing.assert_close(mqa(x, memory=memory, mask=mask), mha(x, memory=memory, mask=mask))


def test_kv_projection_sizes(make_stack_config):
    """MQA/GQA shrink the k/v projections (the point of them), q keeps every head."""
    attn = Attention(make_stack_config(n_kv_heads=1))
    assert attn.qkv.out_features == 16 + 2 * 4
    cross = Attention(make_stack_config(n_kv_heads=2), cross=True)
    assert (cross.q.out_features, cross.kv.out_features) == (16, 2 * 8)
