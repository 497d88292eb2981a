"""The prepared GPU check: `make gpu-check`, i.e. `python -m stitchvm.benchmarks.gpu_check` (one H100, ≤ 8 minutes).

The `arch` profile (SD3.5-Medium and CLIP ViT-L/14 sizes, random weights; bfloat16 frozen weights, the value model's
trainable parts in float32 master weights under autocast) at each resolution (default: guidance.count_resolutions,
512² and 1024²):

- sampling: unguided, DPS-Tweedie and DPS-StitchVM (the stitch at guidance.value_i/value_j, untrained: the cost is
  the same), one prompt with CFG, `guidance.steps` steps; seconds per sample after a 2-step warm-up at the same size,
  and the CUDA allocator's peak (absolute, and above the memory in use before the call: weights and caches);
- value-model training: samples/s of `train_value_model` on random latents and random teacher targets (a step's
  cost does not depend on their values), timed after `--train-warmup` steps, and its peak.

Writes `reports/gpu_check.json` and prints the tables. Without CUDA it refuses in one line (exit 2), unless asked for
`--device cpu`: the CPU smoke of this script (tests/test_dtype.py runs it on the tiny presets in seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stitchvm.benchmarks import load_profile
from stitchvm.benchmarks.counting import PROMPT, latent_size
from stitchvm.config import ConfigError, GuidanceConfig, Params
from stitchvm.diffusion.sampling import initial_latents, sample
from stitchvm.guidance.dps import dps_stitchvm, dps_tweedie
from stitchvm.models.backbone import Backbone
from stitchvm.models.reward import ClipReward
from stitchvm.profiling import PeakMemory, device_name, synchronize
from stitchvm.stages.runtime import models, resolve_device
from stitchvm.stages.tables import format_table
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.training import TeacherTargets, train_value_model

METHODS = ("unguided", "dps-tweedie", "dps-stitchvm")
SAMPLE_COLUMNS = ("resolution", "method", "sec_per_sample", "peak_mem_gb", "peak_above_base_gb")
TRAIN_COLUMNS = ("resolution", "batch_size", "steps", "sec_per_step", "samples_per_s", "peak_mem_gb")
GIB = 2 ** 30


def timed(fn, device: torch.device) -> tuple[float, float | None, float | None]:
    """(seconds, absolute peak GiB, peak above the memory in use on entry GiB) of one call of `fn`; the peaks are the
    CUDA allocator's (on the CPU: the resident high-water mark above entry, no absolute)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # earlier methods' cached blocks do not count against this one
    with PeakMemory(device) as peak:  # CUDA: synchronize + reset_peak_memory_stats on entry, synchronize on exit
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    absolute = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return seconds, absolute, None if peak.mb is None else peak.mb / 1024


