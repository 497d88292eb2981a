"""Smooth random latent fields: the clean latents of the tiny testbed.

Random-weight tiny models are a degenerate world: a random VAE scrambles pixels, so VAE-encoded images carry little
that a random backbone's early blocks can linearly read. Low-frequency latents (a coarse Gaussian grid, upsampled
bilinearly) give decoded images whose teacher scores vary strongly between samples and are predictable from z_t,
which is what a test of learning needs. Real runs use VAE-encoded images or backbone samples instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_latents(n: int, channels: int, size: int, generator: torch.Generator, coarse: int = 2,
                   scale: float = 1.5) -> torch.Tensor:
    """(n, channels, size, size) latents: a (coarse × coarse) Gaussian grid per channel, bilinearly upsampled."""
    grid = torch.randn(n, channels, coarse, coarse, generator=generator)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False) * scale


def round_robin_prompts(n_prompts: int, per_prompt: int) -> torch.Tensor:
    """(n_prompts · per_prompt,) prompt ids 0, 1, …, K-1, 0, 1, … (each latent gets one prompt)."""
    return torch.arange(n_prompts * per_prompt) % n_prompts
