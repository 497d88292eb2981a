"""Explicit flow-matching samplers on the backbone pipeline's own schedule (diffusers-style loop, no pipeline call).

Time is σ ∈ [0, 1] (`z_σ = (1 - σ) z0 + σ ε`, `v ≈ ε - z0`); the loop walks the scheduler's σ grid from 1 to 0.

Steps:
- Euler (the SD3 pipeline's `FlowMatchEulerDiscreteScheduler.step`): `z' = z + (σ' - σ) · v`.
- Stochastic (`sde_step`, η ∈ [0, 1]): the DDIM-η / ancestral family written for the rectified-flow path
  (α_σ = 1 - σ). With `ẑ0 = z - σ v` and `ε̂ = z + (1 - σ) v`:

      z' = (1 - σ') ẑ0 + sqrt(σ'² - ρ²) ε̂ + ρ ξ,   ξ ~ N(0, I),
      ρ  = η · σ' · sqrt(1 - ((1 - σ) σ' / ((1 - σ') σ))²)

  η = 1 is the ancestral step (the exact posterior q(z_σ' | z_σ, ẑ0) of the forward process), η = 0 is
  deterministic; for every η the step keeps the marginals of the forward process when `v` is exact. Since
  `(1 - σ') ẑ0 + σ' ε̂ = z + (σ' - σ) v`, it is computed as the Euler step plus `(sqrt(σ'² - ρ²) - σ') ε̂ + ρ ξ`;
  at η = 0 it *is* `euler_step` (no noise is drawn, the generator is not advanced).

Classifier-free guidance follows the pipeline: `v = v_u + w (v_c - v_u)`, both branches in one batched
transformer call with the unconditional half first; w = 1 runs the conditional branch only (the pipeline also
skips CFG for w < 1, where this module interpolates; for w >= 1 the loop reproduces the pipeline bit for bit).
A guidance-distilled backbone (FLUX.1-dev) takes w as an input instead: one pass on the prompt, `guidance = w`
(FluxPipeline's `guidance_scale`); its `Conditioning.uncond` is encoded but unused.

A `guidance` callable (see `stitchvm.guidance.dps`) owns the velocity at the steps it guides, so that the
reward/value gradient can share the CFG forward pass instead of adding one:
`guidance(backbone, z, t, conditioning, step) -> Guided(velocity, correction, value)`; the sampler steps with
`velocity + correction` (correction None: unguided step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from stitchvm.models.backbone import Backbone, upcast

Embeds = tuple[torch.Tensor, torch.Tensor]  # (B, L, joint_dim) token states, (B, pooled_dim)


# ---- validation ------------------------------------------------------------------------------------------------
def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def check_scale(scale, what: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number >= 0, got {scale!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {scale!r}")
    return value


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the single string {prompts!r} (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (one sample is drawn per prompt)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[0]!r}")
    return prompts


def check_eta(eta) -> float:
    eta = check_scale(eta, "eta (the stochastic sampler's noise level)")
    if eta > 1:
        raise ValueError(f"eta must lie in [0, 1] (1 = ancestral step), got {eta}")
    return eta


# ---- schedule and steps ----------------------------------------------------------------------------------------
def timesteps(backbone: Backbone, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """(steps + 1,) σ grid from 1 towards 0 (last entry 0), exactly as the pipeline's scheduler sets it.

    Uses a fresh copy of `backbone.scheduler` (its shift, and `mu` from `image_seq_len` when the scheduler uses
    dynamic shifting, as the SD3 pipeline computes it), so the shared scheduler's state is never touched.
    """
    check_steps(steps)
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    kwargs = {}
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("the scheduler uses dynamic shifting: pass image_seq_len (latent tokens per image)")
        kwargs["mu"] = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.16))
    kwargs.update(backbone.family.schedule_kwargs(steps))  # FLUX's pipeline passes its own unshifted σ grid
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return scheduler.sigmas.clone()


def euler_step(z: torch.Tensor, v: torch.Tensor, s, s_next) -> torch.Tensor:
    """z_{σ'} = z_σ + (σ' - σ) v (the pipeline's FlowMatchEulerDiscreteScheduler.step, same float ops)."""
    return z + (s_next - s) * v


def sde_step(z: torch.Tensor, v: torch.Tensor, s, s_next, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The stochastic DDIM-η step of the module docstring; η = 0 returns `euler_step(z, v, s, s_next)`.
    Computed in float32 at least and returned in z's dtype, as diffusers' FlowMatchEulerDiscreteScheduler.step (a
    bf16 step would round the update (σ' - σ) v against z)."""
    eta = check_eta(eta)
    dtype, z, v = z.dtype, upcast(z), upcast(v)
    out = euler_step(z, v, s, s_next)
    s, s_next = float(s), float(s_next)
    if eta == 0 or s_next <= 0:
        return out.to(dtype)
    ratio = (1 - s) * s_next / ((1 - s_next) * s)
    rho = eta * s_next * math.sqrt(max(0.0, 1 - ratio * ratio))
    if rho == 0:
        return out.to(dtype)
    eps_hat = z + (1 - s) * v
    noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return (out + (math.sqrt(max(0.0, s_next * s_next - rho * rho)) - s_next) * eps_hat + rho * noise).to(dtype)


# ---- classifier-free guidance ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conditioning:
    """The prompts of a batch with their conditional and unconditional (empty-prompt) embeddings and CFG scale."""
    prompts: list[str]
    cond: Embeds
    uncond: Embeds
    scale: float

    @property
    def batch(self) -> int:
        return len(self.prompts)


def encode_conditioning(backbone: Backbone, prompts: list[str], guidance_scale: float) -> Conditioning:
    prompts = check_prompts(prompts)
    scale = check_scale(guidance_scale, "guidance_scale (classifier-free guidance)")
    # the empty prompt encoded once per sample, as the pipeline does (batched text encoders differ in the last bit)
    return Conditioning(prompts, backbone.encode_prompts(prompts), backbone.encode_prompts([""] * len(prompts)), scale)


def cfg_velocity(backbone: Backbone, z: torch.Tensor, t: torch.Tensor, cond: Embeds, uncond: Embeds,
                 scale: float) -> torch.Tensor:
    """v_u + scale · (v_c - v_u), both branches in one batched transformer call (scale 1: conditional only).

    Differentiable when the caller enables grad (DPS-Tweedie); t is (B,) σ in [0, 1].
    """
    scale = check_scale(scale, "guidance_scale (classifier-free guidance)")
    if backbone.family.distilled:  # FLUX.1-dev: the scale is an input of the one pass (no unconditional branch)
        return backbone.velocity(z, t, *cond, guidance=scale)
    if scale == 1:
        return backbone.velocity(z, t, *cond)
    v = backbone.velocity(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond[0], cond[0]]),
                          torch.cat([uncond[1], cond[1]]))
    v_u, v_c = v.chunk(2)
    return v_u + scale * (v_c - v_u)


# ---- guidance protocol and the loop ----------------------------------------------------------------------------
class Guided(NamedTuple):
    velocity: torch.Tensor  # (B, C, H, W) the CFG velocity, detached
    correction: torch.Tensor | None  # Δv added to the velocity (None: this step is not guided)
    value: torch.Tensor | None  # (B,) the guided objective at z_t, when it was computed


class Guidance(Protocol):
    def __call__(self, backbone: Backbone, z: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                 step: int) -> Guided: ...


def initial_latents(backbone: Backbone, n: int, generator: torch.Generator | list[torch.Generator] | None,
                    size: int | None = None) -> torch.Tensor:
    """(n, C, h, w) standard normal noise drawn as the pipeline's `prepare_latents` draws it."""
    size = size or backbone.image_size // backbone.vae_scale
    return randn_tensor((n, backbone.latent_channels, size, size), generator=generator, device=backbone.device,
                        dtype=backbone.transformer.dtype)


@torch.no_grad()
def sample(backbone: Backbone, prompts: list[str], steps: int, guidance_scale: float,
           generator: torch.Generator | list[torch.Generator] | None, guidance: Guidance | None = None,
           eta: float = 0.0, *,
           latents: torch.Tensor | None = None, start: float = 1.0) -> torch.Tensor:
    """Sample (B, C, h, w) clean latents, one per prompt: explicit CFG loop on the pipeline's σ grid.

    `generator` draws the initial noise (unless `latents` is given) and the stochastic steps' noise (η > 0); a list
    of generators, one per sample, draws each sample's noise from its own (as the pipeline does), so a sample does
    not depend on its batch.
    `guidance` (optional) returns the velocity and a correction at each step; η = 0 gives Euler steps.
    `start` < 1 continues `latents`, noisy at σ = start, on the grid's steps below it (a rollout from z_t).
    """
    steps = check_steps(steps)
    eta = check_eta(eta)
    if not 0 < start <= 1:
        raise ValueError(f"start must lie in (0, 1], got {start}")
    if start < 1 and latents is None:
        raise ValueError(f"start={start} continues given latents: pass the noisy latents at σ = start")
    conditioning = encode_conditioning(backbone, prompts, guidance_scale)
    n = conditioning.batch
    if latents is None:
        z = initial_latents(backbone, n, generator)
    else:
        if latents.shape[0] != n:
            raise ValueError(f"latents hold {latents.shape[0]} samples for {n} prompts")
        z = latents.to(backbone.device, backbone.transformer.dtype)
    sigmas = timesteps(backbone, steps, (z.shape[-2] // backbone.patch_size) * (z.shape[-1] // backbone.patch_size))
    if start < 1:
        sigmas = torch.cat([sigmas.new_tensor([start]), sigmas[sigmas < start]])  # (k + 1,): start, then the tail
    sigmas = sigmas.to(z.device)
    for k in range(len(sigmas) - 1):
        s, s_next = sigmas[k], sigmas[k + 1]
        t = s.expand(n).to(torch.promote_types(z.dtype, torch.float32))  # (n,) σ: float32 for bf16 latents too
        if guidance is None:
            u = cfg_velocity(backbone, z, t, conditioning.cond, conditioning.uncond, conditioning.scale)
        else:
            out = guidance(backbone, z, t, conditioning, k)
            u = out.velocity if out.correction is None else out.velocity + out.correction
        z = sde_step(z, u, s, s_next, eta, generator)
    return z
