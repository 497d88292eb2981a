"""Feynman–Kac steering with proposal scaling (METHOD.md, "FK steering").

N particles per prompt follow the stochastic sampler. During the first `proposal_fraction` of the steps each particle
draws M proposals from the transition kernel and keeps the one with the highest potential V. Potentials
G = exp(V(z_{t-Δ}) - V(z_t)) accumulate between resampling steps (every `resample_every` steps inside the window),
where particles are resampled multinomially within their prompt's group. The output is, per prompt, one particle:
the best by `final` (a score of clean latents, usually the true reward, as in the FK paper's final selection), or,
with `final=None`, the group's first particle (no selection: what the intermediate potentials alone contribute).
With N = 1 and M = 1 it is exactly the base sampler.

`best_of_n` is the reference: N independent samples per prompt, the best kept by a score (usually the true reward).
"""
from __future__ import annotations

from typing import Callable

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.diffusion.flow import tweedie_z0
from stitchvm.models.reward import ClipReward, score_latents
from stitchvm.diffusion.sampling import (cfg_velocity, check_eta, check_prompts, check_steps, encode_conditioning, initial_latents, sample,
                       sde_step, timesteps)
from stitchvm.value.model import StitchedValueModel

Potential = Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]  # (B, C, H, W), (B,), prompts -> (B,)
Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]  # clean latents (B, C, H, W), prompts -> (B,)


def stitchvm_potential(value_model: StitchedValueModel) -> Potential:
    return lambda z, t, prompts: value_model(z, t, prompts)


def tweedie_potential(backbone: Backbone, reward: ClipReward) -> Potential:
    """r(D(ẑ0)) with ẑ0 from the conditional velocity: one more transformer pass, a decode and a reward pass."""
    def potential(z, t, prompts):
        embeds, pooled = backbone.encode_prompts(prompts)
        return score_latents(backbone, reward, tweedie_z0(z, t, backbone.velocity(z, t, embeds, pooled)), prompts)
    return potential


def _check_count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _resample(z: torch.Tensor, log_w: torch.Tensor, v: torch.Tensor, groups: int, generator) -> tuple:
    """Multinomial resampling within each prompt's group of particles."""
    n = log_w.shape[0] // groups
    probs = torch.softmax(log_w.view(groups, n).double(), dim=1)  # (groups, N)
    pick = torch.multinomial(probs.cpu(), n, replacement=True, generator=generator)  # (groups, N)
    idx = (pick + torch.arange(groups)[:, None] * n).flatten().to(z.device)
    return z[idx], v[idx]


@torch.no_grad()
def fk_sample(backbone: Backbone, prompts: list[str], steps: int, guidance_scale: float,
              generator: torch.Generator | None, potential: Potential, particles: int = 4, proposals: int = 2,
              proposal_fraction: float = 0.4, resample_every: int = 4, window: tuple[float, float] = (0.2, 0.8),
              eta: float = 1.0, final: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, h, w) latents, one per prompt, and their `final` scores (None without `final` or when N = 1)."""
    prompts, steps, eta = check_prompts(prompts), check_steps(steps), check_eta(eta)
    particles, proposals = _check_count(particles, "particles"), _check_count(proposals, "proposals (M)")
    resample_every = _check_count(resample_every, "resample_every")
    if not 0.0 <= proposal_fraction <= 1.0 or not 0.0 <= window[0] <= window[1] <= 1.0:
        raise ValueError(f"proposal_fraction and window must lie in [0, 1] (window lo <= hi), got "
                         f"{proposal_fraction} and {window}")
    expanded = [p for p in prompts for _ in range(particles)]
    cond = encode_conditioning(backbone, expanded, guidance_scale)
    n = len(expanded)
    z = initial_latents(backbone, n, generator)
    sigmas = timesteps(backbone, steps, (z.shape[-2] // backbone.patch_size) * (z.shape[-1] // backbone.patch_size))
    sigmas = sigmas.to(z.device)
    tdtype = torch.promote_types(z.dtype, torch.float32)  # σ in float32 for bf16 latents too (as `sample`)
    v = potential(z, sigmas[0].expand(n).to(tdtype), expanded) if particles > 1 else None
    log_w = torch.zeros(n, dtype=torch.float64, device=z.device)
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        t, t_next = s.expand(n).to(tdtype), s_next.expand(n).to(tdtype)
        u = cfg_velocity(backbone, z, t, cond.cond, cond.uncond, cond.scale)
        if proposals > 1 and k < proposal_fraction * steps:
            cands = torch.stack([sde_step(z, u, s, s_next, eta, generator) for _ in range(proposals)])  # (M, n, ...)
            values = torch.stack([potential(c, t_next, expanded) for c in cands])  # (M, n)
            best = values.argmax(0)
            z, v_next = cands[best, torch.arange(n)], values[best, torch.arange(n)]
        else:
            z = sde_step(z, u, s, s_next, eta, generator)
            # after the last step no weight is used again: the final selection, if any, is by `final`
            v_next = potential(z, t_next, expanded) if particles > 1 and k + 1 < steps else None
        if particles > 1 and v_next is not None:
            log_w += (v_next - v).double()  # log G = V(z_{t-Δ}) - V(z_t)
            in_window = window[0] * steps <= k < window[1] * steps
            if in_window and (k + 1) % resample_every == 0:
                z, v_next = _resample(z, log_w, v_next, len(prompts), generator)
                log_w.zero_()
        v = v_next
    first = torch.arange(len(prompts), device=z.device) * particles  # (B,) each group's first particle
    if final is None or particles == 1:
        return z[first], None
    scores = final(z, expanded).float()  # (n,)
    best = scores.view(len(prompts), particles).argmax(1).to(z.device) + first
    return z[best], scores[best]


# ---- best-of-N: the reference ------------------------------------------------------------------------------------


def reward_scorer(backbone: Backbone, reward: ClipReward) -> Scorer:
    """The true reward r(D(z0), prompt) as a best-of-N score (`models.reward.score_latents`)."""
    return lambda z0, prompts: score_latents(backbone, reward, z0, prompts)


@torch.no_grad()
def best_of_n(backbone: Backbone, prompts: list[str], steps: int, guidance_scale: float,
              generator: torch.Generator | None, score: Scorer, n: int = 4, eta: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, the best of `n` independent samples by `score`: ((B, C, h, w) latents, (B,) their scores).

    The reference method: `score` is usually `reward_scorer` (the true reward, an oracle no sampler has). The n
    candidates are n successive `sampling.sample` calls on the one `generator`, so candidate 0 is exactly the
    unguided sample of the same generator state (the best of n never scores below it); ties keep the earliest.
    """
    prompts = check_prompts(prompts)
    n = _check_count(n, "n (best-of-N candidates)")
    best_z, best_s = None, None
    for _ in range(n):
        z = sample(backbone, prompts, steps, guidance_scale, generator, eta=eta)
        s = score(z, prompts).float()
        if best_z is None:
            best_z, best_s = z, s
        else:
            better = s > best_s
            best_z = torch.where(better.view(-1, *([1] * (z.dim() - 1))), z, best_z)
            best_s = torch.where(better, s, best_s)
    return best_z, best_s
