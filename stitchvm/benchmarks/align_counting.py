"""Counting mode of `bench align`: FLOPs of one DiffusionNFT / DRaFT update at real sizes, without a GPU.

`python -m stitchvm bench align --count --profile arch [--rewards SRC,SRC]` builds the profile's backbone, a LoRA
adapter (r, α of `align`) and every reward (`--rewards`: preset sources, default the profile's reward; the paper
aligns with DFN-CLIP + HPSv2) on PyTorch's `meta` device and counts, with `counting.FlopCounter` (matmuls,
convolutions, fused attention), the pieces one update is made of, each run through the library's own functions for
one sample at `resolution`²:

    step        one sampler step without autograd: `cfg_velocity` at `align.guidance_scale` (+ `sde_step`, 0 FLOPs)
    grad_step   one differentiable sampler step with the adapter: forward, then the backward into z and the LoRA
                tensors (DRaFT's last K steps); + one recomputed forward with `align.checkpointing`; the first of
                them (`first_grad_step`) starts from a state without autograd, so its backward stops at the adapter
    ref_step    the base model's velocity at that state (DRaFT's output regulariser, adapters off, no autograd)
    reward      decode + every reward's score, no autograd (NFT's terminal reward)
    reward_grad decode + scores, forward and backward into z0 (DRaFT's objective)
    value       every reward's stitched value model V(z_τ) (no autograd: NFT+StitchVM's reward)
    value_grad  V(z_τ) forward and backward into z_τ (DRaFT+StitchVM's objective)
    train_pass  one NFT regression term: v_old (adapter "old"), v_ref (adapters off; when `nft.kl_weight` > 0), both
                without autograd, and v_θ forward + backward into the LoRA tensors

An update then costs, per rollout (averaged over τ uniform in the method's window scaled to `align.steps`, as
`alignment.trainer.stopping_step` draws it):

    nft            steps · step + reward + T(steps) · train_pass       T(n) = min(n, nft.train_times or n) grid times
    nft-stitchvm   τ · step + value + T(τ) · train_pass               (only grid times above σ_τ are trained)
    draft          (steps - K) · step + first_grad_step + (K - 1) · grad_step + K · ref_step + reward_grad
    draft-stitchvm (τ - K) · step + first_grad_step + (K - 1) · grad_step + K · ref_step + value_grad

times `prompts_per_update · group_size` rollouts. The counts of the pieces are measured; only this sum is arithmetic
(the trainers draw on CPU generators and read σ as Python floats, which a meta tensor cannot give). Adapter
bookkeeping (θ_old / EMA updates, the optimiser step) is elementwise and counts 0, as in `bench guidance --count`.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from stitchvm.alignment.trainer import scaled_window
from stitchvm.benchmarks.counting import FlopCounter, FusedAttention, latent_size
from stitchvm.config import AlignConfig, ModelSpec, RewardSpec
from stitchvm.diffusion.sampling import cfg_velocity, encode_conditioning
from stitchvm.models.backbone import Backbone, build_backbone
from stitchvm.models.lora import LoraPolicy
from stitchvm.models.reward import ClipReward, build_reward, score_latents
from stitchvm.value.model import StitchedValueModel

PROMPT = "two red apples on the left and a blue vase on the right"
COUNTED = ("nft", "nft-stitchvm", "draft", "draft-stitchvm")


def _tflops(fn) -> float:
    """TFLOPs of `fn()` (fused attention, as a GPU runs it)."""
    with FusedAttention(), FlopCounter() as flops:
        fn()
    return flops.get_total_flops() / 1e12


def _backward_into(out: torch.Tensor, *tensors: torch.Tensor) -> None:
    torch.autograd.grad(out.float().sum(), tensors, allow_unused=True)


def piece_costs(policy: LoraPolicy, rewards: list[ClipReward], value_models: list[StitchedValueModel],
                resolution: int, cfg: AlignConfig) -> dict[str, float]:
    """TFLOPs of each piece of the module docstring for one sample at `resolution`² pixels."""
    backbone = policy.backbone
    size = latent_size(backbone, resolution)
    z = torch.randn(1, backbone.latent_channels, size, size, device=backbone.device, dtype=backbone.transformer.dtype)
    t = torch.full((1,), 0.5, device=z.device, dtype=z.dtype)
    cond = encode_conditioning(backbone, [PROMPT], cfg.guidance_scale)
    lora = policy.parameters()
    for reward in rewards:
        reward.text_embeds([PROMPT])  # the text tower runs once per prompt (cached), not per rollout

    def velocity(z_in):
        return cfg_velocity(backbone, z_in, t, cond.cond, cond.uncond, cond.scale)

    def no_grad(fn):
        with torch.no_grad():
            fn()

    def grad_step():
        z_in = z.detach().requires_grad_(True)
        _backward_into(velocity(z_in), z_in, *lora)

    def first_grad_step():  # its input comes from steps without autograd: no gradient into z
        _backward_into(velocity(z), *lora)

    def reference():
        with torch.no_grad(), policy.reference():
            velocity(z)

    def scores(z0):
        return sum(score_latents(backbone, reward, z0, [PROMPT]).float() for reward in rewards)

    def values(z_tau):
        with policy.reference():  # the value head reads the base model's blocks, never the adapter
            return sum(vm(z_tau, t, [PROMPT]).float() for vm in value_models)

    def with_grad(fn):
        def run():
            z_in = z.detach().requires_grad_(True)
            _backward_into(fn(z_in), z_in)
        return run

    def train_pass():
        embeds, pooled = cond.cond
        with torch.no_grad():
            backbone.velocity(z, t, embeds, pooled)  # v_old: the "old" adapter costs what the trained one does
            if cfg.nft.kl_weight > 0:
                with policy.reference():
                    backbone.velocity(z, t, embeds, pooled)
        _backward_into(backbone.velocity(z, t, embeds, pooled), *lora)

    recompute = _tflops(lambda: no_grad(lambda: velocity(z))) if cfg.checkpointing else 0.0
    return {
        "step": _tflops(lambda: no_grad(lambda: velocity(z))),
        "first_grad_step": _tflops(first_grad_step) + recompute,
        "grad_step": _tflops(grad_step) + recompute,
        "ref_step": _tflops(reference) if cfg.draft.reg_weight > 0 else 0.0,
        "reward": _tflops(lambda: no_grad(lambda: scores(z))),
        "reward_grad": _tflops(with_grad(scores)),
        "value": _tflops(lambda: no_grad(lambda: values(z))),
        "value_grad": _tflops(with_grad(values)),
        "train_pass": _tflops(train_pass),
    }


def stopping_steps(cfg: AlignConfig, method: str) -> list[int]:
    """The τ values an update of `method` stops at, equally likely (`steps` alone for terminal-reward methods)."""
    if not method.endswith("stitchvm"):
        return [cfg.steps]
    own = cfg.nft if method.startswith("nft") else cfg.draft
    lo, hi = scaled_window(own.tau_window, own.tau_of, cfg.steps)
    return list(range(lo, hi + 1))


def per_rollout(method: str, tau: int, costs: dict[str, float], cfg: AlignConfig) -> dict[str, float]:
    """TFLOPs of one rollout's share of an update stopping at τ, split into rollout / reward / training."""
    if method.startswith("nft"):
        trained = min(tau, cfg.nft.train_times or tau)
        return {"rollout": tau * costs["step"], "reward": costs["value" if method.endswith("stitchvm") else "reward"],
                "training": trained * costs["train_pass"]}
    k = min(cfg.draft.k, tau)
    grad_steps = costs["first_grad_step"] + (k - 1) * costs["grad_step"] + k * costs["ref_step"]
    return {"rollout": (tau - k) * costs["step"] + grad_steps,
            "reward": costs["value_grad" if method.endswith("stitchvm") else "reward_grad"], "training": 0.0}


