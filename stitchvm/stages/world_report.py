"""Stage `world_report`: is the shipped world any good? The CLIP's zero-shot and binding accuracies on held-out
scenes, the VAE's round-trip PSNR, the backbone's prompt-pair win rate under the CLIP, the aesthetic head's
Spearman, and GenEval in miniature: the evaluator's accuracy per category on held-out renders and the backbone's
unguided accuracy on the built-in test prompts -> reports/world.json; a grid of samples per category with the
evaluator's verdict on each -> reports/world_samples.png."""
from __future__ import annotations

import json

from stitchvm.stages import plots
from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec, Params, RewardSpec
from stitchvm.data.storage import open_root
from stitchvm.models.reward import build_reward
from stitchvm.models.world_source import world_path
from stitchvm.world.evaluation import generator_accuracy, specs_by_category, world_report
from stitchvm.world.evaluator import evaluator_accuracy, load_evaluator
from stitchvm.world.prompt_set import CATEGORIES, prompt_set
from stitchvm.stages.bootstrap import timed
from stitchvm.stages.runtime import Paths

def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    cfg = params.world.report
    backbone = build_backbone(ModelSpec("world:sd3"))
    reward = build_reward(RewardSpec("world:clip"))
    aesthetic = build_reward(RewardSpec("world:clip", kind="aesthetic", head="world"))
    evaluator = load_evaluator(world_path("evaluator.safetensors"))
    report, seconds = timed(world_report, backbone, reward, aesthetic, per_prompt=cfg.per_prompt, steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, seed=params.world.seed, n_eval=cfg.scenes)
    rows = prompt_set()
    report = {k: round(v, 4) for k, v in report.items()}
    report["evaluator_accuracy"] = {k: round(v, 4) for k, v in
                                    evaluator_accuracy(evaluator, specs_by_category(rows), n=2 * cfg.scenes).items()}
    test = [r for r in rows if r["split"] == "test"]
    accuracy, pixels, correct = generator_accuracy(backbone, evaluator, test, cfg.per_prompt, params.samples.steps,
                                                   params.samples.guidance_scale, params.world.seed)
    report["generator_accuracy"] = {k: round(v, 4) for k, v in accuracy.items()}
    report["generator_sampler"] = {"steps": params.samples.steps, "guidance_scale": params.samples.guidance_scale,
                                   "per_prompt": cfg.per_prompt, "prompts": len(test)}
    reports = open_root(str(paths.reports))  # temporary name + rename: a kill never leaves half a report
    grid = paths.reports / "world_samples.png"
    per_sample = [test[k] for k in range(len(test)) for _ in range(cfg.per_prompt)]
    reports.write_bytes_atomic(grid.name, plots.verdict_grid([r["category"] for r in per_sample],
                                                             [r["prompt"] for r in per_sample], pixels, correct,
                                                             CATEGORIES))
    reports.write_bytes_atomic("world.json", (json.dumps(report, indent=2) + "\n").encode())
    return {**report, "seconds": seconds, "samples": str(grid)}
