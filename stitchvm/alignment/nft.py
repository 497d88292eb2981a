"""DiffusionNFT (online RL on the forward process) and its StitchVM variant, as NVlabs/DiffusionNFT defines it.

Conventions: z_t = α_t z0 + σ_t ε with α_t = 1 - t, σ_t = t (t = 1 is noise), v ≈ ε - z0, ẑ0 = z_t - t v.

One update (`train_nft`; `adv_clip`, `train_times`, `old_rate`, ... are keys of `align.nft`, the rest of `align`):
1. Rollouts from the data-collection policy θ_old (adapter "old"): `prompts_per_update` prompts × `group_size`
   samples, `steps` sampler steps at CFG `guidance_scale`, no autograd.
2. Rewards R: the true reward r(D(z0)) (`nft`), or V(z_τ) of the stitched value model when every rollout of the
   update stops after τ steps (τ uniform in the scaled window; `nft-stitchvm`).
3. Optimality per prompt group (`optimality`): A = (R - mean_group R) / (std_all R + 1e-4),
   r = clamp(clip(A, -c, c) / c · ½ + ½, 0, 1) with c = `adv_clip` (5).
4. Forward process at the grid times t_k (k < τ; all grid times with σ > 0 for `nft`), fresh ε each:
   `nft`: z_t = (1 - t) z0 + t ε, target u = ε - z0, x0-target z0;
   `nft-stitchvm`: the bridge from z_τ (`bridge`), target u = ∂z_t/∂t, x0-target x̃0 = z_t - t u (equal to z0 at τ = 0).
5. Loss (`nft_loss`): implicit policies v⁺ = (1-β) v_old + β v_θ, v⁻ = (1+β) v_old - β v_θ, ẑ0± = z_t - t v±,
   L± = mean((ẑ0± - x̃0)²) / stopgrad(max(mean|ẑ0± - x̃0|, 1e-5)) per sample,
   L = c · mean[(r L⁺ + (1-r) L⁻) / β] + λ_KL · mean ||v_θ - v_ref||² (v_ref: the base model, adapters off).
   Gradients accumulate over the grid times (`train_times` > 0: that many grid times drawn per update) and
   micro-batches of `batch_size`; then grad-norm clipping and one AdamW step (lr 3e-4, wd 1e-4 by default).
   One τ per update (all rollouts of an update stop at the same step, so a group's values share a noise level).
6. After the k-th optimiser step (k = 0, 1, ...): θ_old ← η θ_old + (1-η) θ with η = min(old_rate · k, old_max)
   (`old_decay`), and the evaluation EMA θ_ema ← d θ_ema + (1-d) θ with d = min((1+k)/(10+k), ema_max) (`ema_decay`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from stitchvm.progress import tqdm

from stitchvm import distributed
from stitchvm.alignment.checkpoint import AlignCheckpoint, start_or_resume
from stitchvm.alignment.trainer import (PolicyEvalSet, Timer, check_value_model, eval_row, latent_hw, pick_prompts,
                                        record_update, rollout, rollout_share, sample_generators, sigma_grid,
                                        slice_conditioning, stopping_step)
from stitchvm.config import AlignConfig
from stitchvm.models.lora import TRAINED, LoraPolicy
from stitchvm.models.reward import ClipReward, true_reward
from stitchvm.diffusion.sampling import encode_conditioning
from stitchvm.value.model import StitchedValueModel

NFT_ADAPTERS = (TRAINED, "old", "ema")


# ---- formulas --------------------------------------------------------------------------------------------------
def optimality(rewards: torch.Tensor, groups: torch.Tensor, clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """(B,) optimality probabilities r ∈ [0, 1] from rewards (B,) and prompt-group ids (B,).

    A = (R - mean of R over the sample's group) / (population std of all R + eps); r = clamp(clip(A, ±c)/c·½ + ½, 0, 1).
    A group whose rewards are all equal gets A = 0, r = ½ (also when every reward is equal: 0 / eps = 0).
    """
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must both be (B,), got {tuple(rewards.shape)} and {tuple(groups.shape)}")
    r = rewards.double()
    _, inverse = torch.unique(groups.to(r.device), return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, dtype=r.dtype, device=r.device)
    count.index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, inverse, r)
    centred = r - (total / count)[inverse]
    std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    adv = centred / (std + eps)
    return (adv.clamp(-clip, clip) / clip * 0.5 + 0.5).clamp(0, 1).to(rewards.dtype)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def bridge(z_tau: torch.Tensor, s, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process started at z_τ (σ_τ = s) evaluated at t > s: (z_t, target u = ∂z_t/∂t at fixed ε).

    With α_t = 1 - t, σ_t = t and a_t = α_t / α_s = (1 - t)/(1 - s) (q(z_t | z_s) of the forward process):

        z_t = a_t z_τ + c_t ε,        c_t = sqrt(σ_t² - a_t² σ_s²) = sqrt(t² - a_t² s²)
        u   = a_t' z_τ + c_t' ε,      a_t' = -1/(1 - s),   c_t' = (t - a_t a_t' s²) / c_t = (t + a_t s²/(1 - s)) / c_t

    At s = 0 (z_τ = z0): a_t = 1 - t, c_t = t, u = ε - z0, the plain flow-matching target. Needs 0 <= s < t <= 1.
    """
    s = _bcast(s, z_tau)
    tb = _bcast(t, z_tau)
    a = (1 - tb) / (1 - s)
    da = -1 / (1 - s)
    c = torch.sqrt(tb * tb - a * a * s * s)
    dc = (tb - a * da * s * s) / c
    return a * z_tau + c * eps, da * z_tau + dc * eps


def x0_target(z_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x̃0 = z_t - t u: the clean latent a velocity target u implies (z0 itself when u = ε - z0)."""
    return z_t - _bcast(t, z_t) * u


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, z_t: torch.Tensor, t: torch.Tensor,
             x0: torch.Tensor, r: torch.Tensor, beta: float = 1.0, kl_weight: float = 1e-4, adv_clip: float = 5.0,
             min_norm: float = 1e-5) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiffusionNFT loss of the module docstring (step 5) for one grid time: (scalar loss, metrics).

    v: the trained policy's velocity (with grad); v_old, v_ref: old policy and base model (treated as constants;
    v_ref None skips the KL term); x0: the x0-space target; r: (B,) optimality.
    """
    dims = tuple(range(1, v.dim()))
    v_old = v_old.detach()
    tb = _bcast(t, z_t)
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    x0_pos, x0_neg = z_t - tb * v_pos, z_t - tb * v_neg
    dtype = torch.promote_types(v.dtype, torch.float32)  # half-precision models: the loss in float32
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(min_norm).to(dtype)
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(min_norm).to(dtype)
    l_pos = ((x0_pos.to(dtype) - x0.to(dtype)) ** 2 / w_pos).mean(dims)
    l_neg = ((x0_neg.to(dtype) - x0.to(dtype)) ** 2 / w_neg).mean(dims)
    r = r.to(dtype)
    policy = adv_clip * ((r * l_pos + (1 - r) * l_neg) / beta).mean()
    kl = ((v.to(dtype) - v_ref.detach().to(dtype)) ** 2).mean(dims).mean() if v_ref is not None else \
        v.new_zeros((), dtype=dtype)
    loss = policy + kl_weight * kl
    with torch.no_grad():
        metrics = {"policy_loss": float(policy), "kl": float(kl), "old_deviation": float(((v - v_old) ** 2).mean())}
    return loss, metrics


def old_decay(step: int, rate: float = 0.001, cap: float = 0.5) -> float:
    """η after optimiser step `step` (0-based): min(rate · step, cap); θ_old ← η θ_old + (1-η) θ."""
    return min(rate * step, cap)


def ema_decay(step: int, cap: float = 0.9) -> float:
    """Evaluation-EMA decay after optimiser step `step` (0-based): min((1 + step)/(10 + step), cap)."""
    return min((1 + step) / (10 + step), cap)


# ---- the loop --------------------------------------------------------------------------------------------------
def train_nft(policy: LoraPolicy, reward: ClipReward, prompts: list[str], cfg: AlignConfig, seed: int = 0,
              value_model: StitchedValueModel | None = None, evalset: PolicyEvalSet | None = None,
              callback: Callable[[dict], None] | None = None, progress: bool = False,
              checkpoint_dir: str | Path | None = None) -> list[dict]:
    """DiffusionNFT (`cfg.method` "nft" or "nft-stitchvm") for `cfg.updates` updates; returns the history.

    `policy` must carry the adapters "default", "old" and "ema" (`LoraPolicy(..., adapters=NFT_ADAPTERS)`).
    History: a row `step 0` (evaluation of the base policy, when `evalset` is given) and one row per update with the
    loss terms, the rollouts' reward, τ, the seconds spent in sampling / reward / update, the cumulative training
    wall time `wall_s` (evaluation excluded) and `eval_reward` every `cfg.eval_every` updates (EMA weights when
    `cfg.nft.eval_ema`). Deterministic under `seed`. With `checkpoint_dir` every update is checkpointed and a run
    finding a checkpoint there continues from it (the history returned is the whole run's). Under torchrun each
    rank rolls out its share of the global batch (`stitchvm.alignment.trainer`), rank 0 alone evaluates.
    """
    method = cfg.method
    if method not in ("nft", "nft-stitchvm"):
        raise ValueError(f"train_nft runs 'nft' or 'nft-stitchvm', got method {method!r}")
    missing = [a for a in NFT_ADAPTERS if a not in policy.adapters]
    if missing:
        raise ValueError(f"the policy needs the adapters {NFT_ADAPTERS} for DiffusionNFT, missing {missing}")
    check_value_model(method, value_model, policy)
    distributed.init_from_env()  # under torchrun: join the process group (a no-op when already joined or unlaunched)
    n = cfg.prompts_per_update * cfg.group_size  # the global batch: every rank's rollouts
    share = rollout_share(n)
    backbone, device = policy.backbone, policy.backbone.device
    generator = torch.Generator().manual_seed(seed)
    sigmas = sigma_grid(backbone, cfg.steps)
    nft = cfg.nft
    params = policy.parameters(TRAINED)
    optimiser = torch.optim.AdamW(params, lr=nft.lr, betas=(0.9, 0.999), weight_decay=nft.weight_decay)
    timer = Timer(device)
    eval_adapter = "ema" if nft.eval_ema else TRAINED
    ckpt = AlignCheckpoint(checkpoint_dir)
    run = start_or_resume(ckpt, policy, optimiser, generator, evalset, n,
                          lambda: {"step": 0, "wall_s": 0.0, **eval_row(policy, reward, evalset, TRAINED,
                                                                         cfg.batch_size)}, callback)
    history, wall = run.history, run.wall
    for step in tqdm(range(run.update, cfg.updates), desc=method, disable=not progress or not distributed.is_main(),
                     initial=run.update, total=cfg.updates):
        every_prompt = [p for p in pick_prompts(prompts, cfg.prompts_per_update, generator)
                        for _ in range(cfg.group_size)]
        groups = torch.arange(cfg.prompts_per_update).repeat_interleave(cfg.group_size)  # (n,)
        tau = stopping_step(cfg, method, generator)
        batch_prompts = every_prompt[share]
        m = len(batch_prompts)  # this rank's rollouts
        # 1. rollouts of the old policy
        with timer("sampling"), torch.no_grad(), policy.use("old"):
            cond = encode_conditioning(backbone, batch_prompts, cfg.guidance_scale)
            # the whole global batch's noise is drawn on every rank, which keeps its share: the same draws (and the
            # same generator state) for any number of processes
            z = torch.randn((n, backbone.latent_channels, *latent_hw(backbone)), generator=generator)[share]
            z = z.to(device, backbone.transformer.dtype)  # (m, C, h, w)
            sde = sample_generators(seed, step, range(n)[share])
            z_anchor = torch.cat([rollout(backbone, slice_conditioning(cond, k, cfg.batch_size),
                                          z[k:k + cfg.batch_size], sigmas, tau, cfg.eta, sde[k:k + cfg.batch_size])
                                  for k in range(0, m, cfg.batch_size)])
        # 2. rewards and optimality (relative to the prompt's whole group and the whole batch's spread: gathered)
        with timer("reward"), torch.no_grad():
            if method == "nft":
                rewards = true_reward(backbone, reward, z_anchor, batch_prompts, cfg.batch_size)
            else:
                s = sigmas[tau].expand(m).to(device, z_anchor.dtype)
                rewards = torch.cat([value_model(z_anchor[k:k + cfg.batch_size], s[k:k + cfg.batch_size],
                                                 batch_prompts[k:k + cfg.batch_size])
                                     for k in range(0, m, cfg.batch_size)]).float()
            every_reward = distributed.gather_rows(rewards)  # (n,)
            r = optimality(every_reward, groups, nft.adv_clip)[share].to(device)  # (m,)
        # 3. forward-process regression at the grid times above the anchor
        with timer("update"):
            s_tau = float(sigmas[tau]) if method == "nft-stitchvm" else 0.0
            times = [k for k in range(tau if method == "nft-stitchvm" else cfg.steps) if float(sigmas[k]) > s_tau]
            if nft.train_times and nft.train_times < len(times):
                pick = torch.randperm(len(times), generator=generator)[:nft.train_times].sort().values
                times = [times[int(k)] for k in pick]
            optimiser.zero_grad(set_to_none=True)
            terms = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "old_deviation": 0.0}
            for k in times:
                t = sigmas[k].expand(m).to(device, z_anchor.dtype)
                eps = torch.randn((n, *z_anchor.shape[1:]), generator=generator)[share].to(device, z_anchor.dtype)
                if method == "nft":
                    tb = t.view(-1, 1, 1, 1)
                    z_t, target = (1 - tb) * z_anchor + tb * eps, z_anchor
                else:
                    z_t, u = bridge(z_anchor, s_tau, t, eps)
                    target = x0_target(z_t, t, u)
                for a in range(0, m, cfg.batch_size):
                    sl = slice(a, a + cfg.batch_size)
                    embeds, pooled = cond.cond[0][sl], cond.cond[1][sl]
                    # cond.scale: a guidance-distilled backbone (FLUX) embeds the rollouts' scale; SD3 ignores it
                    with torch.no_grad():
                        with policy.use("old"):
                            v_old = backbone.velocity(z_t[sl], t[sl], embeds, pooled, cond.scale)
                        v_ref = None
                        if nft.kl_weight > 0:
                            with policy.reference():
                                v_ref = backbone.velocity(z_t[sl], t[sl], embeds, pooled, cond.scale)
                    v = backbone.velocity(z_t[sl], t[sl], embeds, pooled, cond.scale)
                    loss, metrics = nft_loss(v, v_old, v_ref, z_t[sl], t[sl], target[sl], r[sl], nft.beta,
                                             nft.kl_weight, nft.adv_clip)
                    weight = (min(a + cfg.batch_size, m) - a) / m / len(times)
                    (loss * weight).backward()
                    terms["loss"] += float(loss.detach()) * weight
                    for key, value in metrics.items():
                        terms[key] += value * weight
            distributed.average_gradients(params)  # clipped after the average: the global batch's norm, on every rank
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimiser.step()
            policy.ema_("old", TRAINED, old_decay(step, nft.old_rate, nft.old_max))
            policy.ema_("ema", TRAINED, ema_decay(step, nft.ema_max))
        seconds = timer.take()
        wall += sum(seconds.values())
        terms = dict(zip(terms, distributed.average(torch.tensor(list(terms.values()), dtype=torch.float64,
                                                                 device=device)).tolist()))  # the global batch's
        row = {"step": step + 1, **terms, "grad_norm": float(grad_norm), "reward_mean": float(every_reward.mean()),
               "reward_std": float(every_reward.std(unbiased=False)), "tau": tau, "train_times": len(times),
               **{f"{key}_s": v for key, v in seconds.items()}, "wall_s": wall}
        record_update(row, history, cfg, lambda: eval_row(policy, reward, evalset, eval_adapter, cfg.batch_size),
                      callback, "DiffusionNFT", save=lambda: ckpt.save(step + 1, (step + 1) * n, policy, optimiser,
                                                                      generator, history, evalset, wall))
    return history
