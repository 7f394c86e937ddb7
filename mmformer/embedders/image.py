"""Images → patch tokens: a strided convolution (ViT), an optional class token and 2-D learned positions.

Shape legend: B batch, C channels, H×W pixels, p patch size, gh×gw patch grid, Np = gh*gw patches, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from mmformer.config import ImageConfig, StackConfig
from mmformer.embedders.checks import check_device
from mmformer.io.weights import base_layer
from mmformer.layers.norms import make_norm
from mmformer.layers.positions import resample_patch_positions, sinusoids


def initial_patch_positions(cfg: ImageConfig, width: int) -> torch.Tensor:
    """Initial 2-D learned position table (Np + prefix, D): row and column sin-cos halves (as MAE's fixed table), so
    the patch grid's geometry is visible from the first step; the rows of the class token and the registers start at
    zero. A width not divisible by 4, or under 8 (each half's sin-cos needs 4 or more), falls back to a small random
    table."""
    if width % 4 or width < 8:
        return torch.randn(cfg.n_tokens, width) * 0.02
    gh, gw = cfg.grid
    rows = sinusoids(gh, width // 2)[:, None, :].expand(gh, gw, width // 2)
    cols = sinusoids(gw, width // 2)[None, :, :].expand(gh, gw, width // 2)
    table = torch.cat([rows, cols], dim=-1).reshape(gh * gw, width)  # (Np, D), row-major like the patches
    return torch.cat([torch.zeros(cfg.n_prefix, width), table], dim=0)


class ImageEmbedder(nn.Module):
    """Patchify (B, C, H, W) pixels into (B, prefix + Np, D) tokens: the class token and the registers (the prefix)
    come first. Other image sizes than the configured one work: the patch position table is resampled bicubically
    to the new grid (the prefix rows stay)."""

    def __init__(self, cfg: ImageConfig, stack: StackConfig):
        super().__init__()
        self.cfg = cfg
        width = stack.width
        self.patch = nn.Conv2d(cfg.channels, width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.empty(width)) if cfg.class_token else None
        self.registers = nn.Parameter(torch.empty(cfg.n_registers, width)) if cfg.n_registers else None
        self.positions = nn.Parameter(torch.empty(cfg.n_tokens, width)) if cfg.position == "learned" else None
        self.norm = make_norm(stack.norm, width, stack.norm_eps) if cfg.pre_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial values of the class token and the position table (the patch convolution has its own)."""
        with torch.no_grad():
            if self.cls_token is not None:
                self.cls_token.normal_(0.0, 0.02)
            if self.registers is not None:
                self.registers.normal_(0.0, 1e-6)  # as timm
            if self.positions is not None:
                self.positions.copy_(initial_patch_positions(self.cfg, self.positions.shape[1]))

    def check(self, pixel_values: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values: expected a tensor (B, C, H, W), got {type(pixel_values).__name__}")
        check_device("pixel_values", pixel_values, base_layer(self.patch).weight)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values: expected 4 dims (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != cfg.channels:
            raise ValueError(
                f"pixel_values: expected {cfg.channels} channels, got shape {tuple(pixel_values.shape)} "
                f"({pixel_values.shape[1]} channels)"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values: expected a float tensor (normalised pixels), got {pixel_values.dtype}")
        h, w = pixel_values.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(
                f"pixel_values: expected at least one {cfg.patch_size}×{cfg.patch_size} patch, got {h}×{w}"
            )
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"pixel_values: height and width must be multiples of the patch size {cfg.patch_size}, got {h}×{w}"
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Tokens (B, prefix + Np, D) and no padding mask (every patch is real)."""
        self.check(pixel_values)
        x = self.patch(pixel_values.to(base_layer(self.patch).weight.dtype))  # (B, D, gh, gw)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, Np, D)
        prefix = [t.to(x.dtype).view(-1, x.shape[-1]) for t in (self.cls_token, self.registers) if t is not None]
        if prefix:
            x = torch.cat([torch.cat(prefix).expand(x.shape[0], -1, -1), x], dim=1)  # (B, prefix + Np, D)
        if self.positions is not None:
            x = x + self.patch_positions(tuple(grid)).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return x, None

    def patch_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table (prefix + Np, D) for a patch grid, resampled when it differs from the configured one."""
        n_prefix = self.cfg.n_prefix
        prefix, patches = self.positions[:n_prefix], self.positions[n_prefix:]
        return torch.cat([prefix, resample_patch_positions(patches, self.cfg.grid, grid)], dim=0)
