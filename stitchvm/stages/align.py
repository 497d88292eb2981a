"""Stage `align`: train a LoRA adapter on the backbone (DiffusionNFT or DRaFT, with terminal rewards or StitchVM).

Reads the prompts (train split for training, the first `align.eval_prompts` test prompts for evaluation) and, for the
StitchVM methods, the trained value model. Writes (under `storage.root`) `adapter/` (peft format: adapter_config.json,
adapter_model.safetensors, stitchvm_adapter.json) and `align/summary.json`; `reports/align.json` (the same summary),
`reports/align_curve.png` (true reward of the fixed evaluation samples vs update) and `reports/align_grid.png` (the
evaluation samples before / after). What the clock and the machine decide (wall and phase times, the curve's wall_s,
the adapter's folder) and the MLflow run go to the run record `reports/runs/align.json` with
`reports/runs/align_curve_wall.png` (the reward vs training wall time), not to the DVC outputs
(stitchvm/stages/run_record.py); the returned summary holds both. With tracking: an MLflow run `align-<method>` with
per-update metrics (`align/eval_reward`, `align/wall_s`, `align/sampling_s`, `align/reward_s`, `align/update_s`, loss
terms), the PNGs, the adapter folder, and a registered version of `<mlflow.registered_model>-adapter` (alias
`candidate`).

Data parallel under torchrun (`torchrun --nproc-per-node=N -m stitchvm align`): the ranks split each update's rollouts
(stitchvm/alignment/trainer.py) and rank 0 alone evaluates and writes every output. Every update is checkpointed under
`checkpoints/align-<hash of params and inputs>/`, so a killed or failed run (or torchrun's restart) continues where it
stopped, to the outputs an uninterrupted run writes; the checkpoints go once the outputs are written. Each output is
written under a temporary name and renamed, so none exists half-written under its final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stitchvm import distributed
from stitchvm.stages import plots
from stitchvm.alignment.trainer import PolicyEvalSet
from stitchvm.config import AlignConfig, Params, to_dict
from stitchvm.alignment.draft import train_draft
from stitchvm.models.lora import TRAINED, LoraPolicy
from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
from stitchvm.value.model import StitchedValueModel
from stitchvm.stages.run_record import RUNS, repo_relative, split_fields, split_rows, write_record
from stitchvm.stages.runtime import Paths, models
from stitchvm.stages.geneval import curve_geneval
from stitchvm.stages.upstream import PROMPTS, prompt_specs, prompts_in_split, read_prompts, value_model_dir

ADAPTER, SUMMARY = "adapter", "align/summary.json"
# the summary's fields that depend on the run (clock, machine, MLflow store): the run record's, not DVC's
RUN_FIELDS = ("train_seconds", "sec_per_update", "sampling_s", "reward_s", "update_s", "seconds", "adapter",
              "curve_wall_png", "run_id", "model_version", "registered_model", "tracking_uri")
CURVE_WALL = f"{RUNS}/align_curve_wall.png"  # under the reports folder
GRID_COLUMNS = 8


def split_prompts(table, cfg: AlignConfig) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts) of a `prompts.parquet` table: the train split; the first
    `eval_prompts` of the test split (of val when test is empty, of train when both are)."""
    train = prompts_in_split(table, "train")
    test = prompts_in_split(table, "test") or prompts_in_split(table, "val") or train
    return train, test[:cfg.eval_prompts]


def eval_adapter(cfg: AlignConfig) -> str:
    """The adapter that is evaluated and saved: NFT's EMA weights when `nft.eval_ema`, else the trained one."""
    return "ema" if cfg.method.startswith("nft") and cfg.nft.eval_ema else TRAINED


