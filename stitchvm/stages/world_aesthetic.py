"""Stage `world_aesthetic`: the world's scalar reward, an MLP head (LAION aesthetic layout) on the shipped CLIP's
image embedding, trained to predict a visible image property (stitchvm/world/aesthetic.py)."""
from __future__ import annotations

from stitchvm.config import Params
from stitchvm.world.aesthetic import save_head, train_aesthetic
from stitchvm.models.world_source import world_path
from stitchvm.stages.bootstrap import finish, install, scene_stream, timed, weight_bytes
from stitchvm.stages.runtime import Paths


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.aesthetic
    (head, history), seconds = timed(
        train_aesthetic, world_path("clip"), recipe.steps, recipe.batch_size, scene_stream(params, "world_aesthetic"),
        progress, lr=recipe.lr, seed=params.world.seed,
        eval_every=max(1, recipe.steps // 5))
    with install("aesthetic.safetensors") as path:
        save_head(head, path)
    summary = {"seconds": seconds, "final_loss": history[-1]["loss"],
               "bytes": weight_bytes(world_path("aesthetic.safetensors"))}
    return finish("world_aesthetic", params, paths, recipe, history, summary)
