"""Position schemes: absolute (learned, sinusoidal, 2-D learned patch grids) added to tokens, and relative
(RoPE on queries/keys, ALiBi as an attention bias) applied inside attention.

Shape legend: B batch, T tokens, D width, nh heads, hs head size, S key length, gh×gw patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoids(length: int, dim: int, max_timescale: float = 10000.0, *, offset: int = 0, device=None) -> torch.Tensor:
    """Sinusoidal table (length, dim) for positions offset … offset+length-1: [sin | cos] halves with geometric
    timescales, as in Whisper's encoder (computed in float64, returned as float32)."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    increment = math.log(max_timescale) / (dim // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(dim // 2, dtype=torch.float64, device=device))
    positions = torch.arange(offset, offset + length, dtype=torch.float64, device=device)
    scaled = positions[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).float()


class AbsolutePositions(nn.Module):
    """Positions added to the tokens: a learned table (trainable), or sinusoids computed for the positions in use
    (derived from the config, so never stored, loaded or allocated beyond the tokens at hand)."""

    def __init__(self, kind: str, length: int, dim: int, *, what: str = "sequence"):
        super().__init__()
        if kind not in ("learned", "sinusoidal"):
            raise ValueError(f"position must be 'learned' or 'sinusoidal', got {kind!r}")
        self.kind, self.length, self.dim, self.what = kind, length, dim, what
        self.weight = nn.Parameter(torch.empty(length, dim)) if kind == "learned" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            with torch.no_grad():
                self.weight.normal_(0.0, 0.02)

    def table(self, offset: int, length: int, device: torch.device) -> torch.Tensor:
        """Positions offset … offset+length-1 as a (length, D) table."""
        if self.weight is not None:
            return self.weight[offset : offset + length]
        return sinusoids(length, self.dim, offset=offset, device=device)

    def forward(self, x: torch.Tensor, offset: int = 0, *, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Add positions offset … offset+T-1 to x (B, T, D), or the positions ``positions`` (B, T) (a packed
        batch's positions within each document; ``Documents.max_length`` bounds them)."""
        if positions is not None:
            longest = int(positions.max()) + 1
            if longest > self.length:
                raise ValueError(
                    f"{self.what}: a document of {longest} tokens exceeds the position table ({self.length} positions)"
                )
            return x + self.table(0, longest, x.device).to(x.dtype)[positions]
        end = offset + x.shape[1]
        if end > self.length:
            raise ValueError(
                f"{self.what} length {end} exceeds the position table ({self.length} positions); "
                f"truncate the input or build the model with a longer {self.what} length"
            )
        return x + self.table(offset, x.shape[1], x.device).to(x.dtype)


def resample_patch_positions(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a 2-D learned patch table (gh*gw, D) to another grid, as timm and open_clip do."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim).to(pos.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half form, as GPT-NeoX and LLaMA) on queries and keys; offset continues a KV cache. Its
    frequencies are derived from the config and computed where they are used (no stored state)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(hs/2,) rotation frequencies ``theta^(-2i/hs)``, computed in float64."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return (1.0 / self.theta**exponents).float()

    def forward(self, x: torch.Tensor, offset: int = 0, *, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x (B, nh, T, hs) by the angles of positions offset … offset+T-1, or of ``positions`` (T,) (a packed
        batch's positions within each document)."""
        if positions is not None:
            t = positions.to(device=x.device, dtype=torch.float32)
        else:
            t = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq(x.device))  # (T, hs/2)
        cos = angles.cos().repeat(1, 2).to(x.dtype)  # (T, hs)
        sin = angles.sin().repeat(1, 2).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(n_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): 2^(-8i/n) for n a power of two, else interleaved extras."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads), device=device)
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra, device=device)


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
    """ALiBi bias (nh, T, S): -slope * distance between a query and a key.

    Queries are the last ``q_len`` of ``k_len`` positions (a KV cache puts them at the end). Causal attention uses
    the paper's ``-slope * (i - j)`` for j ≤ i; bidirectional attention uses the symmetric ``-slope * |i - j|``.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=slopes.device)[:, None]
    k_pos = torch.arange(k_len, device=slopes.device)[None, :]
    distance = (q_pos - k_pos).abs() if not causal else (q_pos - k_pos).clamp(min=0)
    return -slopes[:, None, None] * distance.to(slopes.dtype)