def checkpoint_dir(params: Params, paths: Paths, inputs: str) -> Path:
    """Checkpoints keyed by everything that shapes the run (params but `evaluate` and `mlflow`, the root, `inputs`: a
    fingerprint of the prompts and value model read), so a resume never mixes two configurations or two data sets."""
    shaping = {k: v for k, v in to_dict(params).items() if k not in ("evaluate", "mlflow")}
    key = json.dumps([shaping, paths.root, inputs], sort_keys=True)
    return paths.checkpoints / f"align-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def inputs_fingerprint(storage, value_dir: Path | None) -> str:
    """sha256 of the prompts table and, for the StitchVM methods, of the value model's files."""
    digest = hashlib.sha256(storage.read_bytes(PROMPTS))
    for f in sorted(value_dir.iterdir()) if value_dir is not None else []:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a sibling temporary file and rename it onto `path`: a kill leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_adapter(params: Params, backbone, reward, train_prompts: list[str], evalset: PolicyEvalSet | None,
                  value_model: StitchedValueModel | None, progress: bool = False, callback=None,
                  checkpoint_dir: Path | None = None):
    """Build the LoRA policy and run `params.align.method` (resuming from `checkpoint_dir`); returns (policy,
    history)."""
    cfg = params.align
    nft = cfg.method.startswith("nft")
    policy = LoraPolicy(backbone, cfg.lora_rank, cfg.lora_alpha, adapters=NFT_ADAPTERS if nft else (TRAINED,),
                        seed=params.seed)
    train = train_nft if nft else train_draft
    history = train(policy, reward, train_prompts, cfg, params.seed, value_model=value_model, evalset=evalset,
                    callback=callback, progress=progress, checkpoint_dir=checkpoint_dir)
    return policy, history


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    cfg = params.align
    start = time.perf_counter()
    distributed.init_from_env()  # under torchrun: join the group before the models land on this rank's device
    storage = paths.storage()
    backbone, reward = models(params)
    train_prompts, eval_prompts = split_prompts(read_prompts(storage), cfg)
    value_model, value_dir = None, None
    if cfg.method.endswith("stitchvm"):
        value_dir = value_model_dir(storage)
        value_model = StitchedValueModel.from_pretrained(value_dir, backbone=backbone, reward=reward,
                                                         device=backbone.device).eval()
    evalset = PolicyEvalSet(tuple(eval_prompts), tuple(cfg.eval_seeds), cfg.eval_steps or cfg.steps,
                      cfg.eval_guidance_scale)
    ckpt = checkpoint_dir(params, paths, inputs_fingerprint(storage, value_dir))
    policy, history = train_adapter(params, backbone, reward, train_prompts, evalset, value_model, progress,
                                    checkpoint_dir=ckpt)
    if not distributed.is_main():  # rank 0 evaluated, and writes every output
        return {"method": cfg.method, "updates": cfg.updates, "rank": distributed.rank(),
                "seconds": round(time.perf_counter() - start, 3)}
    adapter = eval_adapter(cfg)
    # the trainers evaluate the untrained adapter (the base model: LoRA starts at zero) first and `adapter` last
    (rewards_before, z_before), (rewards_after, z_after) = evalset.results[0], evalset.results[-1]
    reward_before, reward_after = history[0]["eval_reward"], history[-1]["eval_reward"]
    # the independent evaluator on every evaluation: a reward gain without a GenEval gain is reward hacking
    geneval = curve_geneval(params, backbone, [z0 for _, z0 in evalset.results], evalset.expanded()[0],
                            prompt_specs(read_prompts(storage)))
    with tempfile.TemporaryDirectory(prefix="stitchvm-adapter-") as tmp:
        folder = policy.save(Path(tmp) / ADAPTER, adapter, metadata={"method": cfg.method, "updates": cfg.updates,
                                                                     "align": to_dict(cfg)})
        for f in sorted(folder.iterdir()):
            storage.write_bytes_atomic(f"{ADAPTER}/{f.name}", f.read_bytes())
        curve = plots.reward_curve(history, cfg.method)
        curve_wall = plots.reward_curve(history, cfg.method, x="wall_s")
        grid = sample_grid(backbone, (z_before, rewards_before), (z_after, rewards_after), evalset)
        updates = [r for r in history if r["step"] > 0]
        totals = {f"{phase}_s": round(sum(r.get(f"{phase}_s", 0.0) for r in updates), 3)
                  for phase in ("sampling", "reward", "update")}
        train_seconds = updates[-1]["wall_s"] if updates else 0.0
        summary = {
            "method": cfg.method, "updates": cfg.updates, "steps": cfg.steps,
            "batch": cfg.prompts_per_update * cfg.group_size,
            "reward_before": round(reward_before, 5), "reward_after": round(reward_after, 5),
            "reward_gain": round(reward_after - reward_before, 5),
            "geneval_before": geneval[0], "geneval_after": geneval[-1],
            "train_seconds": round(train_seconds, 3), "sec_per_update": round(train_seconds / max(len(updates), 1), 4),
            **totals, "seconds": round(time.perf_counter() - start, 3),
            "evaluated_adapter": adapter, "eval_prompts": list(eval_prompts), "eval_seeds": list(cfg.eval_seeds),
            "adapter": repo_relative(storage.path(ADAPTER)),
            "report": repo_relative(paths.reports / "align.json"),
            "curve_png": repo_relative(paths.reports / "align_curve.png"),
            "curve_wall_png": repo_relative(paths.reports / CURVE_WALL),
            "grid_png": repo_relative(paths.reports / "align_grid.png"),
            "curve": [{"step": r["step"], "wall_s": round(r["wall_s"], 4), "eval_reward": round(r["eval_reward"], 5),
                       "geneval": g} for r, g in zip([r for r in history if "eval_reward" in r], geneval)],
            "run_id": None, "model_version": None,
        }
        if paths.track:
            summary.update(track_alignment(params, history, summary, folder, {"align_curve.png": curve,
                                                                              "align_curve_wall.png": curve_wall,
                                                                              "align_grid.png": grid}))
    report, record = split_fields(summary, RUN_FIELDS)
    report["curve"], record["curve"] = split_rows(summary["curve"], ("wall_s",), key=("step",))
    write_atomic(paths.reports / "align_curve.png", curve)
    write_atomic(paths.reports / "align_grid.png", grid)
    write_atomic(paths.reports / "align.json", json.dumps(report, indent=2).encode())
    storage.write_json(SUMMARY, report)
    write_record(paths.reports, "align", record)
    write_atomic(paths.reports / CURVE_WALL, curve_wall)
    shutil.rmtree(ckpt, ignore_errors=True)  # checkpoints serve crash-resume only; a finished run starts afresh
    return summary