def sampling_row(method: str, backbone: Backbone, reward: ClipReward, value_model: StitchedValueModel,
                 cfg: GuidanceConfig, resolution: int, steps: int) -> dict:
    """One sample of `method` at `resolution`² (latent size resolution / vae_scale): time and peak memory."""
    size = latent_size(backbone, resolution)
    guidance = {"unguided": None, "dps-tweedie": lambda: dps_tweedie(reward, cfg.scale_tweedie),
                "dps-stitchvm": lambda: dps_stitchvm(value_model, cfg.scale_stitchvm)}[method]
    guidance = guidance and guidance()

    def once(n_steps: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(cfg.seed)
        z = initial_latents(backbone, 1, gen, size)  # (1, C, size, size) in the backbone's dtype
        return sample(backbone, [PROMPT], n_steps, cfg.guidance_scale, gen, guidance=guidance, eta=cfg.eta, latents=z)

    once(min(steps, 2))  # warm-up at this size: kernels, the prompt caches, the allocator's blocks
    seconds, peak, above = timed(lambda: once(steps), backbone.device)
    return {"resolution": resolution, "method": method, "sec_per_sample": seconds, "steps": steps,
            "peak_mem_gb": peak, "peak_above_base_gb": above}


def random_targets(reward: ClipReward, n: int, gen: torch.Generator) -> TeacherTargets:
    """(n, E) unit embeddings, (n, 1+P, D) tokens (and head scores for a scalar reward): what the teacher gives, in
    shape and dtype (float32), not in value."""
    p = reward.grid[0] * reward.grid[1]
    embeds = F.normalize(torch.randn(n, reward.clip.config.projection_dim, generator=gen), dim=-1)
    tokens = torch.randn(n, 1 + p, reward.width, generator=gen)
    scores = reward.head_scores(embeds.to(reward.image_mean.device))
    return TeacherTargets(embeds, tokens, None if scores is None else scores.cpu())


def training_row(value_model: StitchedValueModel, backbone: Backbone, params: Params, resolution: int, steps: int,
                 warmup: int, batch_size: int) -> dict:
    """`train_value_model` for warmup + steps steps on random latents at `resolution`²: samples/s after the warm-up."""
    size = latent_size(backbone, resolution)
    gen = torch.Generator().manual_seed(params.seed)
    z0 = torch.randn(batch_size, backbone.latent_channels, size, size, generator=gen)  # (N, C, h, w), float32 on CPU
    targets = random_targets(value_model.reward, batch_size, gen)
    cfg = dataclasses.replace(params.train, steps=warmup + steps, batch_size=batch_size, warmup_steps=0, group_size=1,
                              lambda_rank=0.0, checkpoint_every=warmup + steps)
    device = backbone.device
    stamps: list[float] = []

    def on_step(row: dict) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    _, peak, _ = timed(lambda: train_value_model(value_model, z0, targets, cfg, params.seed, progress=False,
                                                 on_step=on_step), device)
    sec_per_step = (stamps[-1] - stamps[warmup - 1]) / steps
    return {"resolution": resolution, "batch_size": batch_size, "steps": steps, "sec_per_step": sec_per_step,
            "samples_per_s": batch_size / sec_per_step, "peak_mem_gb": peak}


def ratios(rows: list[dict]) -> dict:
    """Per resolution: DPS-Tweedie / DPS-StitchVM time, DPS-StitchVM / unguided time, their peaks above base."""
    out = {}
    for res in dict.fromkeys(r["resolution"] for r in rows):
        by = {r["method"]: r for r in rows if r["resolution"] == res}
        tw, vm, un = by["dps-tweedie"], by["dps-stitchvm"], by["unguided"]
        tw_peak, vm_peak = tw["peak_above_base_gb"], vm["peak_above_base_gb"]
        out[str(res)] = {"tweedie_over_stitchvm_time": tw["sec_per_sample"] / vm["sec_per_sample"],
                         "stitchvm_over_unguided_time": vm["sec_per_sample"] / un["sec_per_sample"],
                         "stitchvm_over_tweedie_peak": vm_peak / tw_peak if tw_peak and vm_peak is not None else None}
    return out


def run(profile: str = "arch", device: str = "cuda", resolutions: tuple[int, ...] | None = None,
        steps: int | None = None, train_steps: int = 10, train_warmup: int = 3, train_batch: int | None = None,
        out: str | None = "reports/gpu_check.json", progress: bool = True) -> dict:
    """The check of the module docstring on `device`; prints the tables, writes the JSON to `out`, returns it."""
    if train_steps < 1 or train_warmup < 1:
        raise ValueError(f"train_steps and train_warmup must be >= 1, got {train_steps} and {train_warmup}")
    start = time.perf_counter()
    name, params = load_profile(profile)
    cfg = params.guidance
    resolutions = tuple(resolutions or cfg.count_resolutions)
    steps = steps or cfg.steps
    train_batch = train_batch or params.train.batch_size
    device = resolve_device(device)
    backbone, reward = models(params, device)
    value_model = StitchedValueModel(backbone, reward, cfg.value_i, cfg.value_j).eval()
    built = time.perf_counter() - start
    rows, train = [], []
    for res in resolutions:
        for method in METHODS:
            rows.append(sampling_row(method, backbone, reward, value_model, cfg, res, steps))
            if progress:
                print(f"  {method} at {res}²: {rows[-1]['sec_per_sample']:.3g} s/sample", flush=True)
    for res in resolutions:
        train.append(training_row(value_model, backbone, params, res, train_steps, train_warmup, train_batch))
        if progress:
            print(f"  training at {res}²: {train[-1]['samples_per_s']:.3g} samples/s", flush=True)
    value_model.eval()
    dev = torch.device(device)
    report = {
        "device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda, "profile": name,
        "backbone": params.backbone.source, "reward": params.reward.source,
        "dtype": {"backbone": params.backbone.dtype, "reward": params.reward.dtype,
                  "value_model_master": str(value_model.class_token.dtype).removeprefix("torch.")},
        "pair": {"i": cfg.value_i, "j": cfg.value_j}, "guidance_scale": cfg.guidance_scale, "steps": steps,
        "resolutions": list(resolutions), "rows": rows, "train": train, "ratios": ratios(rows),
        "build_s": built, "wall_s": time.perf_counter() - start,
    }
    print(format_report(report))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"gpu-check: profile {report['profile']} ({report['dtype']['backbone']} / {report['dtype']['reward']}) on "
             f"{report['device']}, torch {report['torch']}, {report['steps']} steps, built in {report['build_s']:.1f} s",
             format_table(report["rows"], SAMPLE_COLUMNS), "", "value-model training (random latents and targets)",
             format_table(report["train"], TRAIN_COLUMNS)]
    for res, r in report["ratios"].items():
        peak = r["stitchvm_over_tweedie_peak"]
        lines.append(f"{res}²: Tweedie/StitchVM time {r['tweedie_over_stitchvm_time']:.3g}, StitchVM/unguided time "
                     f"{r['stitchvm_over_unguided_time']:.3g}, StitchVM/Tweedie peak above base "
                     f"{'-' if peak is None else f'{peak:.3g}'}")
    lines.append(f"wall {report['wall_s']:.1f} s")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitchvm.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="arch", help="a profile name under profiles/ or a .yaml (default: arch)")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N (default: cuda); cpu: the CPU smoke of the "
                                                          "script (explicit only: $STITCHVM_DEVICE is not read)")
    parser.add_argument("--resolutions", type=_ints, default=None, help="pixel sizes, e.g. 512,1024 (default: "
                                                                        "guidance.count_resolutions)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: guidance.steps)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per resolution")
    parser.add_argument("--train-warmup", type=int, default=3, help="untimed training steps before them")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default: train.batch_size)")
    parser.add_argument("--out", default="reports/gpu_check.json", help="the JSON report")
    args = parser.parse_args(argv)
    device = args.device
    if device != "cpu" and not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA device; run it on a GPU (--device cpu: the CPU smoke "
              f"of this script)", file=sys.stderr)
        return 2
    try:
        run(args.profile, device, args.resolutions, args.steps, args.train_steps, args.train_warmup,
            args.train_batch, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
