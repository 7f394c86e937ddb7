"""Position schemes: absolute (learned, sinusoidal, 2-D learned patch grids) added to tokens, and relative
(RoPE on queries/keys; ALiBi and T5's bucketed learned bias as attention biases) applied inside attention.

Positions are ``offset … offset+T-1`` for every row, or per-row position ids (B, T) where rows differ: left-padded
prompts (:func:`positions_from_mask`: each row's first real token is position 0, as Hugging Face ``generate``
numbers them) and packed documents (positions restarting per document).

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
    positions = torch.arange(offset, offset + length, dtype=torch.float64, device=device)
    return sinusoids_at(positions, dim, max_timescale)


def sinusoids_at(positions: torch.Tensor, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """The sinusoidal rows (..., dim) of any integer positions (...), computed in float64, returned as float32."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    increment = math.log(max_timescale) / (dim // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(dim // 2, dtype=torch.float64, device=positions.device))
    scaled = positions.to(torch.float64)[..., None] * inv_timescales
    return torch.cat([scaled.sin(), scaled.cos()], dim=-1).float()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) of a padding mask (B, T), True = real: each row counts its real tokens from 0, so a
    left-padded row numbers its tokens as it would alone (padding gets 0, or the last real position after it)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
        """Add positions offset … offset+T-1 to x (B, T, D), or the positions ``positions`` (B, T): each row's own
        (a packed batch's positions within each document, a left-padded prompt's from its first real token)."""
        if positions is not None and torch.compiler.is_compiling():
            # no host read inside a graph (a compiled decoding step): the rows of these positions, the same values;
            # the positions were bounded where they were made (a cache no longer than the table)
            rows = self.weight[positions] if self.weight is not None else sinusoids_at(positions, self.dim)
            return x + rows.to(x.dtype)
        if positions is not None:
            longest = int(positions.max()) + 1
            if longest > self.length:
                raise ValueError(
                    f"{self.what}: position {longest - 1} (a document or prompt of {longest} tokens) exceeds the "
                    f"position table ({self.length} positions)"
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
    frequencies are derived from the config and computed where they are used (no stored state).

    ``scaling`` is Hugging Face's ``rope_scaling`` dict: ``linear`` divides every frequency by ``factor``; ``llama3``
    (Llama 3.1) divides the low frequencies by ``factor``, keeps the high ones and interpolates in between.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(hs/2,) rotation frequencies ``theta^(-2i/hs)``, scaled as configured, computed in float64."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        inv_freq = 1.0 / self.theta**exponents
        if self.scaling is not None:
            inv_freq = scale_rope_frequencies(inv_freq, self.scaling)
        return inv_freq.float()

    def forward(self, x: torch.Tensor, offset: int = 0, *, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x (B, nh, T, hs) by the angles of positions offset … offset+T-1, or of ``positions``: (T,) shared
        by every row (a packed batch's positions within each document), or (B, T) per row (left-padded prompts)."""
        if positions is None:
            t = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
            angles = torch.outer(t, self.inv_freq(x.device))  # (T, hs/2)
        elif positions.ndim == 1:
            angles = torch.outer(positions.to(device=x.device, dtype=torch.float32), self.inv_freq(x.device))
        else:
            angles = positions[:, None, :, None].float() * self.inv_freq(x.device)  # (B, 1, T, hs/2)
        cos = torch.cat([angles.cos()] * 2, dim=-1).to(x.dtype)  # (T, hs) or (B, 1, T, hs)
        sin = torch.cat([angles.sin()] * 2, dim=-1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def scale_rope_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequencies (hs/2,) under a ``rope_scaling`` dict (Hugging Face's keys; see :class:`RotaryEmbedding`)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling: rope_type must be 'linear' or 'llama3', got {kind!r}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, scaled)


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


def t5_buckets(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket (same shape, long) of each relative position ``key - query``.

    Distances below ``n_buckets / 2`` (a quarter when bidirectional: half the buckets serve each direction) get
    a bucket each; longer ones share logarithmically wider buckets up to ``max_distance``, beyond which all share the
    last. Causal (``bidirectional=False``) attention only sees keys at or before the query, whose distance counts.
    The logarithm is taken in float32, as Mesh TensorFlow and Hugging Face take it.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (bucket, head), added to the attention scores.

    One module serves a whole stack (T5 computes it in the first layer and shares it with the others); it is
    bidirectional in an encoder and causal in a decoder, decided per call.
    """

    def __init__(self, n_heads: int, n_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.n_buckets, self.max_distance = n_buckets, max_distance
        self.weight = nn.Parameter(torch.empty(n_buckets, n_heads))  # T5's relative_attention_bias.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)

    def forward(self, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
        """Bias (nh, T, S) of T = ``q_len`` queries, the last of S = ``k_len`` positions (a KV cache puts them at
        the end), over the S keys."""
        device = self.weight.device
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = t5_buckets(k_pos - q_pos, not causal, self.n_buckets, self.max_distance)  # (T, S)
        return self.weight[buckets].permute(2, 0, 1)  # (nh, T, S)
