"""Stage `world_backbone`: the embedded world's SD3 flow transformer, trained by rectified flow on the shipped VAE's
latents and conditioned through the shipped CLIP's text tower (SD3's two CLIP text encoders are both that tower)."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from stitchvm.config import Params
from stitchvm.world.flow_training import train_flow
from stitchvm.models.world_source import world_path
from stitchvm.stages.bootstrap import finish, install, scene_stream, timed, weight_bytes
from stitchvm.stages.runtime import Paths


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.backbone
    vae = shipped_vae()
    (backbone, history), seconds = timed(
        train_flow, world_path("clip"), vae, recipe.steps, recipe.batch_size, scene_stream(params, "world_backbone"),
        progress, lr=recipe.lr, caption_dropout=recipe.caption_dropout, seed=params.world.seed,
        eval_every=max(1, recipe.steps // 5))
    with install("transformer") as path:
        backbone.transformer.to(torch.float16).save_pretrained(path)
    with install("scheduler") as path:
        backbone.scheduler.save_pretrained(path)
    with install("tokenizer") as path:
        backbone.tokenizer.save_pretrained(path)
    summary = {"seconds": seconds, "final_loss": history[-1]["loss"], "bytes": weight_bytes(world_path("transformer")),
               "shift": backbone.scheduler.config.shift}
    return finish("world_backbone", params, paths, recipe, history, summary)


def shipped_vae() -> AutoencoderKL:
    """The VAE as users load it (fp16 weights in float32), so the transformer learns the latents it will see."""
    return AutoencoderKL.from_pretrained(world_path("vae"), torch_dtype=torch.float32).eval().requires_grad_(False)
