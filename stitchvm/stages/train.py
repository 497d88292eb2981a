"""Stage `train`: the stitched model from the search's initialisation, its stitch fitted to the teacher's tokens
(stage 1b, `train.fit`, value/token_fit.py), then distilled (stage 2, `train.steps`); logged and registered in MLflow.

Writes `value_model/`, `train/curve.png` and `train/summary.json` (steps, first and final loss, the fit's first
error and its final one, the mean of its last 100 steps; the pair: nothing that differs between two identical runs);
the run's wall time, throughput, where the model went and its MLflow run and registered version go to the run
record `reports/runs/train.json` (stitchvm/stages/run_record.py). Returns both.

A killed run resumes from its last checkpoint, and its outputs equal an uninterrupted run's: the checkpoint folder
keeps the fitted stitch (a kill during the fit fits again from the start) and the history of the steps before the
checkpoint (the curve and the first loss), and the frozen encoders' prompt caches are filled in one fixed order first
(an embedding's last bit depends on the prompts it is encoded with)."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from stitchvm import distributed
from stitchvm.stages import plots
from stitchvm.config import Params, to_dict
from stitchvm.data.shard_dataset import gather_rows
from stitchvm.data.storage import open_root
from stitchvm.value.token_fit import entry_tokens, fit_stitch
from stitchvm.value.training import Checkpointer, train_value_model
from stitchvm.value.search import stitched_from_search
from stitchvm.stages.run_record import repo_relative, split_fields, write_record
from stitchvm.stages.runtime import Paths, models
from stitchvm.stages.upstream import SEARCH, TRAIN_SUMMARY, VALUE_MODEL, read_search, stream_split

# the summary's fields that depend on the run (clock, machine, MLflow store): the run record's, not DVC's
RUN_FIELDS = ("seconds", "samples_per_s", "path", "run_id", "model_version", "tracking_uri")
HISTORY = "history.jsonl"  # in the checkpoint folder: one row per step done, appended as training goes
FIT = "fit"  # in the checkpoint folder: the fitted stitch (stitch.safetensors) and the fit's history (history.json)


def checkpoint_dir(params: Params, paths: Paths, inputs: str = "") -> Path:
    """Checkpoints are keyed by everything that shapes the run (every params section upstream of training too, and
    `inputs`, a fingerprint of the search's result), so a resume never mixes two configurations or two data sets."""
    shaping = {k: v for k, v in to_dict(params).items() if k not in ("evaluate", "mlflow")}
    key = json.dumps([shaping, paths.root, inputs], sort_keys=True)
    return paths.checkpoints / f"train-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@torch.no_grad()
def encode_prompts_once(model, prompts: list[str]) -> None:
    """Fill the reward's text cache (and a prompt head's conditioning cache) with every prompt in one batch, in
    first-seen order: a prompt's embedding varies in its last bit with the batch it is encoded in and the caches keep
    the first, so filled by training's batches a resumed run (other first batches) would drift from a whole one."""
    unique = list(dict.fromkeys(prompts))
    model.reward.prompt_embeds(unique)
    if model.context == "prompt":
        model.head.encode(unique)


def resumed_history(ckpt: Path) -> list[dict]:
    """The history of the steps the checkpoint in `ckpt` holds (the run continues after them; [] without one).

    The checkpoint is saved just before its step's row is appended, so a kill in between leaves a checkpoint
    without its last row: it is removed, and the run starts afresh rather than with a hole in its history."""
    last = Checkpointer(ckpt).latest()
    if last is None:
        return []
    step = json.loads((last / "step.json").read_text())["step"]
    rows = [r for r in read_history(ckpt / HISTORY) if r["step"] <= step]
    if [r["step"] for r in rows] != list(range(1, step + 1)):
        shutil.rmtree(ckpt)
        return []
    open_root(str(ckpt)).write_bytes_atomic(HISTORY, "".join(json.dumps(r) + "\n" for r in rows).encode())  # the
    # rows after the checkpoint (and a line cut short) go: the resumed run appends those steps again
    return rows


def read_history(path: Path) -> list[dict]:
    """The rows of a history file; a last line cut short by a kill is not a row."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def history_log(ckpt: Path):
    """`on_step` for train_value_model: append each step's row to `ckpt/history.jsonl` (rank 0)."""
    def append(row: dict) -> None:
        if distributed.is_main():
            ckpt.mkdir(parents=True, exist_ok=True)
            with open(ckpt / HISTORY, "a") as f:
                f.write(json.dumps(row) + "\n")
    return append


def fitted_stitch(model, backbone, params: Params, paths: Paths, ckpt: Path, progress: bool) -> list[dict]:
    """Stage 1b on `model.stitch` (nothing when train.fit.steps is 0), or its result kept in `ckpt` by an earlier,
    killed run of the same configuration; returns the fit's history."""
    cfg = params.train.fit
    if cfg.steps == 0:
        return []
    kept = ckpt / FIT / "history.json"
    if distributed.broadcast_int(int(kept.is_file())) != int(kept.is_file()):
        raise ValueError(f"rank {distributed.rank()} does not see the fitted stitch rank 0 sees in {ckpt}: put the "
                         f"checkpoint folder on a disk every machine shares")
    if kept.is_file():
        model.stitch.load_state_dict(load((ckpt / FIT / "stitch.safetensors").read_bytes()))
        return json.loads(kept.read_text())
    storage = paths.storage()
    latents, index = stream_split(storage, params, "train")
    z0 = gather_rows(latents, params.train.num_workers)["latents"]  # (N, C, H, W)
    targets = entry_tokens(backbone, model.reward, z0, model.j, cfg.batch_size, progress)
    history = fit_stitch(model, z0, targets, cfg, (params.train.sigma_logit_mean, params.train.sigma_logit_std),
                         params.seed, index.column("prompt").to_pylist(), progress)
    if distributed.is_main():
        folder = open_root(str(ckpt / FIT))
        folder.write_bytes_atomic("stitch.safetensors", save({k: v.contiguous() for k, v in
                                                              model.stitch.state_dict().items()}))
        folder.write_bytes_atomic("history.json", json.dumps(history).encode())  # the marker, last
    return history


FINAL_WINDOW = 100  # steps: one batch of 16 latents' error is noisy (± ~20 %), the summary reads their mean


def final_error(fit: list[dict]) -> float | None:
    """The fit's error at its end: the mean of its last FINAL_WINDOW steps' `fit_error` (None without a fit)."""
    tail = [r["fit_error"] for r in fit[-FINAL_WINDOW:]]
    return sum(tail) / len(tail) if tail else None


def curve_rows(fit: list[dict], distill: list[dict]) -> list[dict]:
    """One step axis for the curve: the fit's steps, then stage 2's after them."""
    return fit + [{**r, "step": r["step"] + len(fit)} for r in distill]


def flat_params(params: Params) -> dict:
    out = {}
    for section, values in to_dict(params).items():
        for k, v in values.items() if isinstance(values, dict) else [("", values)]:
            out[f"{section}.{k}" if k else section] = v
    return out


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    distributed.init_from_env()  # under torchrun: join the group before the models land on this rank's device
    storage = paths.storage()
    backbone, reward = models(params)
    rows, index = stream_split(storage, params, "train", labels=True)  # shards are read as batches need them
    model = stitched_from_search(backbone, reward, read_search(storage), params.train.residual_width or None,
                                 params.train.residual_kernel)
    start = time.perf_counter()
    inputs = hashlib.sha256(storage.read_bytes(f"{SEARCH}/init.safetensors")
                            + storage.read_bytes(f"{SEARCH}/result.json")).hexdigest()
    ckpt = checkpoint_dir(params, paths, inputs)
    prompts = index.column("prompt").to_pylist()
    encode_prompts_once(model, prompts)
    fit = fitted_stitch(model, backbone, params, paths, ckpt, progress)
    done = resumed_history(ckpt) if distributed.is_main() else []  # rank 0 alone writes the summary and curve
    history = done + train_value_model(model, rows, None, params.train, params.seed, ckpt, progress,
                                       on_step=history_log(ckpt), prompts=prompts,
                                       num_workers=params.train.num_workers)
    seconds = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 writes the model, the curve, the summary, the run record and MLflow
        return {"steps": params.train.steps, "seconds": round(seconds, 3), "rank": distributed.rank()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            storage.write_bytes_atomic(f"{VALUE_MODEL}/{f.name}", f.read_bytes())
    shutil.rmtree(ckpt, ignore_errors=True)  # checkpoints serve crash-resume only; a finished run starts afresh
    curve = plots.training_curve(curve_rows(fit, history), keys=("fit_error", "loss", "embed", "tokens", "score"),
                                 title="token fit (fit_error), then distillation" if fit else "distillation loss")
    storage.write_bytes_atomic("train/curve.png", curve)
    summary = {"steps": params.train.steps, "seconds": round(seconds, 3),
               "samples_per_s": round((len(fit) * params.train.fit.batch_size + len(history) * params.train.batch_size)
                                      / max(seconds, 1e-9), 2),  # the fit's latents and stage 2's
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "fit": {"steps": len(fit), "first_error": fit[0]["fit_error"] if fit else None,
                       "final_error": final_error(fit)},
               "pair": {"i": model.i, "j": model.j}, "path": repo_relative(storage.path(VALUE_MODEL)),
               "run_id": None, "model_version": None}
    if paths.track:
        heatmap = storage.read_bytes(f"{SEARCH}/heatmap.png")
        summary.update(track_training(params, model, fit, history, summary, heatmap, curve))
    report, record = split_fields(summary, RUN_FIELDS)
    storage.write_json(TRAIN_SUMMARY, report)
    write_record(paths.reports, "train", record)
    return summary


def track_training(params: Params, model, fit: list[dict], history: list[dict], summary: dict, heatmap: bytes,
                   curve: bytes) -> dict:
    from stitchvm.stages import tracking  # mlflow is imported only where a run is tracked

    cfg = params.mlflow
    with tracking.start_run(cfg.experiment, run_name="train", tracking_uri=cfg.tracking_uri) as run:
        tracking.log_params(flat_params(params))
        tracking.log_history(fit, prefix="fit")
        tracking.log_history(history, prefix="train")
        tracking.log_metrics({"train/seconds": summary["seconds"], "train/samples_per_s": summary["samples_per_s"]})
        tracking.log_png(heatmap, "search_heatmap.png")
        tracking.log_png(curve, "training_curve.png")
        version = tracking.log_value_model(model, registered_name=cfg.registered_model, alias="candidate")
        return {"run_id": run.info.run_id, "model_version": str(version.version),
                "tracking_uri": tracking.current_tracking_uri()}

