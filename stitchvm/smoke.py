"""The library end to end on one machine: build, search, finetune, evaluate, report.

`python -m stitchvm smoke --out reports/smoke.json`
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .backbone import build_backbone
from .config import Params, to_dict
from .distill import finetune, teacher_targets
from .evaluate import EvalSet, evaluate
from .latent_fields import round_robin_prompts, smooth_latents
from .reward import build_reward
from .search import search_stitch, stitched_from_search


def run(params: Params, out: str | Path | None = None, checkpoint_dir: str | Path | None = None,
        device: str = "cpu", progress: bool = True) -> dict:
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    backbone = build_backbone(params.backbone, device)
    reward = build_reward(params.reward, device)
    lap("build")
    gen = torch.Generator().manual_seed(params.seed)
    prompts = list(params.data.prompts)
    latent_size = backbone.image_size // backbone.vae_scale
    n_train = params.data.train_images_per_prompt * len(prompts)
    z_train = smooth_latents(n_train, backbone.latent_channels, latent_size, gen)
    eval_ids = round_robin_prompts(len(prompts), params.data.eval_images_per_prompt)
    data = EvalSet(smooth_latents(len(eval_ids), backbone.latent_channels, latent_size, gen), eval_ids, prompts)
    lap("data")
    probe = z_train[torch.randperm(len(z_train), generator=gen)[: params.search.probe_size]]
    result = search_stitch(backbone, reward, probe, params.search.j_max, params.search.batch_size, gen, progress)
    lap("search")
    model = stitched_from_search(backbone, reward, result)
    targets = teacher_targets(backbone, reward, z_train, params.eval.batch_size)
    history = finetune(model, z_train, targets, params.train, params.seed, checkpoint_dir, progress)
    lap("finetune")
    ev = evaluate(model, backbone, reward, data, params.eval.sigmas, params.seed + 1, params.eval.batch_size,
                  params.train.lambda_tok, progress)
    lap("evaluate")
    report = {
        **result.to_json(),
        **ev,
        "train": {"steps": params.train.steps, "first_loss": history[0]["loss"] if history else None,
                  "final_loss": history[-1]["loss"] if history else None},
        "timings_s": timings,
        "params": to_dict(params),
    }
    print(format_table(report))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict) -> str:
    cols = ["sigma", "method", "spearman", "spearman_within_prompt", "pearson", "recall_at_1", "distill_loss",
            "ms_per_eval", "peak_mem_mb"]
    cols = [c for c in cols if any(c in r for r in report["eval"])]

    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"stitch search: chose (i, j) = ({report['pair']['i']}, {report['pair']['j']}); "
             f"trivial-predictor loss {report['trivial_loss']:.4g}"]
    rows = [[cell(r.get(c)) for c in cols] for r in report["eval"]]
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
