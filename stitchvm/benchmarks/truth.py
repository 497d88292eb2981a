"""Benchmark `truth`: how precisely the Monte Carlo value measures the true value, and how close each estimate is to it.

`python -m stitchvm bench truth --profile NAME --out PATH [--rollouts R]` reads the profile's pipeline data (run the
stages up to `train`: the stored noisy test latents and the trained value model) and, at each σ of
`evaluate.mc_sigmas`, rolls out every noisy test latent R times (two independent halves of R / 2, drawn from two
generators) and scores the profile's value model and the Tweedie estimate r(D(ẑ0)) on the same latents.

The evaluation judges each method by its within-prompt Spearman with an R-rollout Monte Carlo mean, and that mean is
itself noisy: a method equal to the true value V* = E[r | z_t] would not reach 1. Split-half reliability measures how
noisy it is (classical test theory, applied here to within-prompt rank correlations, so approximate):

- `split_half`: within-prompt Spearman between the two halves' means (the reliability ρ_{R/2} of an R/2-rollout mean);
- `reliability_R`: ρ_R = 2 ρ_{R/2} / (1 + ρ_{R/2}) (Spearman-Brown), that of the full R-rollout mean;
- `perfect_vs_mc`: √ρ_{R/2}, the agreement that V* itself would show with an R/2-rollout mean (with R = 16: the
  8-rollout mean of the evaluate stage), the ceiling for `spearman_within_prompt_vs_mc` in `reports/eval.json`;
- per method: `vs_mc` (agreement with the R-rollout mean), and `vs_true` = vs_mc / √ρ_R, the agreement with V*
  corrected for the Monte Carlo noise (may exceed 1 by noise where a method is near V*).

JSON: {"device", "profile", "rollouts", "seconds", "value_model", "rows": [{sigma, split_half, reliability_R,
perfect_vs_mc, method, vs_mc, vs_true}], "by_category": {category: [rows]}}.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from stitchvm.benchmarks import load_profile
from stitchvm.stages import tables

COLUMNS = ("sigma", "method", "vs_mc", "vs_true", "split_half", "reliability_R", "perfect_vs_mc")


def reliability_rows(sigma: float, methods: dict[str, torch.Tensor], half_a: torch.Tensor, half_b: torch.Tensor,
                     groups: torch.Tensor) -> list[dict]:
    """One row per method at `sigma`: its agreement with the mean of the two halves and with the true value
    (corrected by the halves' split-half reliability); see the module docstring."""
    from stitchvm.value.ranking import spearman_within_groups

    split = spearman_within_groups(half_a, half_b, groups)
    reliability = 2 * split / (1 + split) if split > 0 else float("nan")
    mc = (half_a + half_b) / 2
    rows = []
    for name, values in methods.items():
        vs_mc = spearman_within_groups(values, mc, groups)
        rows.append({"sigma": sigma, "method": name, "vs_mc": vs_mc,
                     "vs_true": vs_mc / reliability ** 0.5 if reliability > 0 else float("nan"),
                     "split_half": split, "reliability_R": reliability,
                     "perfect_vs_mc": split ** 0.5 if split > 0 else float("nan")})
    return rows


@torch.no_grad()
def estimates(backbone, reward, value_model, z_t: torch.Tensor, sigma: float, prompts: list[str], batch_size: int
              ) -> dict[str, torch.Tensor]:
    """{"stitchvm": (N,) V(z_t), "tweedie": (N,) r(D(ẑ0))} on each latent's own prompt."""
    from stitchvm.guidance.fk import stitchvm_potential, tweedie_potential

    out = {}
    potentials = {"stitchvm": stitchvm_potential(value_model), "tweedie": tweedie_potential(backbone, reward)}
    for name, potential in potentials.items():
        parts = []
        for s in range(0, len(z_t), batch_size):
            z = z_t[s:s + batch_size].to(backbone.device)
            parts.append(potential(z, torch.full((len(z),), sigma, device=z.device), prompts[s:s + batch_size])
                         .float().cpu())
        out[name] = torch.cat(parts)
    return out


def run(profile: str, out: str | Path, *, rollouts: int = 16, progress: bool = True) -> dict:
    from stitchvm.data.storage import open_root
    from stitchvm.stages.evaluate import eval_inputs
    from stitchvm.stages.runtime import models
    from stitchvm.stages.upstream import value_model_dir
    from stitchvm.value.model import StitchedValueModel
    from stitchvm.value.monte_carlo import monte_carlo_value

    if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 2 or rollouts % 2:
        raise ValueError(f"--rollouts must be an even integer >= 2 (two halves), got {rollouts!r}")
    name, params = load_profile(profile)
    storage = open_root(params.storage.root, params.storage.options)
    backbone, reward = models(params)
    model_dir = value_model_dir(storage)
    value_model = StitchedValueModel.from_pretrained(model_dir, backbone, reward, device=backbone.device).eval()
    data, noisy, _, sample_prompts, _, _ = eval_inputs(params, storage)
    cfg, start = params.evaluate, time.perf_counter()
    rows, by_category = [], {}
    categories = None if data.categories is None else [data.categories[k] for k in data.prompt_ids.tolist()]
    for sigma in cfg.mc_sigmas:
        z_t = noisy[sigma]
        halves = [monte_carlo_value(backbone, reward, z_t, sigma, sample_prompts, rollouts // 2,
                                    params.samples.steps, params.samples.guidance_scale,
                                    torch.Generator(backbone.device).manual_seed(params.seed + 1000 * (h + 1)),
                                    cfg.batch_size, progress=progress) for h in range(2)]
        methods = estimates(backbone, reward, value_model, z_t, sigma, sample_prompts, cfg.batch_size)
        rows += reliability_rows(sigma, methods, *halves, data.prompt_ids)
        for c in dict.fromkeys(categories or []):
            m = torch.tensor([x == c for x in categories])
            by_category.setdefault(c, []).extend(reliability_rows(
                sigma, {k: v[m] for k, v in methods.items()}, halves[0][m], halves[1][m], data.prompt_ids[m]))
    result = {"device": str(backbone.device), "host": platform.node(), "profile": name, "rollouts": rollouts,
              "seconds": round(time.perf_counter() - start, 1), "value_model": str(model_dir), "rows": rows,
              "by_category": by_category}
    print(tables.format_table(rows, COLUMNS))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
