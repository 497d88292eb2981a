"""The true value by Monte Carlo: V*(z_t) = E[r(D(z0)) | z_t], the reward averaged over rollouts of the generator.

Not in the paper (METHOD.md, Evaluation), yet it is what a value model regresses towards; both the value model and
the Tweedie baseline are estimates of it. A rollout continues z_t, noisy at σ = t, with the generator's own stochastic
sampler (the linear SDE at η = 1, which samples the clean latent's posterior given z_t) at the CFG scale and on the
σ grid that produced the data. Its agreement with the teacher on the one realised clean image bounds what any value
can reach at that σ: the rest of the teacher's ranking is noise that z_t does not determine.
"""
from __future__ import annotations

import torch
from stitchvm.progress import tqdm

from stitchvm.models.backbone import Backbone
from stitchvm.models.reward import ClipReward, true_reward
from stitchvm.diffusion.sampling import check_eta, check_prompts, check_steps, sample


def check_rollouts(rollouts) -> int:
    if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 1:
        raise ValueError(f"rollouts must be an integer >= 1, got {rollouts!r}")
    return rollouts


@torch.no_grad()
def monte_carlo_value(backbone: Backbone, reward: ClipReward, z_t: torch.Tensor, t: float, prompts: list[str],
                      rollouts: int, steps: int, guidance_scale: float, generator: torch.Generator,
                      batch_size: int = 64, eta: float = 1.0, progress: bool = False) -> torch.Tensor:
    """(N,) the mean own-prompt reward over `rollouts` generator rollouts from each latent of z_t (N, C, h, w) at σ = t.

    Rollouts of one latent are consecutive in a batch of about `batch_size` trajectories; `generator` draws their noise.
    """
    rollouts, steps, eta = check_rollouts(rollouts), check_steps(steps), check_eta(eta)
    prompts = check_prompts(prompts)
    if len(prompts) != len(z_t):
        raise ValueError(f"{len(z_t)} noisy latents but {len(prompts)} prompts")
    if not 0 < t <= 1:
        raise ValueError(f"t must lie in (0, 1], got {t}")
    per_batch = max(1, batch_size // rollouts)
    values = []
    for start in tqdm(range(0, len(z_t), per_batch), desc=f"monte carlo σ={t}", disable=not progress):
        z = z_t[start:start + per_batch].to(backbone.device).repeat_interleave(rollouts, 0)  # (b·R, C, h, w)
        batch_prompts = [p for p in prompts[start:start + per_batch] for _ in range(rollouts)]
        z0 = sample(backbone, batch_prompts, steps, guidance_scale, generator, eta=eta, latents=z, start=t)
        values.append(true_reward(backbone, reward, z0, batch_prompts, len(z0)).view(-1, rollouts).mean(1).cpu())
    return torch.cat(values)
