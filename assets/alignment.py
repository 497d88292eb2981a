"""Alignment assets: the consumers of the value model (inference-time guidance, training-time alignment)."""
from __future__ import annotations

from pathlib import Path

from dagster import MaterializeResult, MetadataValue, asset

from stitchvm.stages import GRAPH
from stitchvm.stages.align import ADAPTER

from assets.metadata import md_table, png_md, stage_doc as doc
from assets.resources import MlflowResource, StitchVMResource

GROUP = "alignment"
ROW_COLUMNS = ("method", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std")


@asset(group_name=GROUP, deps=list(GRAPH["guidance"]), pool="gpu", description=doc("guidance"))
def guidance(stitchvm: StitchVMResource) -> MaterializeResult:
    summary = stitchvm.run_stage("guidance").summary  # rows with their timings (guidance.json has none)
    metadata = {
        "rows": md_table(summary["rows"], ROW_COLUMNS),
        "reward_gain": MetadataValue.json(summary.get("reward_gain", {})),
        "pair": MetadataValue.json(summary["pair"]),
        "device": MetadataValue.text(summary["device"]),
        "report": MetadataValue.path(str(Path(summary["report"]).resolve())),
        "samples": png_md(Path(summary["grid"]).read_bytes(), "samples per method, same seeds"),
        **{f"vs_unguided/{Path(name).stem}": png_md(Path(path).read_bytes(), f"unguided vs {Path(name).stem}")
           for name, path in summary["grids"].items()},
    }
    return MaterializeResult(metadata=metadata)


@asset(group_name=GROUP, deps=list(GRAPH["align"]), pool="gpu", description=doc("align"))
def align(stitchvm: StitchVMResource, mlflow: MlflowResource) -> MaterializeResult:
    _, paths, summary = stitchvm.run_stage("align")  # the summary with its run record (timings, MLflow run)
    metadata = {
        **{k: summary[k] for k in ("updates", "steps", "batch", "reward_before", "reward_after", "reward_gain",
                                   "train_seconds", "sec_per_update", "sampling_s", "reward_s", "update_s")},
        **{k: summary[k] for k in ("geneval_before", "geneval_after") if summary.get(k) is not None},
        "method": MetadataValue.text(summary["method"]),
        "adapter": MetadataValue.path(paths.storage().path(ADAPTER)),  # absolute (the run record's is relative)
        "report": MetadataValue.path(str(Path(summary["report"]).resolve())),
        "reward_vs_update": png_md(Path(summary["curve_png"]).read_bytes(), "true reward vs update"),
        "reward_vs_time": png_md(Path(summary["curve_wall_png"]).read_bytes(), "true reward vs wall time"),
        "before_after": png_md(Path(summary["grid_png"]).read_bytes(), "base model vs adapter, same seeds"),
        "model_version": MetadataValue.text(
            f"{summary['registered_model']}/{summary['model_version']}" if summary.get("model_version")
            else "(not registered)"),
    }
    if summary.get("run_id") and (url := mlflow.run_url(summary["run_id"], summary.get("tracking_uri"))):
        metadata["mlflow_run_url"] = MetadataValue.url(url)
    return MaterializeResult(metadata=metadata)


ASSETS = [guidance, align]
