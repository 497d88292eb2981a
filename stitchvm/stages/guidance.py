"""Stage `guidance`: the trained value model at work, every guided sampler against the unguided one.

Runs each method of `guidance.methods` (unguided, DPS-Tweedie, DPS-StitchVM, FK with Tweedie / value potentials,
best-of-N by the true reward) on the same test prompts and seeds, with the trained value model (`value_model/`) and
the models of the params. Writes `reports/guidance.json` (rows as `bench guidance`: method, reward_mean, reward_std,
…), `reports/guidance.png` (one row of decoded samples per method, the same seed in each column, each tile captioned
with its true reward) and `reports/guidance/<method>.png` (unguided above the method, for every other method) and, where the evaluator applies,
`reports/guidance/geneval_by_category.png` (GenEval per category and method); logs
them to the training's MLflow run (a run of its own when training was not tracked). What the clock and the machine
decide (each method's sec_per_sample and peak_mem_mb, measured in this process; the device; the value model's folder)
and the MLflow run go to the run record `reports/runs/guidance.json` (stitchvm/stages/run_record.py), not to the DVC
outputs; the returned summary holds both.
"""
from __future__ import annotations

import json

import torch

from stitchvm.config import Params, to_dict
from stitchvm.guidance.methods import MethodRun, run_methods
from stitchvm.profiling import device_name
from stitchvm.stages import plots
from stitchvm.stages.plots import image_grid
from stitchvm.stages.runtime import Paths, models
from stitchvm.stages.tables import format_cell, format_table
from stitchvm.stages.geneval import geneval_columns
from stitchvm.stages.run_record import repo_relative, split_fields, split_rows, write_record
from stitchvm.stages.upstream import prompt_specs, prompts_in_split, read_prompts, read_train_run, value_model_dir
from stitchvm.value.model import StitchedValueModel

TIMED = ("sec_per_sample", "peak_mem_mb")  # measured per method: the run record's, keyed by method


def split_report(report: dict) -> tuple[dict, dict]:
    """(guidance.json: the report less what the clock and the machine decide, the run record: the device, where the
    value model was read, and each method's sec_per_sample and peak_mem_mb keyed by method)."""
    quality, record = split_fields(report, ("device",))
    quality["value_model"], record["value_model"] = split_fields(report["value_model"], ("path",))
    quality["rows"], record["rows"] = split_rows(report["rows"], TIMED, key=("method",))
    return quality, record


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    cfg = params.guidance
    storage = paths.storage()
    backbone, reward = models(params)
    model = StitchedValueModel.from_pretrained(value_model_dir(storage), backbone=backbone, reward=reward,
                                               device=backbone.device).eval()
    table = read_prompts(storage)
    prompts = prompts_in_split(table, "test")[:cfg.prompts]
    runs: dict[str, MethodRun] = {}
    for method, run in run_methods(cfg.methods, backbone, reward, model, prompts, cfg, progress):
        # the independent evaluator: is a reward gain real?
        run.row.update(geneval_columns(params, backbone, run.latents, run.prompts, prompt_specs(table)))
        runs[method] = run
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
    if all(r.row.get("geneval_by_category") for r in runs.values()):
        pngs["guidance/geneval_by_category.png"] = plots.geneval_bars([r.row for r in runs.values()])
    files = {}
    for name, png in pngs.items():
        (paths.reports / name).write_bytes(png)
        files[name] = repo_relative(paths.reports / name)
    rows = [r.row for r in runs.values()]
    report = {"device": device_name(backbone.device), "profile": "params", "mode": "stage",
              "backbone": params.backbone.source, "reward": params.reward.source,
              "value_model": {"path": repo_relative(value_model_dir(storage)), "i": model.i, "j": model.j},
              "prompts": prompts, "config": to_dict(cfg), "rows": rows, "grids": dict(files)}
    quality, record = split_report(report)
    (paths.reports / "guidance.json").write_text(json.dumps(quality, indent=2))
    files["guidance.json"] = repo_relative(paths.reports / "guidance.json")
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
        summary["mlflow"] = record["mlflow"] = track_guidance(params, paths.reports, report, pngs)
    write_record(paths.reports, "guidance", record)
    return summary


@torch.no_grad()
def decode_images(backbone, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(S, C, h, w) latents -> (S, H, W, 3) uint8 images."""
    return torch.cat([plots.to_uint8(backbone.decode(latents[k:k + batch_size].to(backbone.device, backbone.vae.dtype)))
                      for k in range(0, len(latents), batch_size)])


def track_guidance(params: Params, reports, report: dict, pngs: dict[str, bytes]) -> dict:
    from stitchvm.stages import tracking

    try:
        run_id = read_train_run(reports)["run_id"]
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
