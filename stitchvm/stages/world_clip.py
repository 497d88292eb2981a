"""Stage `world_clip`: contrastive pretraining of the embedded world's CLIP (its image tower is the reward model,
its text tower conditions the world's diffusion backbone)."""
from __future__ import annotations

import torch

from stitchvm.config import Params
from stitchvm.world.clip_training import save_clip, train_clip
from stitchvm.models.world_source import world_path
from stitchvm.stages.bootstrap import finish, install, scene_stream, timed, weight_bytes
from stitchvm.stages.runtime import Paths


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.clip
    (model, tokenizer, history), seconds = timed(
        train_clip, recipe.steps, recipe.batch_size, scene_stream(params, "world_clip"), progress,
        lr=recipe.lr, seed=params.world.seed, eval_every=max(1, recipe.steps // 5),
        n_eval=params.world.report.scenes)
    accuracy = history[-1]["zero_shot"]  # held-out scenes (HELD_OUT_SEED), evaluated at the last step
    binding = history[-1]["binding"]
    with install("clip") as path:
        save_clip(model, tokenizer, path, torch.float16)
    summary = {"seconds": seconds, "final_loss": history[-1]["loss"], "bytes": weight_bytes(world_path("clip")),
               **{f"zero_shot_{k}": v for k, v in accuracy.items()}, **{f"binding_{k}": v for k, v in binding.items()}}
    return finish("world_clip", params, paths, recipe, history, summary)
