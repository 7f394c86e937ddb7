"""Position schemes: RoPE is relative, ALiBi is the paper's bias, sinusoids are Whisper's table, absolute tables
check their length, 2-D patch tables resample bicubically (as timm) to other image sizes.

Shape legend: B batch, nh heads, T tokens, hs head size, gh×gw patch grid, D width.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmformer.layers import AbsolutePositions, RotaryEmbedding, alibi_bias, alibi_slopes, sinusoids
from mmformer.layers.positions import resample_patch_positions
from mmformer.model import MultimodalTransformer

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)


# ---------------------------------------------------------------- RoPE
def _score(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """q·k after rotating q to position m and k to position n; q, k (hs,)."""
    return (rope(q.view(1, 1, 1, -1), m) * rope(k.view(1, 1, 1, -1), n)).sum()


@pytest.mark.parametrize("head_dim", [4, 8, 32])
def test_rope_scores_depend_only_on_the_relative_offset(head_dim):
    rope = RotaryEmbedding(head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    for m, n in [(0, 0), (3, 1), (1, 3), (7, 2), (0, 9)]:
        base = _score(rope, q, k, m, n)
        for shift in (1, 5, 40):
            torch.testing.assert_close(_score(rope, q, k, m + shift, n + shift), base, rtol=1e-5, atol=1e-4)
    # …and the offset does matter
    assert not torch.allclose(_score(rope, q, k, 0, 3), _score(rope, q, k, 0, 0), atol=1e-3)


def test_rope_rotates_pairs_by_position_times_frequency():
    """Explicit numbers: pair i = (x[i], x[i + hs/2]) turns by pos * theta^(-2i/hs) radians."""
    hs, theta = 4, 100.0
    rope = RotaryEmbedding(hs, theta)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, hs)
    out = rope(x.expand(1, 1, 3, hs).contiguous()).view(3, hs)
    for pos in range(3):
        a0, a1 = pos * 1.0, pos * theta ** (-2 / hs)  # frequencies 1 and 1/10
        expected = [
            1 * math.cos(a0) - 3 * math.sin(a0),
            2 * math.cos(a1) - 4 * math.sin(a1),
            1 * math.sin(a0) + 3 * math.cos(a0),
            2 * math.sin(a1) + 4 * math.cos(a1),
        ]
        torch.testing.assert_close(out[pos], torch.tensor(expected), rtol=0, atol=1e-6)


def test_rope_offset_continues_the_sequence_and_keeps_norms():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 6, 8)  # (B, nh, T, hs)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, :, 4:], offset=4), full[:, :, 4:])
    torch.testing.assert_close(full.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(full[:, :, 0], x[:, :, 0])  # position 0 is the identity


# ---------------------------------------------------------------- ALiBi
# The paper's slopes (Press et al. 2022, and its reference code), written out: a geometric sequence starting at
# 2^(-8/n) for n a power of two; otherwise the 2^floor(log2 n) sequence, then every other slope of the 2× sequence.
EXPECTED_SLOPES = {
    1: [2**-8],
    2: [2**-4, 2**-8],
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    8: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8],
    6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
    12: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    16: [2 ** (-h / 2) for h in range(1, 17)],
}


@pytest.mark.parametrize("n_heads", list(EXPECTED_SLOPES))
def test_alibi_slopes_match_the_paper(n_heads):
    torch.testing.assert_close(alibi_slopes(n_heads).double(), torch.tensor(EXPECTED_SLOPES[n_heads]).double())


def test_alibi_causal_bias_is_minus_slope_times_distance():
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, 3, 3, causal=True)  # (nh, T, S)
    expected_head0 = torch.tensor([[0.0, 0, 0], [-0.5, 0, 0], [-1.0, -0.5, 0]])
    visible = torch.ones(3, 3, dtype=torch.bool).tril()  # j > i is masked by causality anyway
    torch.testing.assert_close(bias[0][visible], expected_head0[visible])
    torch.testing.assert_close(bias[1][visible], expected_head0[visible] / 2)


@pytest.mark.parametrize("n_heads", [4, 6])
@pytest.mark.parametrize(("q_len", "k_len"), [(5, 5), (1, 6), (2, 7)])
def test_alibi_bias_formula(n_heads, q_len, k_len):
    """-slope_h * (i - j) for causal attention (queries are the last q_len of k_len positions, as with a KV
    cache); the symmetric -slope_h * |i - j| for bidirectional attention."""
    slopes = alibi_slopes(n_heads)
    for causal in (True, False):
        bias = alibi_bias(slopes, q_len, k_len, causal)
        assert bias.shape == (n_heads, q_len, k_len)
        for h in range(n_heads):
            for qi in range(q_len):
                i = k_len - q_len + qi
                for j in range(k_len):
                    if causal and j > i:
                        continue
                    expected = -EXPECTED_SLOPES[n_heads][h] * abs(i - j)
                    assert bias[h, qi, j].item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- absolute tables
def test_sinusoids_are_whispers_table():
    length, dim = 7, 8
    table = sinusoids(length, dim)
    assert table.shape == (length, dim)
    for pos in range(length):
        for i in range(dim // 2):
            rate = 10000 ** (-i / (dim // 2 - 1))
            assert table[pos, i].item() == pytest.approx(math.sin(pos * rate), abs=1e-6)
            assert table[pos, dim // 2 + i].item() == pytest.approx(math.cos(pos * rate), abs=1e-6)


def test_sinusoids_need_an_even_width():
    with pytest.raises(ValueError, match="even"):
        sinusoids(4, 7)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_absolute_positions_add_rows_from_the_offset(kind):
    pos = AbsolutePositions(kind, 10, 8, what="text")
    assert isinstance(pos.weight, torch.nn.Parameter) == (kind == "learned")  # sinusoids are computed, not stored
    x = torch.randn(2, 3, 8)
    full = pos.weight if kind == "learned" else sinusoids(10, 8)
    torch.testing.assert_close(pos(x, offset=4), x + full[4:7])
    pos(torch.zeros(1, 10, 8))  # exactly the table length is fine
    with pytest.raises(ValueError, match=r"text length 11 exceeds the position table \(10 positions\)"):
        pos(torch.zeros(1, 8, 8), offset=3)


# ---------------------------------------------------------------- 2-D patch positions
def test_patch_positions_same_grid_is_identical():
    table = torch.randn(12, 8)
    assert resample_patch_positions(table, (3, 4), (3, 4)) is table


@pytest.mark.parametrize("new_grid", [(6, 8), (2, 2), (3, 5)])
def test_patch_positions_resample_like_timm(new_grid):
    from timm.layers import resample_abs_pos_embed

    table = torch.randn(12, 8)  # a 3×4 grid
    ours = resample_patch_positions(table, (3, 4), new_grid)
    timms = resample_abs_pos_embed(table[None], list(new_grid), [3, 4], num_prefix_tokens=0)[0]
    assert ours.shape == (new_grid[0] * new_grid[1], 8)
    torch.testing.assert_close(ours, timms)
    constant = torch.ones(12, 8) * 0.7  # bicubic keeps a constant table constant
    torch.testing.assert_close(resample_patch_positions(constant, (3, 4), new_grid), 0.7 * torch.ones_like(ours))


def test_image_of_another_size_uses_a_resampled_table(make_model_config):
    model = MultimodalTransformer(make_model_config(audio=None)).eval()
    embed = model.image_embed
    assert embed.cfg.grid == (4, 4)
    torch.testing.assert_close(embed.patch_positions((4, 4)), embed.positions, rtol=0, atol=0)
    bigger = embed.patch_positions((6, 5))
    assert bigger.shape == (1 + 30, 16)
    torch.testing.assert_close(bigger[0], embed.positions[0])  # the class-token position is kept as is
    tokens, mask = embed(torch.randn(2, 3, 24, 20))
    assert tokens.shape == (2, 31, 16) and mask is None
    features = model.encode_image(torch.randn(2, 3, 24, 20))
    assert features.shape == (2, 8) and torch.isfinite(features).all()
    # the configured size goes through the table untouched: tokens = patches + cls + table
    pixels = torch.randn(1, 3, 16, 16)
    patches = embed.patch(pixels).flatten(2).transpose(1, 2)
    expected = torch.cat([embed.cls_token.view(1, 1, -1), patches], dim=1) + embed.positions
    torch.testing.assert_close(embed(pixels)[0], expected)
