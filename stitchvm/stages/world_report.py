"""Stage `world_report`: is the shipped world any good? The CLIP's zero-shot accuracy on held-out scenes, the VAE's
round-trip PSNR, the backbone's prompt-pair win rate under the CLIP, the aesthetic head's Spearman, and a grid of
samples (one row per prompt) -> reports/world.json and reports/world_samples.png."""
from __future__ import annotations

import json

import torch

from stitchvm.stages import plots
from stitchvm.models.backbone import build_backbone
from stitchvm.config import ModelSpec, Params, RewardSpec
from stitchvm.models.reward import build_reward
from stitchvm.world.evaluation import WIN_RATE_PROMPTS, clip_scores, sample_pixels, world_report
from stitchvm.stages.bootstrap import timed
from stitchvm.stages.runtime import Paths

GRID_COLUMNS = 6


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    cfg = params.world.report
    backbone = build_backbone(ModelSpec("world:sd3"))
    reward = build_reward(RewardSpec("world:clip"))
    aesthetic = build_reward(RewardSpec("world:clip", kind="aesthetic", head="world"))
    report, seconds = timed(world_report, backbone, reward, aesthetic, per_prompt=cfg.per_prompt, steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, seed=params.world.seed, n_eval=cfg.scenes)
    paths.reports.mkdir(parents=True, exist_ok=True)
    grid = paths.reports / "world_samples.png"
    grid.write_bytes(sample_grid(backbone, reward, cfg.steps, cfg.guidance_scale, params.world.seed))
    report = {k: round(v, 4) for k, v in report.items()}
    (paths.reports / "world.json").write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "seconds": seconds, "samples": str(grid)}


@torch.no_grad()
def sample_grid(backbone, reward, steps: int, guidance_scale: float, seed: int) -> bytes:
    """One row per win-rate prompt: samples of the world backbone, each captioned with its CLIP score."""
    prompts = list(WIN_RATE_PROMPTS)
    pixels, labels = sample_pixels(backbone, prompts, GRID_COLUMNS, steps, guidance_scale, seed)
    scores = clip_scores(reward, pixels, prompts)[torch.arange(len(labels)), labels]  # each with its own prompt
    images = plots.to_uint8(pixels)
    rows = [(p, images[labels == k], scores[labels == k]) for k, p in enumerate(prompts)]
    return plots.image_grid(rows)
