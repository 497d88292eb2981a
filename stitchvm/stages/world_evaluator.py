"""Stage `world_evaluator`: the world's independent evaluator (GenEval's role), a small CNN that reads a scene back
from pixels; trained on augmented renders with exact labels (stitchvm/world/evaluator.py). Never a reward."""
from __future__ import annotations

from stitchvm.config import Params
from stitchvm.models.world_source import world_path
from stitchvm.stages.bootstrap import finish, install, scene_stream, timed, weight_bytes
from stitchvm.stages.runtime import Paths
from stitchvm.world.evaluator import save_evaluator, train_evaluator


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.evaluator
    (model, history), seconds = timed(
        train_evaluator, recipe.steps, recipe.batch_size, scene_stream(params, "world_evaluator"), progress,
        lr=recipe.lr, seed=params.world.seed, eval_every=max(1, recipe.steps // 5), n_eval=params.world.report.scenes)
    with install("evaluator.safetensors") as path:
        save_evaluator(model, path)
    summary = {"seconds": seconds, "final_loss": history[-1]["loss"], "scene_accuracy": history[-1]["scene_accuracy"],
               "bytes": weight_bytes(world_path("evaluator.safetensors"))}
    return finish("world_evaluator", params, paths, recipe, history, summary)
