"""Shared pieces of training-time alignment (DiffusionNFT, DRaFT): rollouts, the true reward, fixed evaluation,
time accounting, one update's draws (prompts, τ) and closing an update (`record_update`).

Data parallel under torchrun (`stitchvm.distributed`): every rank makes the same draws from the shared generator
(prompts, τ, the whole global batch's initial noise and regression noise) and keeps its contiguous share of the
global batch's rollouts (`rollout_share`); the η-SDE noise of sample b comes from its own generator
(`sample_generators`), so no draw depends on which rank runs the sample. Rewards are gathered where the loss needs
the whole batch (NFT's group advantages), gradients are averaged, and every rank ends an update with the same
adapters. Rank 0 evaluates and writes the checkpoints.

Steps and times: a rollout of `steps` steps walks the σ grid `sigmas = sampling.timesteps(backbone, steps)` from
σ_0 = 1 down to σ_steps = 0. "Stop at step τ" means after τ sampler steps, at t = σ_τ (τ = steps: the clean latent).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from stitchvm import distributed
from stitchvm.models.backbone import Backbone
from stitchvm.config import AlignConfig
from stitchvm.models.lora import LoraPolicy
from stitchvm.models.reward import ClipReward, true_reward
from stitchvm.diffusion.sampling import Conditioning, cfg_velocity, encode_conditioning, initial_latents, sde_step, timesteps
from stitchvm.value.model import StitchedValueModel


def sigma_grid(backbone: Backbone, steps: int, latent_size: int | None = None) -> torch.Tensor:
    """(steps + 1,) σ grid of the pipeline for latents of side `latent_size` (default: the backbone's)."""
    size = latent_size or backbone.image_size // backbone.vae_scale
    return timesteps(backbone, steps, (size // backbone.patch_size) ** 2)


def rollout(backbone: Backbone, conditioning: Conditioning, z: torch.Tensor, sigmas: torch.Tensor, stop: int,
            eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
            grad_from: int | None = None, on_step=None, checkpointing: bool = False) -> torch.Tensor:
    """Run sampler steps 0..stop-1 from z at σ_0 (CFG velocity of `conditioning`, DDIM-η step of `sampling`).

    `generator` draws the η-SDE noise: one for the batch, or a list with one per sample. Steps k >= `grad_from` run
    with autograd (None: no step does); earlier steps run under no_grad. `on_step(k, z, t, v)` is called after each
    differentiable step's velocity (DRaFT's regulariser). `checkpointing` recomputes each differentiable transformer
    pass in the backward instead of storing its activations.
    """
    sigmas = sigmas.to(z.device)
    n = z.shape[0]

    def velocity(z_in, t):
        return cfg_velocity(backbone, z_in, t, conditioning.cond, conditioning.uncond, conditioning.scale)

    for k in range(stop):
        s, s_next = sigmas[k], sigmas[k + 1]
        t = s.expand(n).to(z.dtype)
        grad = grad_from is not None and k >= grad_from
        with torch.set_grad_enabled(grad):
            if grad and checkpointing:
                v = checkpoint(velocity, z, t, use_reentrant=False)
            else:
                v = velocity(z, t)
            if grad and on_step is not None:
                on_step(k, z, t, v)
            z = sde_step(z, v, s, s_next, eta, generator)
    return z


def noise_for_seeds(backbone: Backbone, seeds: list[int]) -> torch.Tensor:
    """(len(seeds), C, h, w): the initial noise of each seed (one generator per seed, the pipeline's draw)."""
    return torch.cat([initial_latents(backbone, 1, torch.Generator().manual_seed(int(s)))
                      for s in seeds])


@dataclass(frozen=True)
class PolicyEvalSet:
    """Fixed evaluation prompts × seeds: every prompt is sampled from every seed's noise, so two policies (or the
    same policy before and after training) are compared on identical inputs. `results` keeps each evaluation's
    ((N,) rewards, (N, C, h, w) clean latents) in order, so the first (the base model) and the last (the trained
    adapter) are at hand without sampling them again."""
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float = 1.0
    results: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False, compare=False)

    def expanded(self) -> tuple[list[str], list[int]]:
        return [p for p in self.prompts for _ in self.seeds], [s for _ in self.prompts for s in self.seeds]


@torch.no_grad()
def evaluate_policy(backbone: Backbone, reward: ClipReward, evalset: PolicyEvalSet, batch_size: int = 16
             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean true reward, (N,) rewards, (N, C, h, w) clean latents) of fully denoised Euler samples of `backbone`
    (whatever adapter is active) on the fixed evaluation prompts and seeds."""
    prompts, seeds = evalset.expanded()
    sigmas = sigma_grid(backbone, evalset.steps)
    z_all = []
    for k in range(0, len(prompts), batch_size):
        ps = prompts[k:k + batch_size]
        z = noise_for_seeds(backbone, seeds[k:k + batch_size])
        z_all.append(rollout(backbone, encode_conditioning(backbone, ps, evalset.guidance_scale), z, sigmas, evalset.steps))
    z0 = torch.cat(z_all)
    r = true_reward(backbone, reward, z0, prompts, batch_size)
    return float(r.mean()), r, z0


@dataclass
class Timer:
    """Accumulated wall time per phase (`with timer("sampling"): ...`), synchronising CUDA at the boundaries."""
    device: torch.device | str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        sync = torch.device(self.device).type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The accumulated seconds, then reset."""
        out, self.seconds = dict(self.seconds), {}
        return out


def scaled_window(window: tuple[int, int], of: int, steps: int) -> tuple[int, int]:
    """A stopping window `(lo, hi)` given for `of` steps, scaled to `steps` (rounded, kept inside 1..steps-1)."""
    lo, hi = window
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi < of):
        raise ValueError(f"stopping window {window} must satisfy 1 <= lo <= hi < {of} (steps it refers to)")
    if steps < 2:
        raise ValueError(f"stopping early needs at least 2 sampler steps, got {steps}")
    a = min(max(round(lo * steps / of), 1), steps - 1)
    b = min(max(round(hi * steps / of), a), steps - 1)
    return a, b


def draw_tau(window: tuple[int, int], generator: torch.Generator) -> int:
    """τ uniform in {lo..hi} (inclusive)."""
    lo, hi = window
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def eval_row(policy: LoraPolicy, reward: ClipReward, evalset: PolicyEvalSet | None, adapter: str, batch_size: int) -> dict:
    """{"eval_reward": mean true reward of `adapter` on `evalset`}, or {} without an evaluation set. Rank 0 alone
    evaluates under torchrun (every rank holds the same adapters; the evaluation draws nothing from the generator)."""
    if evalset is None or not distributed.is_main():
        return {}
    with policy.use(adapter) as backbone:
        mean, rewards, z0 = evaluate_policy(backbone, reward, evalset, batch_size)
    evalset.results.append((rewards, z0))
    return {"eval_reward": mean}


def record_update(row: dict, history: list[dict], cfg: AlignConfig, evaluate_adapter: Callable[[], dict],
                  callback: Callable[[dict], None] | None, what: str, save: Callable[[], None] | None = None) -> None:
    """Close one update: fail on a non-finite loss, evaluate_policy every `eval_every` updates and at the end, record,
    `save` the checkpoint, then call `callback` (which therefore finds the update saved, whatever it does next)."""
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"{what} loss became {row['loss']} at update {row['step']}")
    if row["step"] % cfg.eval_every == 0 or row["step"] == cfg.updates:
        row.update(evaluate_adapter())
    history.append(row)
    if save:
        save()
    if callback:
        callback(row)


