"""Feynman–Kac steering with proposal scaling (METHOD.md, "FK steering").

N particles per prompt follow the stochastic sampler. During the first `proposal_fraction` of the steps each particle
draws M proposals from the transition kernel and keeps the one with the highest potential V. Potentials
G = exp(V(z_{t-Δ}) - V(z_t)) accumulate between resampling steps (every `resample_every` steps inside the window),
where particles are resampled multinomially within their prompt's group. The output is, per prompt, one particle:
the best by `final` (a score of clean latents, usually the true reward, as in the FK paper's final selection), or,
with `final=None`, the group's first particle (no selection: what the intermediate potentials alone contribute).
With N = 1 and M = 1 it is exactly the base sampler.

A potential is scored at (z_{t-Δ}, t-Δ), exactly where the next step's CFG velocity is computed, so the two share
passes (`Look`): the Tweedie potential's conditional velocity is that branch of the next step (as in the FK paper,
whose potentials read the step's own x̂0), and the stitched value's head is the first i blocks of the branch it
reads (`guidance.shared_branch`). A plain potential callable shares nothing.

`best_of_n` is the reference: N independent samples per prompt, the best kept by a score (usually the true reward).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.diffusion.flow import tweedie_z0
from stitchvm.models.reward import ClipReward, score_latents
from stitchvm.diffusion.sampling import (Conditioning, cfg_velocity, check_eta, check_prompts, check_steps,
                                         encode_conditioning, initial_latents, sample, sde_step, timesteps)
from stitchvm.guidance.shared_branch import (cfg_velocity_sharing, finish, head_stream, needs_branch, select)
from stitchvm.value.model import StitchedValueModel

Potential = Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]  # (B, C, H, W), (B,), prompts -> (B,)
Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]  # clean latents (B, C, H, W), prompts -> (B,)


class Look(NamedTuple):
    """A potential at (z, t) and what the step's CFG velocity there can reuse of its passes."""
    values: torch.Tensor  # (B,) V(z, t)
    velocity: Callable[[torch.Tensor], torch.Tensor]  # rows (R,) -> (R, C, H, W) the CFG velocity at z[rows]


def rows_of(conditioning: Conditioning, rows: torch.Tensor) -> Conditioning:
    """The conditioning of batch rows `rows` (a particle keeps its prompt through resampling and proposals)."""
    r = rows.cpu()
    return Conditioning([conditioning.prompts[k] for k in r.tolist()],
                        (conditioning.cond[0][r], conditioning.cond[1][r]),
                        (conditioning.uncond[0][r], conditioning.uncond[1][r]), conditioning.scale)


