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
With 1024 among the resolutions it adds SD3.5-Large and FLUX.1-dev at 1024² ("backbones", "backbone_ratios").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from stitchvm.models.backbone import Backbone
from stitchvm.config import GuidanceConfig, ModelSpec, Params, RewardSpec, to_dict
from stitchvm.guidance.methods import method_config, run_method
from stitchvm.models.reward import ClipReward
from stitchvm.profiling import device_name
from stitchvm.stages.guidance import format_report
from stitchvm.stages.tables import format_cell
from stitchvm.value.model import StitchedValueModel
from stitchvm.benchmarks import load_profile, profile_path
from stitchvm.benchmarks.geneval_uncertainty import macro_mean_se, paired_differences, verdicts_by_prompt

ARCH_BACKBONE, ARCH_REWARD = "arch:sd3.5-medium", "arch:clip-vit-l-14"
ROW_KEYS = ("method", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std")
TARGETS = {"tweedie_over_stitchvm_flops": (">=", 2.7), "stitchvm_over_unguided_flops": ("<=", 1.2),
           "stitchvm_over_tweedie_saved": ("<=", 0.1)}  # at 1024² (the paper's proportions: 3.2× faster DPS at half the memory)


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
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.upstream import prompts_in_split

    return prompts_in_split(prompt_table(params), "test")


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


# ---- the benchmark -----------------------------------------------------------------------------------------------
def _worker(profile_file: str, method: str, root: str | None, best_of_n: int | None) -> dict:
    """One method in this process (the fresh subprocess of an isolated CPU measurement)."""
    from stitchvm.config import load_params

    params = load_params(profile_file)
    cfg = params.guidance if best_of_n is None else dataclasses.replace(params.guidance, best_of_n=best_of_n)
    return judged_row(params, setup(params, root), method, cfg)


def judged_row(params: Params, s: Setup, method: str, cfg: GuidanceConfig) -> dict:
    """`method`'s row under `cfg`, with the world evaluator's columns where its prompts carry specs: `geneval`,
    `geneval_se` (`geneval_uncertainty.macro_mean_se`), `geneval_by_category` and `verdicts` ({prompt: [1 / 0 per
    sample]})."""
    from stitchvm.stages.geneval import judge_latents
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.upstream import prompt_specs

    run = run_method(method, s.backbone, s.reward, s.value_model, s.prompts, cfg)
    specs = prompt_specs(prompt_table(params))
    judged = judge_latents(params, s.backbone, run.latents, run.prompts, specs)
    if judged is None:
        return run.row
    accuracy = dict(judged[0])
    verdicts = verdicts_by_prompt(judged[1].tolist(), run.prompts)
    category_of = {p: specs[p][0] for p in verdicts}
    return {**run.row, "geneval": accuracy.pop("overall"), "geneval_se": macro_mean_se(verdicts, category_of)[1],
            "geneval_by_category": accuracy, "verdicts": verdicts}


def _isolated(profile_file: Path, method: str, root: str | None, cfg: GuidanceConfig) -> dict:
    cmd = [sys.executable, "-m", "stitchvm.benchmarks.guidance", "--worker", method, "--profile-file",
           str(profile_file), "--best-of-n", str(cfg.best_of_n)] + (["--root", root] if root else [])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker for {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][4:])


def run(profile: str, out: str, count: bool = False, progress: bool = True, *, root: str | None = None,
        isolate: bool | None = None, resolutions: tuple[int, ...] | None = None,
        methods: tuple[str, ...] | None = None) -> dict:
    """Run (or, with `count`, count) every method of `guidance.methods`; print a table and write the JSON to `out`.

    `root` overrides the profile's storage root (where a trained value model is looked for); `isolate` runs each
    method in a fresh subprocess (default: on CPU, where the peak is the process's high-water mark);
    `resolutions` overrides `guidance.count_resolutions` in counting mode; `methods` overrides `guidance.methods`
    (checked as params are: e.g. best-of-n-matched after unguided and fk-stitchvm).
    """
    name, params = load_profile(profile)
    if methods:
        params = dataclasses.replace(params, guidance=dataclasses.replace(params.guidance, methods=tuple(methods)))
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
        if 1024 in (resolutions or cfg.count_resolutions):  # SD3.5-Large and FLUX.1-dev rows at 1024²
            from stitchvm.benchmarks.counting import backbone_ratios, count_backbones

            report["backbones"] = count_backbones(rspec, cfg, bspec.dtype, progress=progress)
            report["backbone_ratios"] = backbone_ratios(report["backbones"])
    else:
        from stitchvm.stages.runtime import stage_device

        device = torch.device(stage_device(params))
        isolate = device.type == "cpu" if isolate is None else isolate
        s = None if isolate else setup(params, root)
        rows, seconds = [], {}
        for method in cfg.methods:
            if progress:
                print(f"  running {method} …", flush=True)
            method_cfg = method_config(method, cfg, seconds)
            rows.append(_isolated(profile_path(profile).resolve(), method, root, method_cfg) if isolate
                        else judged_row(params, s, method, method_cfg))
            seconds[method] = rows[-1]["sec_per_sample"]
        report = {"device": device_name(device), "profile": name, "mode": "run",
                  "backbone": params.backbone.source, "reward": params.reward.source,
                  "value_model": _value_source(params, root) if s is None else s.value_source,
                  "isolated": isolate, "config": to_dict(cfg), "rows": rows}
        if any("verdicts" in r for r in rows):
            from stitchvm.stages.prompts import prompt_table
            from stitchvm.stages.upstream import prompt_specs

            category_of = {p: c for p, (c, _) in prompt_specs(prompt_table(params)).items()}
            report["paired_geneval"] = paired_differences(rows, category_of)
    print(format_report(report))
    for d in report.get("paired_geneval", []):
        print(f"GenEval {d['a']} - {d['b']}: {d['diff']:+.3f} ± {format_cell(d['se'])} "
              "(paired, same prompts and seeds)")
    if report.get("backbones"):
        from stitchvm.benchmarks.counting import format_backbone_rows

        print(format_backbone_rows(report["backbones"]))
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


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitchvm.benchmarks.guidance")
    parser.add_argument("--worker", required=True, help="the method to run in this process")
    parser.add_argument("--profile-file", required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--best-of-n", type=int, default=None, help="best-of-N's N (best-of-n-matched)")
    args = parser.parse_args(argv)
    row = _worker(args.profile_file, args.worker, args.root, args.best_of_n)
    print("ROW " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
