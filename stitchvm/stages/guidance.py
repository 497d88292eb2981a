"""Stage `guidance`: the trained value model at work, every guided sampler against the unguided one.

Runs each method of `guidance.methods` (unguided, DPS-Tweedie, DPS-StitchVM, FK with Tweedie / value potentials,
best-of-N by the true reward) on the same test prompts and seeds, with the trained value model (`value_model/`) and
the models of the params. Writes `reports/guidance.json` (rows as `bench guidance`: method, sec_per_sample,
peak_mem_mb, reward_mean, reward_std; measured in this process), `reports/guidance.png` (one row of decoded samples
per method, the same seed in each column, each tile captioned with its true reward) and
`reports/guidance/<method>.png` (unguided above the method, for every other method); logs them to the training's
MLflow run (a run of its own when training was not tracked).
"""
from __future__ import annotations

import json

import torch

from stitchvm.config import Params, to_dict
from stitchvm.guidance.methods import MethodRun, run_method
from stitchvm.profiling import device_name
from stitchvm.stages import plots
from stitchvm.stages.plots import image_grid
from stitchvm.stages.runtime import Paths, models
from stitchvm.stages.tables import format_cell, format_table
from stitchvm.stages.geneval import geneval_columns
from stitchvm.stages.upstream import prompt_specs, prompts_in_split, read_prompts, read_train_summary, value_model_dir
from stitchvm.value.model import StitchedValueModel

def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    cfg = params.guidance
    storage = paths.storage()
    backbone, reward = models(params)
    model = StitchedValueModel.from_pretrained(value_model_dir(storage), backbone=backbone, reward=reward,
                                               device=backbone.device).eval()
    table = read_prompts(storage)
    prompts = prompts_in_split(table, "test")[:cfg.prompts]
    runs: dict[str, MethodRun] = {}
    for method in cfg.methods:
        if progress:
            print(f"guidance: {method} …", flush=True)
        runs[method] = run_method(method, backbone, reward, model, prompts, cfg)
        # the independent evaluator: is a reward gain real?
        runs[method].row.update(geneval_columns(params, backbone, runs[method].latents, runs[method].prompts,
                                                prompt_specs(table)))
    images = {m: decode_images(backbone, r.latents, cfg.batch_size) for m, r in runs.items()}
    paths.reports.mkdir(parents=True, exist_ok=True)
    grid_dir = paths.reports / "guidance"
    grid_dir.mkdir(parents=True, exist_ok=True)
    headers = next(iter(runs.values())).prompts
    pngs = {"guidance.png": image_grid([(m, images[m], runs[m].rewards) for m in runs], headers)}
    if "unguided" in runs:
        for m in runs:
            if m != "unguided":
                pngs[f"guidance/{m}.png"] = image_grid([("unguided", images["unguided"], runs["unguided"].rewards),
                                                        (m, images[m], runs[m].rewards)], headers)
    files = {}
    for name, png in pngs.items():
        (paths.reports / name).write_bytes(png)
        files[name] = str(paths.reports / name)
    rows = [r.row for r in runs.values()]
    report = {"device": device_name(backbone.device), "profile": "params", "mode": "stage",
              "backbone": params.backbone.source, "reward": params.reward.source,
              "value_model": {"path": str(value_model_dir(storage)), "i": model.i, "j": model.j},
              "prompts": prompts, "config": to_dict(cfg), "rows": rows, "grids": files}
    (paths.reports / "guidance.json").write_text(json.dumps(report, indent=2))
    files["guidance.json"] = str(paths.reports / "guidance.json")
    summary = {"rows": rows, "table": format_report(report), "report": files["guidance.json"],
               "grid": files["guidance.png"], "grids": {k: v for k, v in files.items() if k.startswith("guidance/")},
               "pair": {"i": model.i, "j": model.j}, "device": report["device"],
               "reward_mean": {r["method"]: r["reward_mean"] for r in rows},
               "sec_per_sample": {r["method"]: r["sec_per_sample"] for r in rows},
               "peak_mem_mb": {r["method"]: r["peak_mem_mb"] for r in rows}}
    if all("geneval" in r for r in rows):
        summary["geneval"] = {r["method"]: r["geneval"] for r in rows}
    if "unguided" in runs:
        base = runs["unguided"].row["reward_mean"]
        summary["reward_gain"] = {r["method"]: r["reward_mean"] - base for r in rows if r["method"] != "unguided"}
    if progress:
        print(summary["table"])
    if paths.track:
        summary["mlflow"] = track_guidance(params, storage, report, pngs)
    return summary


@torch.no_grad()
def decode_images(backbone, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(S, C, h, w) latents -> (S, H, W, 3) uint8 images."""
    return torch.cat([plots.to_uint8(backbone.decode(latents[k:k + batch_size].to(backbone.device, backbone.vae.dtype)))
                      for k in range(0, len(latents), batch_size)])


def track_guidance(params: Params, storage, report: dict, pngs: dict[str, bytes]) -> dict:
    from stitchvm.stages import tracking

    try:
        run_id = read_train_summary(storage).get("run_id")
    except FileNotFoundError:
        run_id = None
    cfg = params.mlflow
    metrics = {f"guidance/{r['method']}/{k}": float(r[k]) for r in report["rows"]
               for k in ("sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std", "geneval")
               if r.get(k) is not None}
    run_id = tracking.log_report(cfg.experiment, report, "guidance.json", pngs, metrics, run_id=run_id,
                                 run_name="guidance", tracking_uri=cfg.tracking_uri)
    return {"logged": True, "run_id": run_id}


def format_report(report: dict) -> str:
    """The guidance table of a report (this stage's or `bench guidance`'s): one row per method."""
    columns = ("method", "resolution", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std", "geneval",
               "tflops_per_step", "saved_activation_gb")
    lines = [f"bench guidance: profile {report['profile']} on {report['device']}", format_table(report["rows"], columns)]
    for res, r in report.get("ratios", {}).items():
        lines.append(f"{res}²: Tweedie/StitchVM FLOPs {r['tweedie_over_stitchvm_flops']:.3g}, StitchVM/unguided "
                     f"FLOPs {r['stitchvm_over_unguided_flops']:.3g}, StitchVM/Tweedie saved activations "
                     f"{format_cell(r['stitchvm_over_tweedie_saved'])}")
    return "\n".join(lines)
