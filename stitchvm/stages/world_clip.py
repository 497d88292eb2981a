"""Stage `world_clip`: contrastive pretraining of the embedded world's CLIP (its image tower is the reward model,
its text tower conditions the world's diffusion backbone)."""
from __future__ import annotations

import torch

from ..config import Params
from ..world.clip_training import HELD_OUT_SEED, save_clip, train_clip, zero_shot_accuracy
from ..world.pretrained import world_path
from ..world.scenes import make_scenes
from .bootstrap import finish, install, scene_stream, timed, weight_bytes
from .runtime import Paths


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.clip
    (model, tokenizer, history), seconds = timed(
        train_clip, recipe.steps, recipe.batch_size, scene_stream(params, "world_clip"), progress,
        lr=recipe.lr, seed=params.world.seed)
    pixels, _, attrs = make_scenes(params.world.report.scenes, torch.Generator().manual_seed(HELD_OUT_SEED))
    accuracy = zero_shot_accuracy(model, tokenizer, pixels, attrs)
    with install("clip") as path:
        save_clip(model, tokenizer, path, torch.float16)
    summary = {"seconds": seconds, "final_loss": history[-1]["loss"], "bytes": weight_bytes(world_path("clip")),
               **{f"zero_shot_{k}": v for k, v in accuracy.items()}}
    return finish("world_clip", params, paths, recipe, history, summary)