class StitchVMPotential:
    """V(z_t, t, prompt) by the stitched value model; in FK its head shares the i blocks of the step's branch."""

    def __init__(self, value_model: StitchedValueModel):
        self.value_model = value_model

    def __call__(self, z: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.value_model(z, t, prompts)

    def look(self, backbone: Backbone, z: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> Look:
        vm, hw = self.value_model, tuple(z.shape[-2:])
        stream = head_stream(vm, backbone, z, t, conditioning)  # (B, N, D) after block i
        values = vm.value_from_head(stream.h, hw, conditioning.prompts)
        shared = needs_branch(vm, backbone, conditioning.scale)

        def velocity(rows):
            v_shared = finish(backbone, select(stream, rows), len(vm.head.blocks), hw) if shared else None
            return cfg_velocity_sharing(vm, backbone, z[rows], t[rows], rows_of(conditioning, rows), v_shared)
        return Look(values, velocity)


class TweediePotential:
    """r(D(ẑ0)), ẑ0 from the conditional velocity: one more transformer pass, a decode and a reward pass. In FK that
    pass is the conditional branch of the step's CFG velocity (on a guidance-distilled backbone, the step's one pass
    at the sampler's embedded scale), so only the decode and the reward pass are extra."""

    def __init__(self, backbone: Backbone, reward: ClipReward):
        self.backbone, self.reward = backbone, reward

    def __call__(self, z: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeds, pooled = self.backbone.encode_prompts(prompts)
        return score_latents(self.backbone, self.reward, tweedie_z0(z, t, self.backbone.velocity(z, t, embeds, pooled)),
                             prompts)

    def look(self, backbone: Backbone, z: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> Look:
        w, distilled = conditioning.scale, backbone.family.distilled
        v_c = backbone.velocity(z, t, *conditioning.cond, guidance=w if distilled else None)
        values = score_latents(backbone, self.reward, tweedie_z0(z, t, v_c), conditioning.prompts)

        def velocity(rows):
            if distilled or w == 1:
                return v_c[rows]
            v_u = backbone.velocity(z[rows], t[rows], *rows_of(conditioning, rows).uncond)
            return v_u + w * (v_c[rows] - v_u)
        return Look(values, velocity)


def stitchvm_potential(value_model: StitchedValueModel) -> StitchVMPotential:
    return StitchVMPotential(value_model)


def tweedie_potential(backbone: Backbone, reward: ClipReward) -> TweediePotential:
    return TweediePotential(backbone, reward)


def plain_look(potential: Potential, backbone: Backbone, z: torch.Tensor, t: torch.Tensor,
               conditioning: Conditioning) -> Look:
    """A potential that shares nothing: its values, and the CFG velocity computed afresh."""
    def velocity(rows):
        c = rows_of(conditioning, rows)
        return cfg_velocity(backbone, z[rows], t[rows], c.cond, c.uncond, c.scale)
    return Look(potential(z, t, conditioning.prompts), velocity)


def chosen(looks: list[Look], best: torch.Tensor) -> Look:
    """Per row, the look of proposal best[row]: (M,) looks of M proposals, (B,) the chosen proposal of each row."""
    values = torch.stack([look.values for look in looks])[best, torch.arange(len(best), device=best.device)]

    def velocity(rows):
        out = None
        for m, look in enumerate(looks):
            mine = torch.nonzero(best[rows] == m).squeeze(1)
            if len(mine):
                v = look.velocity(rows[mine])
                out = v.new_empty((len(rows), *v.shape[1:])) if out is None else out
                out[mine] = v
        return out
    return Look(values, velocity)


def _check_count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _resample(log_w: torch.Tensor, groups: int, generator) -> torch.Tensor:
    """(B,) rows drawn multinomially within each prompt's group of particles."""
    n = log_w.shape[0] // groups
    probs = torch.softmax(log_w.view(groups, n).double(), dim=1)  # (groups, N)
    pick = torch.multinomial(probs.cpu(), n, replacement=True, generator=generator)  # (groups, N)
    return (pick + torch.arange(groups)[:, None] * n).flatten().to(log_w.device)


@torch.no_grad()
def fk_sample(backbone: Backbone, prompts: list[str], steps: int, guidance_scale: float,
              generator: torch.Generator | None, potential: Potential, particles: int = 4, proposals: int = 2,
              proposal_fraction: float = 0.4, resample_every: int = 4, window: tuple[float, float] = (0.2, 0.8),
              eta: float = 1.0, final: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, h, w) latents, one per prompt, and their `final` scores (None without `final` or when N = 1).

    `potential`: a callable (z, t, prompts) -> (B,); one with a `look` method (`StitchVMPotential`,
    `TweediePotential`) shares its passes with the next step's velocity (module docstring)."""
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
    if hasattr(potential, "look"):
        look = lambda z_, t_: potential.look(backbone, z_, t_, cond)  # noqa: E731
    else:
        look = lambda z_, t_: plain_look(potential, backbone, z_, t_, cond)  # noqa: E731
    every = torch.arange(n, device=z.device)
    ahead = look(z, sigmas[0].expand(n).to(tdtype)) if particles > 1 else None  # the potential at z and its passes
    rows = every  # z[k] is row rows[k] of `ahead`'s batch
    v = None if ahead is None else ahead.values
    log_w = torch.zeros(n, dtype=torch.float64, device=z.device)
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        t, t_next = s.expand(n).to(tdtype), s_next.expand(n).to(tdtype)
        u = ahead.velocity(rows) if ahead is not None else cfg_velocity(backbone, z, t, cond.cond, cond.uncond,
                                                                         cond.scale)
        if proposals > 1 and k < proposal_fraction * steps:
            cands = torch.stack([sde_step(z, u, s, s_next, eta, generator) for _ in range(proposals)])  # (M, n, ...)
            looks = [look(c, t_next) for c in cands]
            best = torch.stack([lk.values for lk in looks]).argmax(0)  # (n,)
            z, ahead = cands[best, every], chosen(looks, best)
        else:
            z = sde_step(z, u, s, s_next, eta, generator)
            # after the last step no weight is used again: the final selection, if any, is by `final`
            ahead = look(z, t_next) if particles > 1 and k + 1 < steps else None
        rows = every
        if particles > 1 and ahead is not None:
            log_w += (ahead.values - v).double()  # log G = V(z_{t-Δ}) - V(z_t)
            v = ahead.values
            in_window = window[0] * steps <= k < window[1] * steps
            if in_window and (k + 1) % resample_every == 0:
                rows = _resample(log_w, len(prompts), generator)
                z, v = z[rows], v[rows]
                log_w.zero_()
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
