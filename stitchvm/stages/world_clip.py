"""Stage `world_clip`: contrastive pretraining of the embedded world's CLIP (its image tower is the reward model,
its text tower conditions the world's diffusion backbone), then its binding phase (`world.clip.binding_steps`)."""
from __future__ import annotations

import copy

import torch
from transformers import CLIPModel

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
    if recipe.binding_steps:
        (model, _, more), extra = timed(binding_phase, params, as_shipped(model), progress)
        history += [dict(h, step=h["step"] + recipe.steps, seconds=h["seconds"] + seconds) for h in more]
        seconds = round(seconds + extra, 2)
    return install_clip(params, paths, model, tokenizer, history, seconds)


def as_shipped(model: CLIPModel) -> CLIPModel:
    """The model with its weights rounded to float16 (how the world ships it), back in float32."""
    return copy.deepcopy(model).to(torch.float16).float()


def binding_phase(params: Params, model: CLIPModel, progress: bool = True):
    """Continue training `model` with targeted hard negatives (two groups' attributes exchanged); returns
    `train_clip`'s `(model, tokenizer, history)`."""
    recipe = params.world.clip
    return train_clip(recipe.binding_steps, recipe.batch_size, scene_stream(params, "world_clip_binding"), progress,
                      lr=recipe.binding_lr, init=model, swap=recipe.binding_swap, targeted=True,
                      eval_every=max(1, recipe.binding_steps // 5), n_eval=params.world.report.scenes,
                      desc="world clip binding")


def install_clip(params: Params, paths: Paths, model: CLIPModel, tokenizer, history: list[dict],
                 seconds: float) -> dict:
    """Ship the model (float16) and write the stage's report: zero-shot and binding accuracies at the last step."""
    with install("clip") as path:
        save_clip(model, tokenizer, path, torch.float16)
    last = history[-1]
    summary = {"seconds": seconds, "final_loss": last["loss"], "bytes": weight_bytes(world_path("clip")),
               **{f"zero_shot_{k}": v for k, v in last["zero_shot"].items()},
               **{f"binding_{k}": v for k, v in last["binding"].items()}}
    return finish("world_clip", params, paths, params.world.clip, history, summary)
