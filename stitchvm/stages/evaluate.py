"""Stage `evaluate`: the trained value model vs the Tweedie baseline on the stored noisy test latents; with
`evaluate.mc_rollouts` > 0 both are also scored against the Monte Carlo value at `evaluate.mc_sigmas`, which the
`truth` stage computed (stages/truth.py: it does not depend on the value model, so a retrained model skips it).

Writes `reports/eval.json` (DVC metrics), `reports/eval_plot.json` + `reports/eval.png` (value quality vs σ), logs them
to the training's MLflow run, and promotes the registered version to `champion` when the gate in params passes and its gate metric beats
the current champion's (tracking.promote_if_better).
What the clock and the machine decide (each row's ms_per_eval and peak_mem_mb) and the MLflow outcome go to the run
record `reports/runs/evaluate.json` instead of eval.json (stitchvm/stages/run_record.py); the returned report holds
both.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import torch

from stitchvm.stages import plots
from stitchvm.config import Params
from stitchvm.value.evaluation import NoisyEvalSet, evaluate_value_model
from stitchvm.value.training import TeacherTargets
from stitchvm.data.shard_dataset import gather_rows
from stitchvm.value.model import StitchedValueModel
from stitchvm.stages.geneval import judge_latents
from stitchvm.stages.run_record import split_rows, write_record
from stitchvm.stages.runtime import Paths, models
from stitchvm.world.prompt_set import CATEGORIES
from stitchvm.stages.upstream import (EVAL, SAMPLES, prompt_specs, prompts_in_split, read_noisy_eval, read_prompts,
                                      read_train_run, read_truth, stream_split, value_model_dir)

TIMED = ("ms_per_eval", "peak_mem_mb")  # the evaluation rows' measurements: the run record's, keyed by (sigma, method)


def gate(report: dict, params: Params) -> dict:
    cfg = params.evaluate
    (row,) = [r for r in report["eval"] if r["method"] == "stitchvm" and r["sigma"] == cfg.gate_sigma]
    checks = {
        "spearman_within_prompt": row["spearman_within_prompt"] >= cfg.min_spearman_within_prompt,
        "loss_below_trivial": row["distill_loss"] <= cfg.max_loss_ratio * report["trivial_loss"],
    }
    return {"sigma": cfg.gate_sigma, "checks": checks, "passed": all(checks.values())}


def gate_record(report: dict) -> dict:
    """The gate with the numbers it judged (the gate metric, within-prompt Spearman at its σ, first): what promotion
    compares and tags on the registered version."""
    g = report["gate"]
    (row,) = [r for r in report["eval"] if r["method"] == "stitchvm" and r["sigma"] == g["sigma"]]
    return {**g, "spearman_within_prompt": row["spearman_within_prompt"], "distill_loss": row["distill_loss"],
            "trivial_loss": report["trivial_loss"]}


def by_sigma(rows: list[dict]) -> dict:
    """{method: {sigma_S: {metric: value}}}: the nested form DVC flattens into comparable metrics columns."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["method"], {})[f"sigma_{r['sigma']}"] = {
            k: v for k, v in r.items() if k in ("spearman", "spearman_within_prompt", "spearman_within_prompt_vs_mc",
                                                "pearson", "recall_at_1", "distill_loss")}
    return out


def plot_rows(rows: list[dict]) -> list[dict]:
    """One row per σ with a column per method: the shape DVC's linear plot template reads. The Monte Carlo value,
    computed at a few σ only, is left to eval.png: DVC's template drops a plot whose rows miss a column."""
    out: dict[float, dict] = {}
    for r in rows:
        if r["method"] == "monte-carlo":
            continue
        out.setdefault(r["sigma"], {"sigma": r["sigma"]})[r["method"]] = r["spearman_within_prompt"]
    return list(out.values())


def split_report(report: dict) -> tuple[dict, dict]:
    """(eval.json: the report less what the clock and the machine decide, the run record: the rows' timings keyed
    by (sigma, method))."""
    rows, timed = split_rows(report["eval"], TIMED, key=("sigma", "method"))
    return {**report, "eval": rows}, {"eval": timed}


GENEVAL_GRID = "geneval_samples.png"


@torch.no_grad()
def geneval(params: Params, backbone, z0: torch.Tensor, sample_prompts: list[str], table, paths: Paths) -> dict | None:
    """The world evaluator's verdicts on the pipeline's own test samples (the base generator, unguided): {category:
    accuracy, "overall"}, and a grid of samples per category with each verdict (reports/geneval_samples.png). None
    unless the backbone is the world's and every test prompt carries a spec (the built-in prompt set)."""
    specs = prompt_specs(table)
    judged = judge_latents(params, backbone, z0, sample_prompts, specs)
    if judged is None:
        return None
    accuracy, correct, pixels = judged
    categories = [specs[p][0] for p in sample_prompts]
    paths.reports.mkdir(parents=True, exist_ok=True)
    (paths.reports / GENEVAL_GRID).write_bytes(plots.verdict_grid(categories, sample_prompts, pixels, correct,
                                                                  CATEGORIES))
    return accuracy


