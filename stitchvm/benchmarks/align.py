"""Benchmark `align`: NFT vs NFT+StitchVM and DRaFT vs DRaFT+StitchVM at equal update counts, batch and steps.

`python -m stitchvm bench align --profile NAME --out PATH [--updates N]` runs every method in a fresh process (spawn)
on the profile's params (`align` section; `updates` overrides `align.updates`) and writes

    {"device": .., "profile": .., "updates": N, "value_model": "trained" | "untrained (timing only)",
     "rows": [{"method", "sec_per_update", "peak_mem_mb", "reward_before", "reward_after", "sampling_s", "reward_s",
               "update_s"}], "speedup": {"nft": t_nft / t_nft-stitchvm, "draft": t_draft / t_draft-stitchvm}}

- sec_per_update: mean training wall time per update (sampling + reward + update; evaluation excluded), the first
  update left out as warm-up when there are at least 2.
- peak_mem_mb: CUDA allocator peak above the pre-training baseline, or on CPU the process's VmHWM above its RSS after a
  heap trim and a high-water-mark reset (stitchvm.profiling); includes the policy's transformer copy and adapters.
- reward_before / reward_after: mean true reward (decoded image, teacher) of fully denoised samples of the fixed
  evaluation prompts × seeds, from the base model and from the evaluated adapter (NFT: EMA weights).
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

COLUMNS = ("method", "sec_per_update", "peak_mem_mb", "reward_before", "reward_after", "sampling_s", "reward_s",
           "update_s")


def _prompts(params):
    """(train, eval) prompts: from the profile's prompts.parquet when the pipeline ran, else split as `prompts` does."""
    from stitchvm.data.storage import open_root
    from stitchvm.stages.align import split_prompts
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.upstream import PROMPTS, read_prompts

    storage = open_root(params.storage.root, params.storage.options)
    return split_prompts(read_prompts(storage) if storage.exists(PROMPTS) else prompt_table(params), params.align)


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


def measure(profile: str, method: str, updates: int | None) -> dict:
    """One method in this process: train `updates` updates, return its row (run in a fresh process)."""
    import torch

    from stitchvm.alignment.trainer import PolicyEvalSet, evaluate_policy
    from stitchvm.profiling import PeakMemory
    from stitchvm.stages.align import eval_adapter, train_adapter
    from stitchvm.stages.runtime import models

    _, params = load_profile(profile)
    cfg = dataclasses.replace(params.align, method=method, updates=updates or params.align.updates)
    params = dataclasses.replace(params, align=cfg)
    backbone, reward = models(params)
    train_prompts, eval_prompts = _prompts(params)
    value_model, vm_kind = _value_model(params, backbone, reward) if method.endswith("stitchvm") else (None, None)
    evalset = PolicyEvalSet(tuple(eval_prompts), tuple(cfg.eval_seeds), cfg.eval_steps or cfg.steps, cfg.eval_guidance_scale)
    reward_before, _, _ = evaluate_policy(backbone, reward, evalset, cfg.batch_size)
    device = backbone.device
    with PeakMemory(device) as peak:
        policy, history = train_adapter(params, backbone, reward, train_prompts, None, value_model)
    rows = [r for r in history if r["step"] > 0]
    timed = rows[1:] if len(rows) >= 2 else rows
    with policy.use(eval_adapter(cfg)) as tuned:
        reward_after, _, _ = evaluate_policy(tuned, reward, evalset, cfg.batch_size)
    return {
        "method": method,
        "sec_per_update": sum(r["sampling_s"] + r["reward_s"] + r["update_s"] for r in timed) / len(timed),
        "peak_mem_mb": None if peak.mb is None else round(peak.mb, 1),
        "reward_before": reward_before, "reward_after": reward_after,
        **{f"{p}_s": sum(r[f"{p}_s"] for r in timed) / len(timed) for p in ("sampling", "reward", "update")},
        "mean_tau": sum(r["tau"] for r in rows) / len(rows), "value_model": vm_kind,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }


def run(profile: str, out: str, updates: int | None = None, progress: bool = True,
        methods: tuple[str, ...] = ALIGN_METHODS) -> dict:
    """Every method in a fresh spawned process; prints the table, writes the JSON to `out`, returns it."""
    load_profile(profile)  # fail early on a bad profile
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for method in methods:
        if progress:
            print(f"bench align: {method} ...", flush=True)
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(measure, (profile, method, updates)))
    by = {r["method"]: r for r in rows}
    speedup = {base: round(by[base]["sec_per_update"] / by[f"{base}-stitchvm"]["sec_per_update"], 3)
               for base in ("nft", "draft") if base in by and f"{base}-stitchvm" in by}
    kinds = {r["value_model"] for r in rows if r["value_model"]}
    report = {"device": rows[0]["device_name"] if rows else None, "profile": profile,
              "updates": updates or load_profile(profile)[1].align.updates,
              "value_model": kinds.pop() if len(kinds) == 1 else sorted(kinds) or None,
              "rows": [{k: r[k] for k in (*COLUMNS, "mean_tau")} for r in rows], "speedup": speedup}
    print(format_table(report))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict) -> str:
    lines = [f"bench align on {report['device']} (profile {report['profile']}, {report['updates']} updates, "
             f"value model: {report['value_model']})",
             tables.format_table(report["rows"], [*COLUMNS, "mean_tau"], drop_missing=False)]
    lines += [f"speedup per update ({k} / {k}-stitchvm): {v:.3g}x" for k, v in report["speedup"].items()]
    return "\n".join(lines)
