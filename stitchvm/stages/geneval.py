"""GenEval of a stage's samples: the world's independent evaluator (stitchvm/world/evaluator.py) applied to clean
latents whose prompts carry specs (the built-in prompt set). Used by `evaluate` (the base generator's test samples)
and `guidance` (every method's samples); never a reward."""
from __future__ import annotations

from functools import lru_cache

import torch

from stitchvm.config import Params
from stitchvm.models.world_source import world_path
from stitchvm.world.evaluation import judge
from stitchvm.world.evaluator import load_evaluator


@lru_cache(maxsize=1)
def _evaluator():
    """The shipped evaluator, loaded once per process (guidance judges every method with it)."""
    return load_evaluator(world_path("evaluator.safetensors"))


@torch.no_grad()
def judge_latents(params: Params, backbone, z0: torch.Tensor, prompts: list[str],
                  specs: dict[str, tuple[str, dict | None]], batch_size: int = 256):
    """GenEval of clean latents by the world's evaluator: ({category: accuracy, "overall"}, (N,) bool verdicts,
    (N, 3, H, W) pixels); None unless the backbone is the world's and every prompt has a spec."""
    if params.backbone.source != "world:sd3" or any(specs.get(p, (None, None))[1] is None for p in prompts):
        return None
    evaluator = _evaluator()
    pixels = torch.cat([backbone.decode(z0[k:k + batch_size].to(backbone.device, backbone.vae.dtype)).float()
                        .clamp(-1, 1).cpu() for k in range(0, len(z0), batch_size)])
    accuracy, correct = judge(evaluator, pixels, [specs[p][1] for p in prompts], [specs[p][0] for p in prompts])
    return accuracy, correct, pixels


def geneval_columns(params: Params, backbone, z0: torch.Tensor, prompts: list[str],
                    specs: dict[str, tuple[str, dict | None]]) -> dict:
    """{"geneval": overall, "geneval_by_category": {category: accuracy}} of a method's samples, or {} where the
    evaluator does not apply (`judge_latents`): the columns a guidance row gains."""
    judged = judge_latents(params, backbone, z0, prompts, specs)
    if judged is None:
        return {}
    accuracy = dict(judged[0])
    return {"geneval": accuracy.pop("overall"), "geneval_by_category": accuracy}


def curve_geneval(params: Params, backbone, evaluations: list[torch.Tensor], prompts: list[str],
                  specs: dict[str, tuple[str, dict | None]]) -> list[float | None]:
    """The overall GenEval of each evaluation of an alignment run (`PolicyEvalSet.results`' (N, C, h, w) clean
    latents, in order, all of the same `prompts`); None where the evaluator does not apply."""
    out = []
    for z0 in evaluations:
        judged = judge_latents(params, backbone, z0, prompts, specs)
        out.append(None if judged is None else judged[0]["overall"])
    return out
