"""Rectified-flow quantities: z_t = (1 - t) z0 + t ε, v ≈ ε - z0, Tweedie ẑ0 = z_t - t v."""
from __future__ import annotations

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def forward_noise(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B,), (B, C, H, W) -> z_t."""
    tb = _bcast(t, z0)
    return (1 - tb) * z0 + tb * noise


def tweedie_z0(z_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return z_t - _bcast(t, z_t) * velocity


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) times t = sigmoid(N(mean, std²)): centre-biased on (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