def update_row(method: str, resolution: int, costs: dict[str, float], cfg: AlignConfig) -> dict:
    """{method, resolution, tflops_per_update, the rollout / reward / training split, mean τ} of one update."""
    taus = stopping_steps(cfg, method)
    parts = [per_rollout(method, tau, costs, cfg) for tau in taus]
    rollouts = cfg.prompts_per_update * cfg.group_size
    split = {key: rollouts * sum(p[key] for p in parts) / len(parts) for key in ("rollout", "reward", "training")}
    return {"method": method, "resolution": resolution, "tflops_per_update": sum(split.values()),
            **{f"tflops_{key}": value for key, value in split.items()}, "mean_tau": sum(taus) / len(taus),
            "rollouts_per_update": rollouts}


def build_meta_policy(backbone: ModelSpec, rewards: list[RewardSpec], cfg: AlignConfig, i: int, j: int
                      ) -> tuple[LoraPolicy, list[ClipReward], list[StitchedValueModel]]:
    """The models on the meta device: the backbone with one LoRA adapter (in place: meta tensors cannot be copied),
    each reward, and one stitched value model per reward at (i, j)."""
    for spec in (backbone, *rewards):
        if not spec.source.startswith(("tiny:", "arch:")):
            raise ValueError(f"counting mode builds models on the meta device, which needs a preset source "
                             f"(arch:… or tiny:…), got {spec.source!r}")
    bb: Backbone = build_backbone(backbone, "meta")
    rws = [build_reward(spec, "meta") for spec in rewards]
    vms = [StitchedValueModel(bb, rw, i, j, master_dtype=rw.dtype) for rw in rws]
    policy = LoraPolicy(bb, cfg.lora_rank, cfg.lora_alpha, copy=False)
    return policy, rws, vms


