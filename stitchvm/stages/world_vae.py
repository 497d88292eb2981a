"""Stage `world_vae`: the embedded world's AutoencoderKL (32×32×3 scenes <-> 8×8×4 latents)."""
from __future__ import annotations

import torch

from stitchvm.config import Params
from stitchvm.world.autoencoder import train_vae
from stitchvm.models.world_source import world_path
from stitchvm.stages.bootstrap import finish, install, scene_stream, timed, weight_bytes
from stitchvm.stages.runtime import Paths


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    recipe = params.world.vae
    (vae, history), seconds = timed(
        train_vae, recipe.steps, recipe.batch_size, scene_stream(params, "world_vae"), progress,
        lr=recipe.lr, kl_weight=recipe.kl_weight, seed=params.world.seed,
        eval_every=max(1, recipe.steps // 5))
    with install("vae") as path:
        vae.to(torch.float16).save_pretrained(path)
    last = history[-1]
    summary = {"seconds": seconds, "final_loss": last["loss"], "bytes": weight_bytes(world_path("vae")),
               "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
               **({"psnr": last["psnr"]} if "psnr" in last else {})}
    return finish("world_vae", params, paths, recipe, history, summary, curve_keys=("loss", "mse", "kl"))