def track_alignment(params: Params, history: list[dict], summary: dict, folder: Path, pngs: dict[str, bytes]) -> dict:
    from stitchvm.stages import tracking  # mlflow is imported only where a run is tracked
    from stitchvm.stages.train import flat_params

    cfg = params.mlflow
    with tracking.start_run(cfg.experiment, run_name=f"align-{params.align.method}",
                            tracking_uri=cfg.tracking_uri) as run:
        tracking.log_params(flat_params(params))
        tracking.log_history(history, prefix="align")
        tracking.log_metrics({f"align/{k}": summary[k] for k in ("reward_before", "reward_after", "reward_gain",
                                                               "geneval_before", "geneval_after", "train_seconds",
                                                               "sec_per_update", "sampling_s", "reward_s", "update_s")
                              if summary[k] is not None})
        for name, png in pngs.items():
            tracking.log_png(png, name)
        tracking.log_dict(summary, "align.json")
        version = tracking.log_adapter(folder, "adapter", registered_name=f"{cfg.registered_model}-adapter",
                                       alias="candidate",
                                       description=f"LoRA adapter ({params.align.method}) on {params.backbone.source}")
        return {"run_id": run.info.run_id, "model_version": str(version.version),
                "registered_model": f"{cfg.registered_model}-adapter", "tracking_uri": tracking.current_tracking_uri()}


# ---- figures ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(backbone, before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                evalset: PolicyEvalSet) -> bytes:
    """Evaluation samples (same prompt and seed per column), each with its true reward: the base model (top row)
    and the adapter (bottom row)."""
    prompts, seeds = evalset.expanded()
    n = min(GRID_COLUMNS, len(prompts))
    rows = [(label, torch.cat([plots.to_uint8(backbone.decode(z[k:k + 8])) for k in range(0, n, 8)]), r[:n])
            for label, (z, r) in (("before", before), ("after", after))]
    return plots.image_grid(rows, [f"{p} (seed {s})" for p, s in zip(prompts[:n], seeds[:n])])
