"""Benchmark `align`: NFT vs NFT+StitchVM and DRaFT vs DRaFT+StitchVM at equal update counts, batch and steps.

`python -m stitchvm bench align --profile NAME --out PATH [--updates N]` runs every method in a fresh process (spawn)
on the profile's params (`align` section; `updates` overrides `align.updates`) and writes

    {"device": .., "profile": .., "updates": N, "value_model": "trained" | "untrained (timing only)",
     "rows": [{"method", "seed", "sec_per_update", "peak_mem_mb", "reward_before", "reward_after", "geneval_before",
               "geneval_after", "seconds_to_nft_final", "sampling_s", "reward_s", "update_s",
               "curve": [{"step", "wall_s", "eval_reward", "geneval"}]}],
     "speedup": {"nft": t_nft / t_nft-stitchvm, "draft": t_draft / t_draft-stitchvm}}

and `reports/bench_align.png` beside the JSON (true reward and GenEval vs training wall time, every method).

- sec_per_update: mean training wall time per update (sampling + reward + update; evaluation excluded), the first
  update left out as warm-up when there are at least 2.
- peak_mem_mb: CUDA allocator peak above the pre-training baseline, or on CPU the process's VmHWM above its RSS after a
  heap trim and a high-water-mark reset (stitchvm.profiling); includes the policy's transformer copy and adapters.
- reward_before / reward_after: mean true reward (decoded image, teacher) of fully denoised samples of the fixed
  evaluation prompts × seeds, from the base model and from the evaluated adapter (NFT: EMA weights).
- geneval_before / geneval_after: the world evaluator's fraction of those samples that satisfy their prompt (None
  off the embedded world). A reward gain without a GenEval gain is reward hacking.
- curve: the evaluation every `align.eval_every` updates against training wall time (evaluation excluded);
  seconds_to_nft_final: the wall time at which the method's GenEval curve first reaches NFT's final GenEval of the
  same seed (None if it never does), the paper's quantity (time to reach a quality).
- `seeds`: every method once per seed (`seed` replaced), where one seed is not conclusive.
The value model comes from the profile's storage root (`value_model/`, the `train` stage); when there is none
(e.g. `arch` on a GPU) an untrained stitched model at (i, j) = (min(4, depth), 1) stands in, for timing only.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import platform
from pathlib import Path

from stitchvm.stages import tables
from stitchvm.config import ALIGN_METHODS
from stitchvm.benchmarks import load_profile

COLUMNS = ("method", "seed", "sec_per_update", "peak_mem_mb", "reward_before", "reward_after", "geneval_before",
           "geneval_after", "seconds_to_nft_final")
ROW_KEYS = (*COLUMNS, "sampling_s", "reward_s", "update_s", "mean_tau")


def _prompts(params):
    """(train, eval) prompts of the profile, split as the `prompts` stage does (recomputed from params, as `bench
    guidance` does): a profile that shares another's storage root but takes more test prompts (e.g. `geneval33` on
    the default pipeline's data) evaluates on its own split, not on the stored prompts.parquet."""
    from stitchvm.stages.align import split_prompts
    from stitchvm.stages.prompts import prompt_table

    return split_prompts(prompt_table(params), params.align)


def _value_model(params, backbone, reward):
    from stitchvm.stages.upstream import value_model_dir
    from stitchvm.data.storage import open_root
    from stitchvm.value.model import StitchedValueModel

    try:
        folder = value_model_dir(open_root(params.storage.root, params.storage.options))
    except FileNotFoundError:
        model = StitchedValueModel(backbone, reward, min(4, backbone.depth), 1)
        return model.to(backbone.device).eval(), "untrained (timing only)"
    return StitchedValueModel.from_pretrained(folder, backbone=backbone, reward=reward,
                                              device=backbone.device).eval(), "trained"


def measure(profile: str, method: str, updates: int | None, seed: int | None = None) -> dict:
    """One method in this process: train `updates` updates evaluating every `align.eval_every`, return its row (run
    in a fresh process). Peak memory includes the evaluations' sampling."""
    import torch

    from stitchvm.alignment.trainer import PolicyEvalSet
    from stitchvm.profiling import PeakMemory
    from stitchvm.stages.align import train_adapter
    from stitchvm.stages.geneval import curve_geneval
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.runtime import models
    from stitchvm.stages.upstream import prompt_specs

    _, params = load_profile(profile)
    cfg = dataclasses.replace(params.align, method=method, updates=updates or params.align.updates)
    params = dataclasses.replace(params, align=cfg, **({} if seed is None else {"seed": seed}))
    backbone, reward = models(params)
    train_prompts, eval_prompts = _prompts(params)
    value_model, vm_kind = _value_model(params, backbone, reward) if method.endswith("stitchvm") else (None, None)
    evalset = PolicyEvalSet(tuple(eval_prompts), tuple(cfg.eval_seeds), cfg.eval_steps or cfg.steps, cfg.eval_guidance_scale)
    device = backbone.device
    with PeakMemory(device) as peak:
        policy, history = train_adapter(params, backbone, reward, train_prompts, evalset, value_model)
    rows = [r for r in history if r["step"] > 0]
    timed = rows[1:] if len(rows) >= 2 else rows
    evaluated = [r for r in history if "eval_reward" in r]  # step 0 (the base model) first, the last update last
    geneval = curve_geneval(params, backbone, [z0 for _, z0 in evalset.results], evalset.expanded()[0],
                            prompt_specs(prompt_table(params)))
    curve = [{"step": r["step"], "wall_s": round(r["wall_s"], 3), "eval_reward": round(r["eval_reward"], 5),
              "geneval": g} for r, g in zip(evaluated, geneval)]
    return {
        "method": method, "seed": params.seed,
        "sec_per_update": sum(r["sampling_s"] + r["reward_s"] + r["update_s"] for r in timed) / len(timed),
        "peak_mem_mb": None if peak.mb is None else round(peak.mb, 1),
        "reward_before": curve[0]["eval_reward"], "reward_after": curve[-1]["eval_reward"],
        "geneval_before": curve[0]["geneval"], "geneval_after": curve[-1]["geneval"], "curve": curve,
        **{f"{p}_s": sum(r[f"{p}_s"] for r in timed) / len(timed) for p in ("sampling", "reward", "update")},
        "mean_tau": sum(r["tau"] for r in rows) / len(rows), "value_model": vm_kind,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }


