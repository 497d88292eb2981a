"""The stitching layer s(h) = U(F(h)) + G(U(F(h))) of METHOD.md.

F: 1×1 conv (backbone width → reward width), initialised from the stage-1 least-squares fit.
U: bilinear resampling from the backbone token grid to the reward patch grid (area averaging where the token grid is
   at least twice as fine on both axes, e.g. SD3.5 at 1024²: 64×64 tokens onto CLIP's 16×16 patches; bilinear would
   read 2 of every 4 tokens per axis and alias). Where the reward grid is `factor` (≥ 2)
   times finer than the backbone's (the embedded world: 4×4 tokens, 8×8 CLIP patches), bilinear upsampling would give
   the factor² reward patches under one backbone token interpolations of the same features. `factor` > 1 makes U
   sub-pixel instead: F predicts all factor² patches of its token (width factor²·reward width, each sub-position
   fitted by least squares in stage 1) and a pixel shuffle lays them out; bilinear resampling then covers any
   remaining mismatch (another latent size).
G: residual bottleneck MLP (1×1 conv → SiLU → 1×1 conv → SiLU) whose last conv starts at zero, so s = U∘F at init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) row-major tokens -> (B, D, h, w) feature map."""
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}×{grid[1]} grid")
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def map_to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h·w, D) row-major tokens (the order of both SD3's and CLIP's patch embeddings)."""
    return fmap.flatten(2).transpose(1, 2)


def resample(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """U: resampling of a (B, D, h, w) map to `grid` (identity when the grids agree). Bilinear, except where `grid`
    is at most half the map on both axes: there bilinear skips tokens (aliasing), so U averages each patch's tokens
    (area, i.e. adaptive average pooling: exact box averages for integer factors)."""
    if tuple(fmap.shape[-2:]) == tuple(grid):
        return fmap
    if all(2 * g <= n for g, n in zip(grid, fmap.shape[-2:])):
        return F.interpolate(fmap, size=grid, mode="area")
    return F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)


class StitchingLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, out_grid: tuple[int, int], bottleneck: int = 8, factor: int = 1):
        super().__init__()
        if factor < 1:
            raise ValueError(f"the sub-pixel factor must be >= 1, got {factor}")
        self.out_grid, self.factor = tuple(out_grid), factor
        hidden = max(out_dim // bottleneck, 1)
        self.proj = nn.Conv2d(in_dim, out_dim * factor * factor, 1)  # F (factor² sub-positions, pixel-shuffle order)
        self.residual = nn.Sequential(  # G
            nn.Conv2d(out_dim, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, out_dim, 1), nn.SiLU()
        )
        nn.init.zeros_(self.residual[2].weight)
        nn.init.zeros_(self.residual[2].bias)

    @torch.no_grad()
    def init_projection(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set F from a least-squares fit: `weight` (in_dim, out) and `bias` (out,) with y = x @ W + b, where
        out = factor² · reward width in `F.pixel_unshuffle` channel order (the reward width when factor = 1)."""
        expected = (self.proj.in_channels, self.proj.out_channels)
        if tuple(weight.shape) != expected:
            raise ValueError(f"least-squares weight has shape {tuple(weight.shape)}, the stitch needs {expected}")
        self.proj.weight.copy_(weight.T[:, :, None, None])
        self.proj.bias.copy_(bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, Din) backbone tokens on `grid` -> (B, P, Dout) reward patch tokens on `out_grid`, in the layer's
        (master) dtype: bf16 backbone tokens come in, float32 tokens go out (autocast, if on, picks the convs' dtype)."""
        dtype = self.proj.weight.dtype
        x = self.proj(tokens_to_map(tokens.to(dtype), grid))  # (B, factor²·Dout, h, w)
        if self.factor > 1:
            x = F.pixel_shuffle(x, self.factor)  # (B, Dout, factor·h, factor·w)
        x = resample(x, self.out_grid)  # (B, Dout, h', w')
        return map_to_tokens(x + self.residual(x)).to(dtype)  # (B, P, Dout)
