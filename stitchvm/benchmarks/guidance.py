"""`python -m stitchvm bench guidance --profile NAME --out PATH [--count]`: reward-guided sampling, method by method.

Run mode: unguided, DPS-Tweedie, DPS-StitchVM, FK steering with Tweedie or value potentials and best-of-N on the same
prompts and seeds (`guidance` in the profile's params). Per method: seconds per sample, peak memory above the
baseline of one sampling call (CUDA: the allocator's peak; CPU: the process's resident high-water mark, measured in a
fresh subprocess per method, reset after a warm-up call, baseline subtracted), and the true reward (the teacher on the
final decoded image) over the samples. Best-of-N selects by that same true reward: it is an oracle reference, and its
cost includes its N samplings and N decodes + reward passes.

The value model is the profile's trained one (`value_model/` under its storage root) when it exists, else an untrained
one at (guidance.value_i, guidance.value_j) on the same models (cost is the same; its rewards mean nothing).

Counting mode (`--count`, `stitchvm.benchmarks.counting`): FLOPs and saved activations per guided step at real sizes on
the meta device (the `arch` presets unless the profile names other `arch:` models; `guidance.count_resolutions`,
the stitch at (guidance.value_i, guidance.value_j), one prompt with CFG). JSON: {"device", "profile", "rows": [{"method", …}], …}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.config import GuidanceConfig, ModelSpec, Params, RewardSpec, parse_schedule, to_dict
from stitchvm.guidance.dps import DPSStitchVM, DPSTweedie, Schedule, power, window
from stitchvm.profiling import PeakMemory
from stitchvm.models.reward import ClipReward
from stitchvm.diffusion.sampling import sample
from stitchvm.guidance.fk import best_of_n, fk_sample, reward_scorer, stitchvm_potential, tweedie_potential
from stitchvm.value.model import StitchedValueModel
from stitchvm.benchmarks import load_profile, profile_path

ARCH_BACKBONE, ARCH_REWARD = "arch:sd3.5-medium", "arch:clip-vit-l-14"
ROW_KEYS = ("method", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std")
TARGETS = {"tweedie_over_stitchvm_flops": (">=", 2.7), "stitchvm_over_unguided_flops": ("<=", 1.2),
           "stitchvm_over_tweedie_saved": ("<=", 0.1)}  # at 1024² (the targets)


# ---- the methods -------------------------------------------------------------------------------------------------
def schedule(text: str) -> Schedule | None:
    kind, args = parse_schedule(text)
    return None if kind == "constant" else power(*args) if kind == "power" else window(*args)


Sampler = Callable[[list[str], torch.Generator, int], torch.Tensor]  # prompts, generator, steps -> clean latents


def sampler(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
            cfg: GuidanceConfig) -> Sampler:
    """One clean latent per prompt with `method` (the names of GuidanceConfig.methods)."""
    w, eta = cfg.guidance_scale, cfg.eta
    if method == "unguided":
        return lambda p, g, steps: sample(backbone, p, steps, w, g, eta=eta)
    if method == "dps-tweedie":
        dps = DPSTweedie(reward, cfg.scale_tweedie, schedule(cfg.schedule_tweedie))
        return lambda p, g, steps: sample(backbone, p, steps, w, g, guidance=dps, eta=eta)
    if method == "dps-stitchvm":
        dps = DPSStitchVM(value_model, cfg.scale_stitchvm, schedule(cfg.schedule_stitchvm))
        return lambda p, g, steps: sample(backbone, p, steps, w, g, guidance=dps, eta=eta)
    if method in ("fk-tweedie", "fk-stitchvm"):
        potential = (tweedie_potential(backbone, reward) if method == "fk-tweedie"
                     else stitchvm_potential(value_model))
        return lambda p, g, steps: fk_sample(
            backbone, p, steps, w, g, potential, particles=cfg.particles, proposals=cfg.proposals,
            proposal_fraction=cfg.proposal_fraction, resample_every=cfg.resample_every, window=tuple(cfg.window),
            eta=eta)[0]
    if method == "best-of-n":
        score = reward_scorer(backbone, reward)
        return lambda p, g, steps: best_of_n(backbone, p, steps, w, g, score, n=cfg.best_of_n, eta=eta)[0]
    raise ValueError(f"unknown guidance method {method!r}")


def chunks(prompts: list[str], cfg: GuidanceConfig) -> list[tuple[list[str], int]]:
    """The sampling batches: `per_prompt` copies of every prompt, `batch_size` at a time, each with its seed."""
    expanded = [p for p in prompts for _ in range(cfg.per_prompt)]
    return [(expanded[k:k + cfg.batch_size], cfg.seed + n)
            for n, k in enumerate(range(0, len(expanded), cfg.batch_size))]


@torch.no_grad()
def true_reward(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, prompts: list[str],
                batch_size: int) -> torch.Tensor:
    """(B,) the teacher on the decoded clean images."""
    score = reward_scorer(backbone, reward)
    return torch.cat([score(z0[k:k + batch_size], prompts[k:k + batch_size]).float().cpu()
                      for k in range(0, len(prompts), batch_size)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(device)
        seconds = time.perf_counter() - start
    z0 = torch.cat(outs)
    flat = [p for chunk, _ in batches for p in chunk]
    r = true_reward(backbone, reward, z0, flat, cfg.batch_size).double()
    row = {"method": method, "sec_per_sample": seconds / len(flat), "peak_mem_mb": peak.mb,
           "reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(), "samples": len(flat),
           "steps": cfg.steps}
    return MethodRun(row, z0.cpu(), flat, r)


# ---- setup shared by the benchmark and the stage -----------------------------------------------------------------
@dataclass
class Setup:
    backbone: Backbone
    reward: ClipReward
    value_model: StitchedValueModel
    value_source: str  # "trained: PATH" or "untrained (i, j)"
    prompts: list[str]


def eval_prompts(params: Params) -> list[str]:
    """The test split of the prompts stage (recomputed from params: same source, seed and split sizes)."""
    from stitchvm.stages.prompts import read_source, split_prompts

    p = params.prompts
    table = split_prompts(read_source(p.source), p.train, p.val, p.test, params.seed)
    return [x for x, s in zip(table.column("prompt").to_pylist(), table.column("split").to_pylist()) if s == "test"]


def load_value_model(params: Params, backbone: Backbone, reward: ClipReward, root: str | None = None
                     ) -> tuple[StitchedValueModel, str]:
    """The trained value model under the storage root, else an untrained one at (value_i, value_j)."""
    from stitchvm.stages.runtime import Paths
    from stitchvm.stages.upstream import value_model_dir

    paths = Paths.from_params(params) if root is None else Paths(root=root, storage_options=params.storage.options)
    try:
        path = value_model_dir(paths.storage())
    except FileNotFoundError:
        cfg = params.guidance
        model = StitchedValueModel(backbone, reward, cfg.value_i, cfg.value_j)
        return model.eval(), f"untrained ({cfg.value_i}, {cfg.value_j})"
    model = StitchedValueModel.from_pretrained(path, backbone=backbone, reward=reward, device=backbone.device)
    return model.eval(), f"trained: {path}"


def setup(params: Params, root: str | None = None, device: str | None = None) -> Setup:
    from stitchvm.stages.runtime import models

    backbone, reward = models(params, device)
    value_model, source = load_value_model(params, backbone, reward, root)
    return Setup(backbone, reward, value_model, source, eval_prompts(params)[:params.guidance.prompts])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---- the benchmark -----------------------------------------------------------------------------------------------
def _worker(profile_file: str, method: str, root: str | None) -> dict:
    """One method in this process (the fresh subprocess of an isolated CPU measurement)."""
    from stitchvm.config import load_params

    params = load_params(profile_file)
    s = setup(params, root)
    return run_method(method, s.backbone, s.reward, s.value_model, s.prompts, params.guidance).row


def _isolated(profile_file: Path, method: str, root: str | None) -> dict:
    cmd = [sys.executable, "-m", "stitchvm.benchmarks.guidance", "--worker", method, "--profile-file",
           str(profile_file)] + (["--root", root] if root else [])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker for {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][4:])


def run(profile: str, out: str, count: bool = False, progress: bool = True, *, root: str | None = None,
        isolate: bool | None = None, resolutions: tuple[int, ...] | None = None) -> dict:
    """Run (or, with `count`, count) every method of `guidance.methods`; print a table and write the JSON to `out`.

    `root` overrides the profile's storage root (where a trained value model is looked for); `isolate` runs each
    method in a fresh subprocess (default: on CPU, where the peak is the process's high-water mark);
    `resolutions` overrides `guidance.count_resolutions` in counting mode.
    """
    name, params = load_profile(profile)
    cfg = params.guidance
    if count:
        from stitchvm.benchmarks.counting import count as count_rows, ratios

        bspec, rspec = count_models(params)
        rows = count_rows(bspec, rspec, cfg, resolutions, progress=progress)
        r = ratios(rows)
        report = {"device": f"meta (counted: FlopCounterMode + saved-tensor hooks; {bspec.dtype} bytes)",
                  "profile": name, "mode": "count", "backbone": bspec.source, "reward": rspec.source,
                  "reward_kind": rspec.kind, "pair": {"i": cfg.value_i, "j": cfg.value_j},
                  "guidance_scale": cfg.guidance_scale, "batch": 1, "rows": rows, "ratios": r,
                  "targets": {k: {"rule": f"{op} {v}", "value": r.get("1024", {}).get(k),
                                  "met": _met(op, v, r.get("1024", {}).get(k))} for k, (op, v) in TARGETS.items()}}
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        isolate = device.type == "cpu" if isolate is None else isolate
        s = None if isolate else setup(params, root)
        rows = []
        for method in cfg.methods:
            if progress:
                print(f"  running {method} …", flush=True)
            if isolate:
                rows.append(_isolated(profile_path(profile).resolve(), method, root))
            else:
                rows.append(run_method(method, s.backbone, s.reward, s.value_model, s.prompts, cfg).row)
        report = {"device": device_name(device), "profile": name, "mode": "run",
                  "backbone": params.backbone.source, "reward": params.reward.source,
                  "value_model": _value_source(params, root) if s is None else s.value_source,
                  "isolated": isolate, "config": to_dict(cfg), "rows": rows}
    print(format_table(report))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


def count_models(params: Params) -> tuple[ModelSpec, RewardSpec]:
    """The models counting mode builds on meta: the profile's when both are `arch:` presets, else the arch presets
    (SD3.5-Medium with the SD3 VAE, CLIP ViT-L/14) with the profile's reward kind."""
    if params.backbone.source.startswith("arch:") and params.reward.source.startswith("arch:"):
        return params.backbone, params.reward
    kind = params.reward.kind
    return (ModelSpec(ARCH_BACKBONE), RewardSpec(ARCH_REWARD, kind=kind, head="random" if kind == "aesthetic" else None))


def _value_source(params: Params, root: str | None) -> str:
    from stitchvm.stages.runtime import Paths
    from stitchvm.stages.upstream import value_model_dir

    paths = Paths.from_params(params) if root is None else Paths(root=root, storage_options=params.storage.options)
    try:
        return f"trained: {value_model_dir(paths.storage())}"
    except FileNotFoundError:
        return f"untrained ({params.guidance.value_i}, {params.guidance.value_j})"


def _met(op: str, bound: float, value) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def format_table(report: dict) -> str:
    rows = report["rows"]
    cols = [c for c in ("method", "resolution", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std",
                        "tflops_per_step", "saved_activation_gb") if any(c in r for r in rows)]

    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[k]) for b in body)) for k, c in enumerate(cols)]
    lines = [f"bench guidance: profile {report['profile']} on {report['device']}",
             "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    for res, r in report.get("ratios", {}).items():
        lines.append(f"{res}²: Tweedie/StitchVM FLOPs {r['tweedie_over_stitchvm_flops']:.3g}, StitchVM/unguided "
                     f"FLOPs {r['stitchvm_over_unguided_flops']:.3g}, StitchVM/Tweedie saved activations "
                     f"{cell(r['stitchvm_over_tweedie_saved'])}")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitchvm.benchmarks.guidance")
    parser.add_argument("--worker", required=True, help="the method to run in this process")
    parser.add_argument("--profile-file", required=True)
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    row = _worker(args.profile_file, args.worker, args.root)
    print("ROW " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
