"""The registry of guidance methods: one name per sampler, run the same way by the `guidance` stage and by
`bench guidance`.

Methods (the names of `GuidanceConfig.methods`): `unguided`, `dps-tweedie`, `dps-stitchvm`, `fk-tweedie`,
`fk-stitchvm` (FK steering with that potential, the final particle selected by the true reward),
`fk-tweedie-noselect`, `fk-stitchvm-noselect` (the same without the final selection: what the intermediate
potentials alone contribute), `best-of-n` (N independent samples, the best kept by the true reward: an oracle
reference whose cost includes its N samplings, decodes and reward passes) and `best-of-n-matched` (best-of-N with the
N that costs what FK-StitchVM costs, measured in the same run). Every method samples the same prompts with the same
seeds (`chunks`), and every sample is scored by the one true reward (`models.reward.true_reward`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import torch

from stitchvm.config import GuidanceConfig, parse_schedule
from stitchvm.diffusion.sampling import sample
from stitchvm.guidance.dps import ScaleSchedule, dps_stitchvm, dps_tweedie, power, window
from stitchvm.guidance.fk import best_of_n, fk_sample, reward_scorer, stitchvm_potential, tweedie_potential
from stitchvm.models.backbone import Backbone
from stitchvm.models.reward import ClipReward, true_reward
from stitchvm.profiling import PeakMemory, synchronize
from stitchvm.value.model import StitchedValueModel

Sampler = Callable[[list[str], torch.Generator, int], torch.Tensor]  # prompts, generator, steps -> clean latents


def scale_schedule(text: str) -> ScaleSchedule | None:
    """The guidance-scale schedule of a config string (`constant`, `power:P`, `window:LO:HI`); None is constant."""
    kind, args = parse_schedule(text)
    return None if kind == "constant" else power(*args) if kind == "power" else window(*args)


def _unguided(backbone, reward, value_model, cfg: GuidanceConfig) -> Sampler:
    return lambda p, g, steps: sample(backbone, p, steps, cfg.guidance_scale, g, eta=cfg.eta)


def _dps(make_guidance) -> Callable[..., Sampler]:
    def build(backbone, reward, value_model, cfg: GuidanceConfig) -> Sampler:
        dps = make_guidance(backbone, reward, value_model, cfg)
        return lambda p, g, steps: sample(backbone, p, steps, cfg.guidance_scale, g, guidance=dps, eta=cfg.eta)
    return build


def _fk(make_potential, select: bool) -> Callable[..., Sampler]:
    """FK steering; `select`: the final particle is the best by the true reward (else each prompt's first)."""
    def build(backbone, reward, value_model, cfg: GuidanceConfig) -> Sampler:
        potential = make_potential(backbone, reward, value_model)
        final = reward_scorer(backbone, reward) if select else None
        return lambda p, g, steps: fk_sample(
            backbone, p, steps, cfg.guidance_scale, g, potential, particles=cfg.particles, proposals=cfg.proposals,
            proposal_fraction=cfg.proposal_fraction, resample_every=cfg.resample_every, window=tuple(cfg.window),
            eta=cfg.eta, final=final)[0]
    return build


def _best_of_n(backbone, reward, value_model, cfg: GuidanceConfig) -> Sampler:
    score = reward_scorer(backbone, reward)
    return lambda p, g, steps: best_of_n(backbone, p, steps, cfg.guidance_scale, g, score, n=cfg.best_of_n,
                                         eta=cfg.eta)[0]


METHODS: dict[str, Callable[[Backbone, ClipReward, StitchedValueModel, GuidanceConfig], Sampler]] = {
    "unguided": _unguided,
    "dps-tweedie": _dps(lambda b, r, vm, cfg: dps_tweedie(r, cfg.scale_tweedie, scale_schedule(cfg.schedule_tweedie))),
    "dps-stitchvm": _dps(lambda b, r, vm, cfg: dps_stitchvm(vm, cfg.scale_stitchvm,
                                                            scale_schedule(cfg.schedule_stitchvm))),
    "fk-tweedie": _fk(lambda b, r, vm: tweedie_potential(b, r), select=True),
    "fk-stitchvm": _fk(lambda b, r, vm: stitchvm_potential(vm), select=True),
    "fk-tweedie-noselect": _fk(lambda b, r, vm: tweedie_potential(b, r), select=False),
    "fk-stitchvm-noselect": _fk(lambda b, r, vm: stitchvm_potential(vm), select=False),
    "best-of-n": _best_of_n,
    "best-of-n-matched": _best_of_n,  # N from FK-StitchVM's measured time (`matched_best_of_n`)
}
MATCHED = ("best-of-n-matched", "fk-stitchvm")  # this method takes the wall time of that one


def matched_best_of_n(sec_per_sample: dict[str, float]) -> int:
    """The N at which best-of-N costs what FK-StitchVM costs: each candidate is about one unguided sample."""
    method, target = MATCHED
    missing = [m for m in (target, "unguided") if m not in sec_per_sample]
    if missing:
        raise ValueError(f"guidance method {method!r} takes its N from the measured time of {target!r} and "
                         f"'unguided': list {' and '.join(repr(m) for m in missing)} before it in guidance.methods")
    return max(1, round(sec_per_sample[target] / sec_per_sample["unguided"]))


def run_methods(methods, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
                prompts: list[str], cfg: GuidanceConfig, progress: bool = False):
    """Every method of `methods` in order (see `run_method`); yields (method, MethodRun). `best-of-n-matched` runs
    best-of-N with the N that matches FK-StitchVM's wall time measured just before it."""
    seconds = {}
    for method in methods:
        if progress:
            print(f"guidance: {method} …", flush=True)
        run = run_method(method, backbone, reward, value_model, prompts, method_config(method, cfg, seconds))
        seconds[method] = run.row["sec_per_sample"]
        yield method, run


def method_config(method: str, cfg: GuidanceConfig, sec_per_sample: dict[str, float]) -> GuidanceConfig:
    """`cfg` as `method` runs it: best-of-n-matched gets its N from the times measured so far."""
    if method != MATCHED[0]:
        return cfg
    return dataclasses.replace(cfg, best_of_n=matched_best_of_n(sec_per_sample))


def sampler(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
            cfg: GuidanceConfig) -> Sampler:
    """One clean latent per prompt with `method`."""
    if method not in METHODS:
        raise ValueError(f"unknown guidance method {method!r} (known: {', '.join(METHODS)})")
    return METHODS[method](backbone, reward, value_model, cfg)


def chunks(prompts: list[str], cfg: GuidanceConfig) -> list[tuple[list[str], int]]:
    """The sampling batches: `per_prompt` copies of every prompt, `batch_size` at a time, each with its seed."""
    expanded = [p for p in prompts for _ in range(cfg.per_prompt)]
    return [(expanded[k:k + cfg.batch_size], cfg.seed + n)
            for n, k in enumerate(range(0, len(expanded), cfg.batch_size))]


class MethodRun(NamedTuple):
    row: dict  # {method, sec_per_sample, peak_mem_mb, reward_mean, reward_std, samples, steps}
    latents: torch.Tensor  # (S, C, h, w) the clean latents, on the CPU
    prompts: list[str]  # (S,) their prompts
    rewards: torch.Tensor  # (S,) float64 true rewards


def run_method(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
               prompts: list[str], cfg: GuidanceConfig) -> MethodRun:
    """`method` on every chunk (see `chunks`) after a warm-up call, timed and measured; the true reward of each
    sample."""
    device = backbone.device
    fn = sampler(method, backbone, reward, value_model, cfg)
    batches = chunks(prompts, cfg)
    fn(batches[0][0], torch.Generator(device="cpu").manual_seed(cfg.seed), min(cfg.steps, 2))  # warm-up, same shapes
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        outs = [fn(p, torch.Generator(device="cpu").manual_seed(seed), cfg.steps) for p, seed in batches]
        synchronize(device)
        seconds = time.perf_counter() - start
    z0 = torch.cat(outs)
    flat = [p for chunk, _ in batches for p in chunk]
    r = true_reward(backbone, reward, z0, flat, cfg.batch_size).cpu().double()
    row = {"method": method, "sec_per_sample": seconds / len(flat), "peak_mem_mb": peak.mb,
           "reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(), "samples": len(flat),
           "steps": cfg.steps, **({"n": cfg.best_of_n} if method.startswith("best-of-n") else {})}
    return MethodRun(row, z0.cpu(), flat, r)