# ---- one update's draws and checks (shared by nft.py and draft.py) ----------------------------------------------
def pick_prompts(prompts: list[str], n: int, generator: torch.Generator) -> list[str]:
    """n prompts for one update: a random subset (with replacement only when there are fewer than n)."""
    if not prompts:
        raise ValueError("no training prompts")
    if len(prompts) >= n:
        idx = torch.randperm(len(prompts), generator=generator)[:n]
    else:
        idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[int(k)] for k in idx]


def rollout_share(n: int) -> slice:
    """This rank's contiguous part of an update's n rollouts. Each rank's loss is a mean over its share, so equal shares
    make the mean of the ranks' gradients the global batch's."""
    world = distributed.world_size()
    if n % world:
        raise ValueError(f"align.prompts_per_update × align.group_size = {n} rollouts per update do not split into "
                         f"{world} processes: make it a multiple of {world}")
    return distributed.rank_slice(n)


def sample_generators(seed: int, update: int, indices: range) -> list[torch.Generator]:
    """One generator per rollout of the update (`indices` in the global batch) for its η-SDE noise: a sample's noise
    depends on (seed, update, index) alone, not on the rank or micro-batch that runs it. Unused at η = 0."""
    return [torch.Generator().manual_seed(((seed * 1_000_003 + update) * 1_000_003 + b) % 2 ** 63) for b in indices]


def check_value_model(method: str, value_model: StitchedValueModel | None, policy: LoraPolicy) -> None:
    if method.endswith("stitchvm"):
        if value_model is None:
            raise ValueError(f"method {method!r} needs a trained stitched value model (run the `train` stage)")
        if value_model.backbone_spec != policy.base.spec:
            raise ValueError(f"the value model was built on backbone {value_model.backbone_spec.source!r}, the "
                             f"policy on {policy.base.spec.source!r}")


def stopping_step(cfg: AlignConfig, method: str, generator: torch.Generator) -> int:
    """τ for one update: `steps` for terminal-reward methods, else uniform in the window scaled to `steps`."""
    if not method.endswith("stitchvm"):
        return cfg.steps
    if method.startswith("nft"):
        return draw_tau(scaled_window(cfg.nft.tau_window, cfg.nft.tau_of, cfg.steps), generator)
    return draw_tau(scaled_window(cfg.draft.tau_window, cfg.draft.tau_of, cfg.steps), generator)


def latent_hw(backbone: Backbone) -> tuple[int, int]:
    size = backbone.image_size // backbone.vae_scale
    return size, size


def slice_conditioning(cond: Conditioning, start: int, size: int) -> Conditioning:
    """The conditioning of samples start..start+size."""
    sl = slice(start, start + size)
    return type(cond)(cond.prompts[sl], (cond.cond[0][sl], cond.cond[1][sl]), (cond.uncond[0][sl], cond.uncond[1][sl]),
                      cond.scale)