class EvalInputs(NamedTuple):
    """What every evaluation of a value model reads."""
    data: NoisyEvalSet  # the test set: clean latents, prompt ids, prompts, categories
    noisy: dict  # {σ: (N, C, H, W)} its stored noisy versions
    teacher: TeacherTargets  # the teacher on the clean latents
    sample_prompts: list[str]  # each test latent's prompt
    table: object  # the prompt table (prompts.parquet)
    sample_ids: list[int]  # each test latent's sample id (the order of every tensor above)


def eval_inputs(params: Params, storage) -> EvalInputs:
    """The test rows are read shard by shard (`gather_rows`): never the other splits' rows, nor a whole set at once."""
    rows, index = stream_split(storage, params, "test", labels=True)
    test = gather_rows(rows)  # {"latents": (N, C, H, W), "embeds": (N, E), "tokens": (N, 1+P, D)[, "score": (N,)]}
    z0, teacher = test["latents"], TeacherTargets(test["embeds"], test["tokens"], test.get("score"))
    table = read_prompts(storage)
    test_prompts = prompts_in_split(table, "test")
    category = dict(zip(table.column("prompt").to_pylist(), table.column("category").to_pylist())) \
        if "category" in table.column_names else None
    position = {p: k for k, p in enumerate(test_prompts)}
    sample_prompts = index.column("prompt").to_pylist()
    data = NoisyEvalSet(z0, torch.tensor([position[p] for p in sample_prompts]), test_prompts,
                        None if category is None else [category[p] for p in test_prompts])
    noisy, noisy_ids = read_noisy_eval(storage, params)
    ids = index.column("sample_id").to_pylist()
    if noisy_ids != ids:
        raise ValueError(f"{storage.path(EVAL)} does not hold the test samples of {storage.path(SAMPLES)} in their "
                         f"order: re-run `noisy`")
    return EvalInputs(data, noisy, teacher, sample_prompts, table, ids)


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    storage = paths.storage()
    backbone, reward = models(params)
    data, noisy, teacher, sample_prompts, table, ids = eval_inputs(params, storage)
    values = read_truth(storage, params, noisy, sample_prompts, ids)  # the `truth` stage's ({} with mc_rollouts 0)
    model = StitchedValueModel.from_pretrained(value_model_dir(storage), backbone=backbone, reward=reward,
                                               device=backbone.device)
    report = evaluate_value_model(model, backbone, reward, data, noisy, params.evaluate.batch_size, params.train.lambda_tok,
                      teacher=teacher, progress=progress, true_values=values)
    if values:
        report["monte_carlo"] = {"rollouts": params.evaluate.mc_rollouts, "sigmas": sorted(values)}
    verdicts = geneval(params, backbone, data.z0, sample_prompts, table, paths)
    if verdicts is not None:
        report["geneval"] = verdicts
    report["gate"] = gate(report, params)
    report["by_sigma"] = by_sigma(report["eval"])
    quality, record = split_report(report)
    paths.reports.mkdir(parents=True, exist_ok=True)
    (paths.reports / "eval.json").write_text(json.dumps(quality, indent=2))
    (paths.reports / "eval_plot.json").write_text(json.dumps(plot_rows(report["eval"]), indent=2))
    png = plots.value_vs_sigma(report["eval"])
    (paths.reports / "eval.png").write_bytes(png)
    if paths.track:
        report["mlflow"] = record["mlflow"] = track_evaluation(params, paths.reports, report, png)
    write_record(paths.reports, "evaluate", record)
    return report


def track_evaluation(params: Params, reports, report: dict, png: bytes) -> dict:
    from stitchvm.stages import tracking

    summary = read_train_run(reports)
    if summary.get("run_id") is None:
        return {"logged": False, "reason": "the train stage ran without MLflow tracking"}
    cfg = params.mlflow
    with tracking.start_run(cfg.experiment, tracking_uri=cfg.tracking_uri, run_id=summary["run_id"]):
        tracking.log_metrics({f"eval/{r['method']}/sigma_{r['sigma']}/{k}": v for r in report["eval"]
                            for k, v in r.items() if k not in ("sigma", "method") and isinstance(v, float)})
        tracking.log_dict(report, "eval.json")
        tracking.log_png(png, "eval.png")
    out = {"logged": True, "run_id": summary["run_id"], "model_version": summary["model_version"], "champion": False}
    # `champion` moves only when the gate passes and this version beats the current champion's gate metric: a weaker
    # retrain that still passes the gate must not replace a better model
    out.update(tracking.promote_if_better(cfg.registered_model, out["model_version"], gate_record(report)))
    return out
