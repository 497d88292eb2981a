"""DRaFT-K and DRaFT + StitchVM: reward fine-tuning by backpropagating through the last steps of the sampler.

Per update, `prompts_per_update` × `group_size` rollouts of the trained policy (adapter "default", CFG
`guidance_scale`, DDIM-η steps of `stitchvm.diffusion.sampling`):
- `draft` (DRaFT-K): all `steps` steps; steps 0..steps-K-1 without autograd, the last K with autograd; objective
  the terminal reward R = r(D(z0), prompt) (decoder and teacher differentiable).
- `draft-stitchvm`: the rollout stops after τ steps (τ uniform in the scaled window, one τ per update); the K
  steps before τ carry autograd; objective V(z_τ, σ_τ, prompt) of the frozen stitched value model (its head runs on
  the base backbone, not the adapter).

Loss: L = -mean_b R_b + λ · (1/K) Σ_{differentiable steps k} mean_b mean((v_θ(z_k, t_k) - v_ref(z_k, t_k))²)
(the output regulariser: the squared distance, per element, between the adapted and the base model's velocity at
the states the differentiable steps visit; v_ref runs with the adapter disabled and is a constant; λ =
`draft.reg_weight`, 0.01 in the paper). AdamW (lr `draft.lr`, wd `draft.weight_decay`), grad-norm clip `grad_clip`.
`checkpointing` recomputes each differentiable transformer pass during the backward (memory for time).
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
from stitchvm.models.reward import ClipReward, score_latents
from stitchvm.diffusion.sampling import cfg_velocity, encode_conditioning
from stitchvm.value.model import StitchedValueModel


def train_draft(policy: LoraPolicy, reward: ClipReward, prompts: list[str], cfg: AlignConfig, seed: int = 0,
                value_model: StitchedValueModel | None = None, evalset: PolicyEvalSet | None = None,
                callback: Callable[[dict], None] | None = None, progress: bool = False,
                checkpoint_dir: str | Path | None = None) -> list[dict]:
    """DRaFT (`cfg.method` "draft" or "draft-stitchvm") for `cfg.updates` updates; returns the history (rows as
    `stitchvm.alignment.nft.train_nft`'s: step 0 = base evaluation, then loss, reward, τ, phase seconds, wall_s,
    eval_reward). Checkpoints, resuming and torchrun as `train_nft`."""
    method = cfg.method
    if method not in ("draft", "draft-stitchvm"):
        raise ValueError(f"train_draft runs 'draft' or 'draft-stitchvm', got method {method!r}")
    check_value_model(method, value_model, policy)
    distributed.init_from_env()  # under torchrun: join the process group (a no-op when already joined or unlaunched)
    n = cfg.prompts_per_update * cfg.group_size  # the global batch: every rank's rollouts
    share = rollout_share(n)
    backbone, device = policy.backbone, policy.backbone.device
    generator = torch.Generator().manual_seed(seed)
    sigmas = sigma_grid(backbone, cfg.steps).to(device)
    params = policy.parameters(TRAINED)
    draft = cfg.draft
    optimiser = torch.optim.AdamW(params, lr=draft.lr, betas=(0.9, 0.999), weight_decay=draft.weight_decay)
    timer = Timer(device)
    ckpt = AlignCheckpoint(checkpoint_dir)
    run = start_or_resume(ckpt, policy, optimiser, generator, evalset, n,
                          lambda: {"step": 0, "wall_s": 0.0, **eval_row(policy, reward, evalset, TRAINED,
                                                                         cfg.batch_size)}, callback)
    history, wall = run.history, run.wall
    policy.activate(TRAINED)
    for step in tqdm(range(run.update, cfg.updates), desc=method, disable=not progress or not distributed.is_main(),
                     initial=run.update, total=cfg.updates):
        every_prompt = [p for p in pick_prompts(prompts, cfg.prompts_per_update, generator)
                        for _ in range(cfg.group_size)]
        batch_prompts = every_prompt[share]
        m = len(batch_prompts)  # this rank's rollouts
        tau = stopping_step(cfg, method, generator)
        k_steps = min(draft.k, tau)
        with timer("sampling"):
            cond = encode_conditioning(backbone, batch_prompts, cfg.guidance_scale)
            # the whole global batch's noise on every rank, each keeping its share (see train_nft)
            z_all = torch.randn((n, backbone.latent_channels, *latent_hw(backbone)), generator=generator)[share]
            z_all = z_all.to(device, backbone.transformer.dtype)  # (m, C, h, w)
            sde = sample_generators(seed, step, range(n)[share])
        optimiser.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "objective": 0.0, "regulariser": 0.0}
        rewards = []
        for a in range(0, m, cfg.batch_size):
            sl = slice(a, a + cfg.batch_size)
            c, b = slice_conditioning(cond, a, cfg.batch_size), min(a + cfg.batch_size, m) - a
            reg: list[torch.Tensor] = []

            def regulariser(k, z, t, v, c=c, reg=reg):
                with torch.no_grad(), policy.reference():
                    v_ref = cfg_velocity(backbone, z.detach(), t, c.cond, c.uncond, c.scale)
                reg.append(((v - v_ref) ** 2).mean(tuple(range(1, v.dim()))).mean())

            with timer("sampling"):
                z = rollout(backbone, c, z_all[sl], sigmas, tau, cfg.eta, sde[sl], grad_from=tau - k_steps,
                            on_step=regulariser if draft.reg_weight > 0 else None, checkpointing=cfg.checkpointing)
            with timer("reward"):
                if method == "draft":
                    objective = score_latents(backbone, reward, z, c.prompts)
                else:
                    objective = value_model(z, sigmas[tau].expand(b).to(z.dtype), c.prompts)
            with timer("update"):
                penalty = torch.stack(reg).mean() if reg else z.new_zeros(())
                loss = -objective.mean() + draft.reg_weight * penalty
                weight = b / m  # each rank's loss is the mean over its share (gradients averaged over ranks)
                # into the adapter only: the frozen value model's trainable stitch and tail would otherwise get
                # gradients too (wasted backward FLOPs, tests/test_align_counting.py)
                (loss * weight).backward(inputs=params)
            totals["loss"] += float(loss.detach()) * weight
            totals["objective"] += float(objective.detach().mean()) * weight
            totals["regulariser"] += float(penalty.detach()) * weight
            rewards.append(objective.detach().float())
        with timer("update"):
            distributed.average_gradients(params)  # clipped after the average: the global batch's norm, on every rank
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimiser.step()
        seconds = timer.take()
        wall += sum(seconds.values())
        totals = dict(zip(totals, distributed.average(torch.tensor(list(totals.values()), dtype=torch.float64,
                                                                   device=device)).tolist()))  # the global batch's
        rewards = distributed.gather_rows(torch.cat(rewards))  # (n,)
        row = {"step": step + 1, **totals, "grad_norm": float(grad_norm), "reward_mean": float(rewards.mean()),
               "reward_std": float(rewards.std(unbiased=False)), "tau": tau,
               **{f"{key}_s": v for key, v in seconds.items()}, "wall_s": wall}
        record_update(row, history, cfg, lambda: eval_row(policy, reward, evalset, TRAINED, cfg.batch_size),
                      callback, "DRaFT", save=lambda: ckpt.save(step + 1, (step + 1) * n, policy, optimiser,
                                                               generator, history, evalset, wall))
    return history