def count_align(backbone: ModelSpec, rewards: list[RewardSpec], cfg: AlignConfig, i: int, j: int,
                resolutions=(512,), methods=COUNTED, progress: bool = True) -> dict:
    """{"pieces": {resolution: piece TFLOPs}, "rows": update rows, "ratios": {resolution: {nft, draft}}}."""
    unknown = [m for m in methods if m not in COUNTED]
    if unknown:
        raise ValueError(f"bench align --count counts {', '.join(COUNTED)}; unknown {', '.join(unknown)}")
    policy, rws, vms = build_meta_policy(backbone, rewards, cfg, i, j)
    pieces, rows = {}, []
    for res in resolutions:
        start = time.perf_counter()
        costs = piece_costs(policy, rws, vms, res, cfg)
        pieces[str(res)] = costs
        if progress:
            print(f"  counted the pieces of an update at {res}² ({time.perf_counter() - start:.1f} s)", flush=True)
        rows += [update_row(m, res, costs, cfg) for m in methods]
    return {"pieces": pieces, "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> dict:
    """Per resolution: baseline / StitchVM FLOPs per update for NFT and DRaFT (where both were counted)."""
    out = {}
    for res in dict.fromkeys(r["resolution"] for r in rows):
        by = {r["method"]: r["tflops_per_update"] for r in rows if r["resolution"] == res}
        out[str(res)] = {base: by[base] / by[f"{base}-stitchvm"] for base in ("nft", "draft")
                         if base in by and f"{base}-stitchvm" in by}
    return out


def reward_specs(sources: str | None, default: RewardSpec) -> list[RewardSpec]:
    """`--rewards a,b` as reward specs in the profile reward's dtype (CLIP scores), or the profile's reward."""
    if not sources:
        return [default]
    return [dataclasses.replace(default, source=s.strip(), kind="clip", head=None)
            for s in sources.split(",") if s.strip()]


RESOLUTIONS = (512,)  # the paper aligns at 512²
COLUMNS = ("method", "resolution", "tflops_per_update", "tflops_per_rollout", "tflops_rollout", "tflops_reward",
           "tflops_training", "mean_tau")


def run_count(profile: str, out: str, rewards: str | None = None, progress: bool = True) -> dict:
    """Count the profile's four trainers at 512² (rewards: `--rewards`), print the table, write the JSON to `out`."""
    import json
    from pathlib import Path

    from stitchvm.benchmarks import load_profile

    _, params = load_profile(profile)
    specs = reward_specs(rewards, params.reward)
    counted = count_align(params.backbone, specs, params.align, params.guidance.value_i, params.guidance.value_j,
                          RESOLUTIONS, progress=progress)
    for row in counted["rows"]:
        row["tflops_per_rollout"] = row["tflops_per_update"] / row["rollouts_per_update"]
    report = {"mode": "count", "profile": profile, "backbone": params.backbone.source,
              "rewards": [s.source for s in specs], "dtype": params.backbone.dtype, "align": {
                  "steps": params.align.steps, "rollouts_per_update": params.align.prompts_per_update
                  * params.align.group_size, "guidance_scale": params.align.guidance_scale,
                  "nft_tau_window": list(scaled_window(params.align.nft.tau_window, params.align.nft.tau_of,
                                                       params.align.steps)),
                  "nft_train_times": params.align.nft.train_times, "draft_k": params.align.draft.k,
                  "draft_tau_window": list(scaled_window(params.align.draft.tau_window, params.align.draft.tau_of,
                                                         params.align.steps))},
              "value_block": [params.guidance.value_i, params.guidance.value_j], **counted}
    print(format_count_table(report))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def format_count_table(report: dict) -> str:
    from stitchvm.stages import tables

    a = report["align"]
    lines = [f"bench align --count: {report['backbone']} + {' + '.join(report['rewards'])} on meta "
             f"({a['steps']} steps, {a['rollouts_per_update']} rollouts/update, CFG {a['guidance_scale']}; "
             f"NFT+StitchVM stops at τ in {a['nft_tau_window']}, DRaFT+StitchVM in {a['draft_tau_window']})",
             tables.format_table(report["rows"], COLUMNS, drop_missing=False)]
    for res, by in report["ratios"].items():
        lines += [f"{res}²: FLOPs per update {base} / {base}-stitchvm = {ratio:.3g}x" for base, ratio in by.items()]
    return "\n".join(lines)