def seconds_to_reach(curve: list[dict], target: float | None) -> float | None:
    """The wall time of the first evaluation whose GenEval reaches `target` (None: never, or no GenEval)."""
    if target is None:
        return None
    return next((r["wall_s"] for r in curve if r["geneval"] is not None and r["geneval"] >= target), None)


def run(profile: str, out: str, updates: int | None = None, progress: bool = True,
        methods: tuple[str, ...] = ALIGN_METHODS, seeds: tuple[int, ...] | None = None) -> dict:
    """Every method (per seed of `seeds`, default the profile's) in a fresh spawned process; prints the table, writes
    the JSON to `out` and the curves' figure beside it, returns the report."""
    from stitchvm.stages.plots import alignment_curves

    unknown = [m for m in methods if m not in ALIGN_METHODS]
    if unknown or len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"bench align methods {list(methods)}: each one of {', '.join(ALIGN_METHODS)}, no repeats")
    _, params = load_profile(profile)  # fail early on a bad profile
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for seed in seeds or (params.seed,):
        for method in methods:
            if progress:
                print(f"bench align: {method} (seed {seed}) ...", flush=True)
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(measure, (profile, method, updates, seed)))
    nft_final = {r["seed"]: r["geneval_after"] for r in rows if r["method"] == "nft"}
    for r in rows:
        r["seconds_to_nft_final"] = seconds_to_reach(r["curve"], nft_final.get(r["seed"]))
    means = seed_means(rows) if len({r["seed"] for r in rows}) > 1 else None
    speedup = {base: round(_mean(rows, base) / _mean(rows, f"{base}-stitchvm"), 3)
               for base in ("nft", "draft") if base in methods and f"{base}-stitchvm" in methods}
    kinds = {r["value_model"] for r in rows if r["value_model"]}
    report = {"device": rows[0]["device_name"] if rows else None, "profile": profile,
              "updates": updates or params.align.updates, "eval_every": params.align.eval_every,
              "value_model": kinds.pop() if len(kinds) == 1 else sorted(kinds) or None,
              "rows": [{k: r[k] for k in (*ROW_KEYS, "curve")} for r in rows], "speedup": speedup,
              **({"mean_over_seeds": means} if means else {})}
    print(format_table(report))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    curves = ({f"{m} (mean of {v['seeds']} seeds)": v["curve"] for m, v in means.items()} if means else
              {f"{r['method']} (seed {r['seed']})": r["curve"] for r in rows})
    path.with_suffix(".png").write_bytes(alignment_curves(curves))
    return report


def seed_means(rows: list[dict]) -> dict:
    """{method: {"seeds", "curve": the evaluations averaged over seeds (wall_s, eval_reward, geneval), "geneval_before",
    "geneval_after", "seconds_to_nft_final" on the mean curves}}: one seed's evaluation is noisy (48 samples: ±0.07),
    so the time to reach a quality is read off the seeds' mean. Every seed of a method has the same evaluation steps."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        curves = [r["curve"] for r in rows if r["method"] == method]
        if len({tuple(c["step"] for c in curve) for curve in curves}) != 1:
            raise ValueError(f"the seeds of {method} were evaluated at different steps: no mean curve")
        curve = [{"step": points[0]["step"],
                  **{k: None if any(p[k] is None for p in points) else sum(p[k] for p in points) / len(points)
                     for k in ("wall_s", "eval_reward", "geneval")}} for points in zip(*curves)]
        out[method] = {"seeds": len(curves), "curve": curve, "geneval_before": curve[0]["geneval"],
                       "geneval_after": curve[-1]["geneval"]}
    nft_final = out.get("nft", {}).get("geneval_after")
    for v in out.values():
        v["seconds_to_nft_final"] = seconds_to_reach(v["curve"], nft_final)
    return out


def _mean(rows: list[dict], method: str) -> float:
    values = [r["sec_per_update"] for r in rows if r["method"] == method]
    return sum(values) / len(values)


def format_table(report: dict) -> str:
    lines = [f"bench align on {report['device']} (profile {report['profile']}, {report['updates']} updates, "
             f"value model: {report['value_model']})",
             tables.format_table(report["rows"], COLUMNS, drop_missing=False)]
    lines += [f"speedup per update ({k} / {k}-stitchvm): {v:.3g}x" for k, v in report["speedup"].items()]
    for method, v in report.get("mean_over_seeds", {}).items():
        cell = tables.format_cell
        lines.append(f"mean of {v['seeds']} seeds, {method}: GenEval {cell(v['geneval_before'])} -> "
                     f"{cell(v['geneval_after'])}, reaches NFT's final at {cell(v['seconds_to_nft_final'])} s")
    return "\n".join(lines)
