"""Pretraining the world's VAE: a small `diffusers.AutoencoderKL` from 32×32 RGB scenes to 8×8×4 latents.

The class and folder layout are those of the SD3 VAE (no quant convs, `scaling_factor` / `shift_factor` in the
config), so the world backbone loads it with `AutoencoderKL.from_pretrained(..., subfolder="vae")` and
`stitchvm.models.backbone.Backbone.encode/decode` apply the usual `z = (E(x) - shift) · scale` convention.

Loss: pixel MSE of the decoded posterior *sample* (so the decoder is robust to small latent errors, which a flow model
makes) plus a small KL to N(0, I) per latent element (keeps the latent scale bounded and smooth). After training the
shift and scale are set from the posterior means of a fixed batch of scenes (`STATS_SEED`), so that scaled latents
have zero mean and unit standard deviation, which is what the flow model's noise schedule assumes.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from diffusers import AutoencoderKL
from stitchvm.progress import tqdm

from stitchvm.world import scenes
from stitchvm.lr_schedule import warmup_cosine

HELD_OUT_SEED = 2_000_011  # held-out scenes for PSNR; train with another generator
STATS_SEED = 2_000_017  # the fixed batch that sets scaling_factor / shift_factor
N_STATS = 1024

# (16, 32, 64): 0.25 s per batch-64 step on one core, 33 dB PSNR after 1500 steps; (32, 64, 64) costs 2.7× per step
WORLD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=16, sample_size=scenes.IMAGE_SIZE, use_quant_conv=False,
    use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
)


def world_vae_config(**overrides) -> dict:
    """`AutoencoderKL` keyword arguments of the world VAE (`WORLD_VAE`, updated by `overrides`)."""
    return dict(WORLD_VAE, **overrides)


def psnr(reconstruction: torch.Tensor, pixels: torch.Tensor) -> float:
    """PSNR in dB of [-1, 1] images (peak-to-peak range 2)."""
    mse = (reconstruction.float() - pixels.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W): decode of the posterior mean (the deterministic round trip)."""
    return vae.decode(vae.encode(pixels).latent_dist.mean).sample


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKL, n: int = N_STATS, seed: int = STATS_SEED) -> tuple[float, float]:
    """Set `shift_factor` (mean) and `scaling_factor` (1 / std) from the posterior means of `n` fixed scenes."""
    pixels = scenes.make_scenes(n, torch.Generator().manual_seed(seed))[0].to(vae.device, vae.dtype)
    means = torch.cat([vae.encode(pixels[k:k + 256]).latent_dist.mean for k in range(0, n, 256)]).float()
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def train_vae(n_steps: int, batch_size: int, generator: torch.Generator, progress: bool = True, *,
              lr: float = 2e-3, kl_weight: float = 1e-5, weight_decay: float = 0.0, warmup: int | None = None,
              config: dict | None = None, eval_every: int = 0, n_eval: int = 256, seed: int = 0,
              on_step: Callable[[dict], None] | None = None) -> tuple[AutoencoderKL, list[dict]]:
    """Train the world VAE from scratch on `n_steps` fresh batches of `batch_size` scenes drawn from `generator`.

    Loss = MSE(decode(z), x) + `kl_weight` · KL(q(z|x) ‖ N(0, I)) per latent element, z a posterior sample (drawn
    from `generator`). AdamW, linear warm-up (default 5% of the steps) then cosine decay to 5% of `lr`, gradient
    norm clipped at 1. `seed` seeds the initial weights. History: per-step dicts (step, loss, mse, kl, lr, seconds),
    plus `psnr` (dB, posterior-mean round trip on `n_eval` held-out scenes) every `eval_every` steps and at the end;
    `on_step(entry)` is called with each. At the end the latent shift/scale are set (`set_latent_statistics`).
    Returns `(vae, history)` with the VAE in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**(config or world_vae_config()))
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    warmup = max(1, round(0.05 * n_steps)) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, warmup))
    held_out = scenes.make_scenes(n_eval, torch.Generator().manual_seed(HELD_OUT_SEED))[0] if eval_every else None
    history, shown, start = [], {}, time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc="world vae", unit="step")
    for step in bar:
        pixels = scenes.make_scenes(batch_size, generator)[0]  # (B, 3, 32, 32)
        posterior = vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)  # (B, 4, 8, 8)
        mse = (vae.decode(z).sample - pixels).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        entry = dict(step=step + 1, loss=loss.item(), mse=mse.item(), kl=kl.item(), lr=opt.param_groups[0]["lr"],
                     seconds=time.perf_counter() - start)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
            vae.eval()
            entry["psnr"] = psnr(reconstruct(vae, held_out), held_out)
            vae.train()
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        shown = {"psnr": entry["psnr"]} if "psnr" in entry else shown
        bar.set_postfix(mse=f"{entry['mse']:.4f}", kl=f"{entry['kl']:.2f}", **{k: f"{v:.1f}" for k, v in shown.items()})
    vae.eval().requires_grad_(False)
    set_latent_statistics(vae)
    return vae, history
