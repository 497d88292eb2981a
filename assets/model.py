"""Model assets: search, truth, train, evaluate (each calls its stage) and the evaluation gate check."""
from __future__ import annotations

import json

from dagster import AssetCheckResult, AssetCheckSeverity, MaterializeResult, MetadataValue, asset, asset_check

from stitchvm.stages import GRAPH
from stitchvm.stages.upstream import SEARCH, VALUE_MODEL

from assets.metadata import md_table, png_md, stage_doc as doc
from assets.resources import MlflowResource, StitchVMResource

GROUP = "model"
EVAL_COLUMNS = ("sigma", "method", "spearman", "spearman_within_prompt", "spearman_within_prompt_vs_mc", "pearson",
                "recall_at_1", "distill_loss", "ms_per_eval", "peak_mem_mb")


@asset(group_name=GROUP, deps=list(GRAPH["search"]), pool="gpu", description=doc("search"))
def search(stitchvm: StitchVMResource) -> MaterializeResult:
    _, paths, summary = stitchvm.run_stage("search")
    table = sorted(summary["table"], key=lambda r: r["error"])
    return MaterializeResult(metadata={
        "pair": MetadataValue.json(summary["pair"]),
        "best_error": float(summary["error"]),
        "pairs_searched": len(table),
        "kernel": summary["kernel"],  # F's kernel; with k > 1 the chosen pair's k×k fit error too
        **({} if summary["kernel_error"] is None else {"kernel_error": float(summary["kernel_error"])}),
        "path": MetadataValue.path(summary["path"]),
        "error_table": md_table(table[:10], ["i", "j", "error"]),
        "heatmap": png_md(paths.storage().read_bytes(f"{SEARCH}/heatmap.png"), "stitch search heatmap"),
    })


@asset(group_name=GROUP, deps=list(GRAPH["truth"]), pool="gpu", description=doc("truth"))
def truth(stitchvm: StitchVMResource) -> MaterializeResult:
    _, _, summary = stitchvm.run_stage("truth")  # the summary with its run record's seconds
    return MaterializeResult(metadata={
        "rollouts": summary["rollouts"],
        "sigmas": MetadataValue.json(summary["sigmas"]),
        "dagster/row_count": summary["latents"],  # noisy test latents valued at each σ
        "mean_value": MetadataValue.json(summary["mean_value"]),  # the mean true value per σ
        "seconds": summary["seconds"],
        "reused": summary["reused"],  # the stored truth was made by these inputs: kept, no rollouts
        "path": MetadataValue.path(summary["path"]),
    })


@asset(group_name=GROUP, deps=list(GRAPH["train"]), pool="gpu", description=doc("train"))
def train(stitchvm: StitchVMResource, mlflow: MlflowResource) -> MaterializeResult:
    params, paths, summary = stitchvm.run_stage("train")  # the summary with its run record (timings, MLflow run)
    run_id, version = summary.get("run_id"), summary.get("model_version")
    name = params.mlflow.registered_model
    metadata = {
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "samples_per_s": summary["samples_per_s"],
        **{k: summary[k] for k in ("first_loss", "final_loss") if summary[k] is not None},  # None: no stage 2
        "fit": MetadataValue.json(summary["fit"]),  # stage 1b: its steps and its first and final normalised error
        "pair": MetadataValue.json(summary["pair"]),
        "path": MetadataValue.path(paths.storage().path(VALUE_MODEL)),  # absolute (the run record's is relative)
        "curve": png_md(paths.storage().read_bytes("train/curve.png"), "training curve"),
        "mlflow_run_id": MetadataValue.text(run_id or "(not tracked)"),
        "model_version": MetadataValue.text(f"{name}/{version}" if version else "(not registered)"),
    }
    if run_id and (url := mlflow.run_url(run_id, summary.get("tracking_uri"))):
        metadata["mlflow_run_url"] = MetadataValue.url(url)
    if version and (url := mlflow.model_version_url(name, version)):
        metadata["model_version_url"] = MetadataValue.url(url)
    return MaterializeResult(metadata=metadata)


@asset(group_name=GROUP, deps=list(GRAPH["evaluate"]), pool="gpu", description=doc("evaluate"))
def evaluate(stitchvm: StitchVMResource, mlflow: MlflowResource) -> MaterializeResult:
    params, paths, report = stitchvm.run_stage("evaluate")  # rows with their timings (eval.json has none)
    gate, tracked = report["gate"], report.get("mlflow", {})
    (row,) = [r for r in report["eval"] if r["method"] == "stitchvm" and r["sigma"] == gate["sigma"]]
    metadata = {
        "dagster/row_count": len(report["eval"]),
        "eval_table": md_table(report["eval"], [c for c in EVAL_COLUMNS if any(c in r for r in report["eval"])]),
        f"spearman_within_prompt@{gate['sigma']}": float(row["spearman_within_prompt"]),
        f"distill_loss@{gate['sigma']}": float(row["distill_loss"]),
        "trivial_loss": float(report["trivial_loss"]),
        "gate_passed": bool(gate["passed"]),
        "gate_checks": MetadataValue.json(gate["checks"]),
        "champion": bool(tracked.get("champion", False)),
        "model_version": MetadataValue.text(
            f"{params.mlflow.registered_model}/{tracked['model_version']}" if tracked.get("model_version")
            else "(not registered)"),
        "report": MetadataValue.path(str((paths.reports / "eval.json").resolve())),
        "plot": png_md((paths.reports / "eval.png").read_bytes(), "value quality vs sigma"),
    }
    grid = paths.reports / "geneval_samples.png"
    if "geneval" in report and grid.is_file():  # the base generator's test samples, each with the evaluator's verdict
        metadata["geneval"] = MetadataValue.json(report["geneval"])
        metadata["geneval_samples"] = png_md(grid.read_bytes(), "test samples per category (1: satisfies its prompt)")
    for r in report["eval"]:  # the Monte Carlo value's agreement with the teacher: what any value could reach
        if r["method"] == "monte-carlo":
            metadata[f"monte_carlo_ceiling@{r['sigma']}"] = float(r["spearman_within_prompt"])
    if tracked.get("model_version") and (url := mlflow.model_version_url(params.mlflow.registered_model,
                                                                           tracked["model_version"])):
        metadata["model_version_url"] = MetadataValue.url(url)
    return MaterializeResult(metadata=metadata)


@asset_check(asset="evaluate", description="the promotion gate of params.evaluate (WARN: the model stays a candidate)")
def eval_gate(stitchvm: StitchVMResource) -> AssetCheckResult:
    path = stitchvm.paths().reports / "eval.json"
    if not path.is_file():
        return AssetCheckResult(passed=False, metadata={"error": MetadataValue.text(f"{path} does not exist")})
    gate = json.loads(path.read_text())["gate"]
    return AssetCheckResult(passed=bool(gate["passed"]), severity=AssetCheckSeverity.WARN, metadata={
        "sigma": gate["sigma"], **{name: bool(ok) for name, ok in gate["checks"].items()},
        "report": MetadataValue.path(str(path.resolve()))})


ASSETS = [search, truth, train, evaluate]
CHECKS = [eval_gate]
