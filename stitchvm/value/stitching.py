"""The stitching layer s(h) = U(F(h)) + G(U(F(h))) of METHOD.md.

F: k×k conv on the backbone token grid (backbone width → reward width; k = `kernel`, METHOD.md's 1×1 by default),
   initialised from the stage-1 least-squares fit. A token's own features do not fix the reward patches above it (the
   VAE decoder spreads each latent pixel over its neighbours' pixels): on the embedded world a 3×3 neighbourhood
   leaves 10% of the patch tokens' variance unexplained where the token alone leaves 49% (docs/results.md).
U: bilinear resampling from the backbone token grid to the reward patch grid (area averaging where the token grid is
   at least twice as fine on both axes, e.g. SD3.5 at 1024²: 64×64 tokens onto CLIP's 16×16 patches; bilinear would
   read 2 of every 4 tokens per axis and alias). Where the reward grid is `factor` (≥ 2)
   times finer than the backbone's (the embedded world: 4×4 tokens, 8×8 CLIP patches), bilinear upsampling would give
   the factor² reward patches under one backbone token interpolations of the same features. `factor` > 1 makes U
   sub-pixel instead: F predicts all factor² patches of its token (width factor²·reward width, each sub-position
   fitted by least squares in stage 1) and a pixel shuffle lays them out; bilinear resampling then covers any
   remaining mismatch (another latent size).
G: residual MLP of convs on the reward grid (conv → SiLU → conv → SiLU) whose last conv starts at zero, so s = U∘F at
   init. METHOD.md's G is a 1:8 bottleneck of 1×1 convs (`residual_width` None, `residual_kernel` 1); fitted to the
   teacher's tokens (token_fit.py), a wider 3×3 G reproduces them better (docs/results.md).
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


def check_kernel(kernel: int) -> int:
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the stitch's kernel must be an odd integer >= 1 (a centred neighbourhood), got {kernel!r}")
    return kernel


def neighbourhoods(fmap: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, D, h, w) -> (B, D·k², h, w): each position's k×k neighbourhood (zero padded at the borders), channel
    d·k² + (row · k + col) as a k×k conv's weight flattens, so that a linear map of these is that conv."""
    if kernel == 1:
        return fmap
    b, d, h, w = fmap.shape
    return F.unfold(fmap, kernel, padding=kernel // 2).view(b, d * kernel * kernel, h, w)


class StitchingLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, out_grid: tuple[int, int], factor: int = 1, kernel: int = 1,
                 residual_width: int | None = None, residual_kernel: int = 1):
        """`residual_width`: G's hidden width (None: METHOD.md's out_dim / 8); `residual_kernel`: its convs' size."""
        super().__init__()
        if factor < 1:
            raise ValueError(f"the sub-pixel factor must be >= 1, got {factor}")
        check_kernel(kernel)
        check_kernel(residual_kernel)
        if residual_width is not None and residual_width < 1:
            raise ValueError(f"the stitch's residual width must be >= 1, got {residual_width}")
        self.out_grid, self.factor = tuple(out_grid), factor
        hidden = residual_width or max(out_dim // 8, 1)
        # F (factor² sub-positions, pixel-shuffle order); zero padding, as `neighbourhoods` fits it
        self.proj = nn.Conv2d(in_dim, out_dim * factor * factor, kernel, padding=kernel // 2)
        pad = residual_kernel // 2
        self.residual = nn.Sequential(  # G
            nn.Conv2d(out_dim, hidden, residual_kernel, padding=pad), nn.SiLU(),
            nn.Conv2d(hidden, out_dim, residual_kernel, padding=pad), nn.SiLU()
        )
        nn.init.zeros_(self.residual[2].weight)
        nn.init.zeros_(self.residual[2].bias)

    @property
    def kernel(self) -> int:
        """F's kernel size k (1: METHOD.md's 1×1 conv)."""
        return self.proj.kernel_size[0]

    @property
    def residual_width(self) -> int:
        """G's hidden width."""
        return self.residual[0].out_channels

    @property
    def residual_kernel(self) -> int:
        """G's conv size (1: METHOD.md's 1×1 convs)."""
        return self.residual[0].kernel_size[0]

    @torch.no_grad()
    def init_projection(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set F from a least-squares fit: `weight` (in_dim · k², out) and `bias` (out,) with y = x @ W + b, x a
        token's k×k neighbourhood in `neighbourhoods` order and out = factor² · reward width in `F.pixel_unshuffle`
        channel order (the reward width when factor = 1)."""
        k = self.kernel
        expected = (self.proj.in_channels * k * k, self.proj.out_channels)
        if tuple(weight.shape) != expected:
            raise ValueError(f"least-squares weight has shape {tuple(weight.shape)}, the stitch needs {expected} "
                             f"(its F is {k}×{k})")
        self.proj.weight.copy_(weight.T.reshape(self.proj.weight.shape))
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
