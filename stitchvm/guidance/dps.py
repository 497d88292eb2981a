"""DPS guidance for `stitchvm.diffusion.sampling.sample`: the tilted velocity u = v - c_t ∇_{z_t} V(z_t) (METHOD.md).

The Euler step `z' = z + (σ' - σ) u` with σ' < σ moves z by `(σ - σ') c_t ∇V`: it climbs V.

- `dps_tweedie`: V = r(D(ẑ0(z_t))), ẑ0 = z_t - σ v_cfg(z_t). One batched CFG forward with autograd; its
  (detached) output is also the velocity of the step, so guidance costs one backward through reward, VAE decoder
  and both CFG branches, and no extra forward.
- `dps_stitchvm`: V = the stitched value model. Its input u_{≤i}(z_t, t, ∅) is the first i blocks of the
  *unconditional* CFG branch, so these blocks run once, with autograd; the tokens feed the stitch + reward tail
  (value, backward through i blocks only) and, detached, the remaining blocks of the unconditional branch
  (no autograd). The conditional branch runs as usual under no_grad. A head on the prompt branch
  (`context="prompt"`) shares the conditional branch instead, with the sampler's own prompt embeddings.
  A guidance-distilled backbone (FLUX.1-dev) has no CFG pair: the step is one pass on the prompt with the scale
  embedded, so the head that shares it is a prompt head at the sampler's scale (the i blocks run with autograd inside
  that pass, nothing extra); an empty-prompt head there costs i extra blocks (it reads a branch nobody else runs).
  The sharing itself lives in `guidance.shared_branch` (FK steering shares the same way).

Guidance scale per step: c_t = scale · schedule(σ) (schedule None: constant). Where c_t = 0 the step is not
guided at all: it is exactly the unguided CFG step and costs nothing extra.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.diffusion.flow import tweedie_z0
from stitchvm.models.reward import ClipReward, score_latents
from stitchvm.diffusion.sampling import Conditioning, Guided, cfg_velocity, check_scale
from stitchvm.guidance.shared_branch import cfg_velocity_sharing, finish, head_stream, needs_branch
from stitchvm.value.model import StitchedValueModel

ScaleSchedule = Callable[[float], float]


# ---- schedules -------------------------------------------------------------------------------------------------
def window(lo: float = 0.0, hi: float = 1.0) -> ScaleSchedule:
    """1 for σ in [lo, hi], else 0 (guide only part of the trajectory)."""
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"window needs 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    return lambda s: 1.0 if lo <= s <= hi else 0.0


def power(p: float) -> ScaleSchedule:
    """σ^p (p > 0 guides hardest at high noise, p < 0 at low noise; p = 0 constant)."""
    return lambda s: float(s) ** p if s > 0 else (1.0 if p == 0 else 0.0)


def _coefficient(scale: float, schedule: ScaleSchedule | None, t: torch.Tensor) -> float:
    s = float(t.reshape(-1)[0])
    factor = 1.0 if schedule is None else schedule(s)
    factor = check_scale(factor, f"the guidance schedule's value at t={s:.4g}")
    return scale * factor


class ValueGrad(NamedTuple):
    velocity: torch.Tensor  # (B, C, H, W) CFG velocity at z_t (detached)
    value: torch.Tensor  # (B,) the objective V(z_t) (detached)
    grad: torch.Tensor  # (B, C, H, W) ∇_{z_t} Σ_b V_b (each sample's gradient: samples are independent)


# ---- DPS-Tweedie -----------------------------------------------------------------------------------------------
def tweedie_value_and_grad(backbone: Backbone, reward: ClipReward, z: torch.Tensor, t: torch.Tensor,
                           conditioning: Conditioning) -> ValueGrad:
    """∇_{z_t} r(D(ẑ0(z_t))) through the CFG velocity, the VAE decoder and the reward (one forward, one backward)."""
    if len(conditioning.prompts) != z.shape[0]:
        raise ValueError(f"DPS-Tweedie needs one prompt per latent: got {len(conditioning.prompts)} prompts for "
                         f"{z.shape[0]} latents")
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        v = cfg_velocity(backbone, z_in, t, conditioning.cond, conditioning.uncond, conditioning.scale)
        value = score_latents(backbone, reward, tweedie_z0(z_in, t, v), conditioning.prompts)
        (grad,) = torch.autograd.grad(value.sum(), z_in)
    return ValueGrad(v.detach(), value.detach(), grad)


class DPS:
    """DPS guidance: the velocity becomes u = v - c_t · ∇V, so the Euler step climbs V. `value_and_grad` gives the
    step's velocity together with V and ∇V (one forward, one backward); c_t = scale · schedule(t). At c_t = 0 the step
    is the plain CFG step, exactly and at no extra cost."""

    def __init__(self, value_and_grad: Callable[..., ValueGrad], scale: float, schedule: ScaleSchedule | None, name: str):
        self.value_and_grad = value_and_grad
        self.scale = check_scale(scale, f"{name} guidance scale")
        self.schedule = schedule

    def __call__(self, backbone: Backbone, z: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                 step: int) -> Guided:
        c = _coefficient(self.scale, self.schedule, t)
        if c == 0:
            return Guided(cfg_velocity(backbone, z, t, conditioning.cond, conditioning.uncond, conditioning.scale),
                          None, None)
        out = self.value_and_grad(backbone, z, t, conditioning)
        return Guided(out.velocity, -c * out.grad, out.value)


def dps_tweedie(reward: ClipReward, scale: float, schedule: ScaleSchedule | None = None) -> DPS:
    """DPS with the Tweedie reward estimate r(D(ẑ0)) (scales swept in the paper: 0.01–0.5)."""
    return DPS(lambda backbone, z, t, cond: tweedie_value_and_grad(backbone, reward, z, t, cond), scale, schedule,
               "DPS-Tweedie")


# ---- DPS-StitchVM: the CFG branch shared with the value head -------------------------------------------------
def stitchvm_value_and_grad(value_model: StitchedValueModel, backbone: Backbone, z: torch.Tensor,
                            t: torch.Tensor, conditioning: Conditioning) -> ValueGrad:
    """∇_{z_t} V(z_t) through i blocks + stitch + tail, the i blocks shared with the step's CFG branch
    (`guidance.shared_branch`): the rest of that branch and the other one run without autograd."""
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        stream = head_stream(value_model, backbone, z_in, t, conditioning)
        value = value_model.value_from_head(stream.h, tuple(z.shape[-2:]), conditioning.prompts)
        (grad,) = torch.autograd.grad(value.sum(), z_in)
    shared = (finish(backbone, stream, len(value_model.head.blocks), tuple(z.shape[-2:]))
              if needs_branch(value_model, backbone, conditioning.scale) else None)
    v = cfg_velocity_sharing(value_model, backbone, z, t, conditioning, shared)
    return ValueGrad(v, value.detach(), grad)


def dps_stitchvm(value_model: StitchedValueModel, scale: float, schedule: ScaleSchedule | None = None) -> DPS:
    """DPS with the stitched value model, its head shared with a CFG branch (paper scales: 0.5–7)."""
    return DPS(lambda backbone, z, t, cond: stitchvm_value_and_grad(value_model, backbone, z, t, cond), scale,
               schedule, "DPS-StitchVM")

