"""Evaluation on held-out clean latents forward-noised at a σ grid, against the teacher on the clean image.

Methods compared on the same noisy inputs: the stitched value model and the Tweedie baseline r(D(ẑ0)), where
ẑ0 = z_t - t · v_θ(z_t, t, c) uses the backbone's own conditional velocity for the image's prompt.
Pooled correlations use every (image, prompt) pair for a CLIP reward (every image for a scalar head); within-prompt
Spearman ranks the images of one prompt and averages over prompts, since across prompts the ranking is mostly the
prompt's. Where the Monte Carlo value (monte_carlo.py) of a noisy set is given, each method's rows also report its
within-prompt agreement with that true value, and a `monte-carlo` row its agreement with the teacher: the ceiling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from stitchvm.progress import tqdm

from stitchvm.models.backbone import Backbone
from stitchvm.value.training import TeacherTargets, distillation_loss, teacher_targets, trivial_loss
from stitchvm.diffusion.flow import forward_noise, tweedie_z0
from stitchvm.profiling import measure
from stitchvm.value.ranking import pearson, recall_at_1, spearman, spearman_within_groups
from stitchvm.models.reward import ClipReward
from stitchvm.value.model import StitchedValueModel

Features = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class NoisyEvalSet:
    z0: torch.Tensor  # (N, C, H, W) clean latents
    prompt_ids: torch.Tensor  # (N,) index into prompts
    prompts: list[str]
    categories: list[str] | None = None  # one per prompt (GenEval category), for the per-category section

    def __post_init__(self):
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError(f"{len(self.categories)} categories for {len(self.prompts)} prompts")
        if len(self.z0) != len(self.prompt_ids):
            raise ValueError(f"{len(self.z0)} latents but {len(self.prompt_ids)} prompt ids")
        if len(self.prompt_ids) and int(self.prompt_ids.max()) >= len(self.prompts):
            raise ValueError(f"prompt id {int(self.prompt_ids.max())} but only {len(self.prompts)} prompts")


def stitch_features(model: StitchedValueModel, prompts: list[str]) -> Features:
    return lambda z_t, t, pid: model.embed(z_t, t, [prompts[k] for k in pid.tolist()])


def tweedie_features(backbone: Backbone, reward: ClipReward, prompts: list[str]) -> Features:
    embeds, pooled = backbone.encode_prompts(prompts)  # (K, L, D), (K, P)

    def features(z_t, t, pid):
        v = backbone.velocity(z_t, t, embeds[pid], pooled[pid])
        return reward.image_features(backbone.decode(tweedie_z0(z_t, t, v)))

    return features


@torch.no_grad()
def _batched(fn: Features, z_t, t, pid, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [fn(z_t[s:s + batch_size].to(device), t[s:s + batch_size].to(device), pid[s:s + batch_size].to(device))
            for s in range(0, len(z_t), batch_size)]
    return torch.cat([e.cpu() for e, _ in outs]), torch.cat([h.cpu() for _, h in outs])


def _by_category(own: torch.Tensor, teacher_own: torch.Tensor, data: NoisyEvalSet,
                 true_values: torch.Tensor | None) -> dict:
    """{category: the within-prompt metrics on that category's prompts only}."""
    category_of = [data.categories[k] for k in data.prompt_ids.tolist()]
    out = {}
    for c in dict.fromkeys(data.categories):
        m = torch.tensor([x == c for x in category_of])
        groups = data.prompt_ids[m]
        row = {"spearman_within_prompt": spearman_within_groups(own[m], teacher_own[m], groups)}
        if true_values is not None:
            row["spearman_within_prompt_vs_mc"] = spearman_within_groups(own[m], true_values[m], groups)
        out[c] = row
    return out


def _metrics(reward: ClipReward, embeds, tokens, teacher: TeacherTargets, teacher_matrix, text, data: NoisyEvalSet,
             lambda_tok: float, true_values: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    matrix = reward.score_matrix(embeds.to(text.device), text).cpu()  # (N, K)
    n = torch.arange(len(matrix))
    own, teacher_own = matrix[n, data.prompt_ids], teacher_matrix[n, data.prompt_ids]
    pooled = (matrix, teacher_matrix) if reward.reads_prompt else (own, teacher_own)
    row = {
        "spearman": spearman(*pooled),
        "spearman_within_prompt": spearman_within_groups(own, teacher_own, data.prompt_ids),
        "pearson": pearson(*pooled),
        "distill_loss": distillation_loss(embeds, tokens, teacher, lambda_tok)["loss"].item(),
    }
    if reward.reads_prompt and len(data.prompts) >= 2:
        row["recall_at_1"] = recall_at_1(matrix, data.prompt_ids)
    if true_values is not None:
        row["spearman_within_prompt_vs_mc"] = spearman_within_groups(own, true_values, data.prompt_ids)
    return row, own


def noise_grid(z0: torch.Tensor, sigmas: tuple[float, ...], generator: torch.Generator) -> dict[float, torch.Tensor]:
    """{σ: z_σ} with fresh noise for each σ, drawn in σ order."""
    return {float(s): forward_noise(z0, torch.full((len(z0),), float(s)), torch.randn(z0.shape, generator=generator))
            for s in sigmas}


def evaluate_value_model(model: StitchedValueModel, backbone: Backbone, reward: ClipReward, data: NoisyEvalSet,
             noisy: dict[float, torch.Tensor], batch_size: int, lambda_tok: float = 1.0,
             teacher: TeacherTargets | None = None, progress: bool = True,
             true_values: dict[float, torch.Tensor] | None = None) -> dict:
    """Rows `{sigma, method, spearman, spearman_within_prompt, pearson, [recall_at_1], distill_loss, ms_per_eval,
    peak_mem_mb}` for each σ of `noisy` ({σ: (N, C, H, W) noised data.z0}) and method, plus the teacher's clean
    Recall@1 and the trivial predictor's loss. `teacher` (on data.z0) is computed when not given.

    `true_values` ({σ: (N,) Monte Carlo value of noisy[σ]}, any subset of its σ) adds `spearman_within_prompt_vs_mc`
    to those σ's rows and a row `{sigma, method: "monte-carlo", spearman_within_prompt}`. With `data.categories`,
    `by_category` holds {category: {method: {sigma_S: within-prompt metrics on that category's prompts}}}."""
    true_values = true_values or {}
    if set(true_values) - set(noisy):
        raise ValueError(f"Monte Carlo values at σ {sorted(set(true_values) - set(noisy))} have no noisy set "
                         f"(noisy σ: {sorted(noisy)})")
    for sigma, values in true_values.items():
        if values.shape != (len(data.z0),):
            raise ValueError(f"Monte Carlo values at σ={sigma} have shape {tuple(values.shape)}, expected "
                             f"({len(data.z0)},)")
    device = backbone.device
    model.eval()
    if teacher is None:
        teacher = teacher_targets(backbone, reward, data.z0, batch_size)
    text = reward.text_embeds(data.prompts)  # (K, E)
    teacher_matrix = reward.score_matrix(teacher.embeds.to(text.device), text).cpu()
    methods = {"stitchvm": stitch_features(model, data.prompts),
               "tweedie": tweedie_features(backbone, reward, data.prompts)}
    cost = {name: _cost(fn, data, batch_size, device) for name, fn in methods.items()}
    rows, by_category = [], {}
    teacher_own = teacher_matrix[torch.arange(len(data.z0)), data.prompt_ids]
    for sigma, z_t in tqdm(noisy.items(), desc="evaluate", disable=not progress):
        if z_t.shape != data.z0.shape:
            raise ValueError(f"noisy latents at σ={sigma} have shape {tuple(z_t.shape)}, the clean set "
                             f"{tuple(data.z0.shape)}")
        t = torch.full((len(z_t),), float(sigma))
        for name, fn in methods.items():
            embeds, tokens = _batched(fn, z_t, t, data.prompt_ids, batch_size, device)
            row = {"sigma": float(sigma), "method": name}
            metrics, own = _metrics(reward, embeds, tokens, teacher, teacher_matrix, text, data, lambda_tok,
                                    true_values.get(sigma))
            row.update(metrics)
            row.update(cost[name])
            rows.append(row)
            if data.categories is not None:
                for c, m in _by_category(own, teacher_own, data, true_values.get(sigma)).items():
                    by_category.setdefault(c, {}).setdefault(name, {})[f"sigma_{sigma}"] = m
        if sigma in true_values:
            rows.append({"sigma": float(sigma), "method": "monte-carlo", "spearman_within_prompt":
                         spearman_within_groups(true_values[sigma], teacher_own, data.prompt_ids)})
            if data.categories is not None:
                for c, m in _by_category(true_values[sigma], teacher_own, data, None).items():
                    by_category.setdefault(c, {}).setdefault("monte-carlo", {})[f"sigma_{sigma}"] = m
    report = {"eval": rows, "trivial_loss": trivial_loss(teacher, lambda_tok)}
    if by_category:
        report["by_category"] = by_category
    if reward.reads_prompt and len(data.prompts) >= 2:
        report["teacher_recall_at_1"] = recall_at_1(teacher_matrix, data.prompt_ids)
    return report


def _cost(fn: Features, data: NoisyEvalSet, batch_size: int, device) -> dict:
    """ms per evaluated latent and peak memory of one batch forward at σ = 0.5."""
    b = min(batch_size, len(data.z0))
    z_t = torch.randn((b, *data.z0.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((b,), 0.5, device=device)
    pid = data.prompt_ids[:b].to(device)
    with torch.no_grad():
        ms, peak = measure(lambda: fn(z_t, t, pid), device)
    return {"ms_per_eval": ms / b, "peak_mem_mb": peak}
