"""Stage `truth`: the true value of the stored noisy test latents, by Monte Carlo (value/monte_carlo.py).

V*(z_σ) = E[r(D(z0)) | z_σ] at `evaluate.mc_sigmas`, by `evaluate.mc_rollouts` rollouts per latent of the sampler that
drew the data (samples.steps, samples.guidance_scale). It depends on the world, the data and the noise, never on the
value model: a stage of its own, so that a retrained value model is evaluated without it (on 2 cores the truth is
12 of the evaluation's 14 minutes). `evaluate` and `bench value` read it (upstream.read_truth).

Writes data/truth/values.safetensors ({"sigma_<σ>": (N,)}, in noisy/eval's order of the test latents) and
data/truth/summary.json (rollouts, sigmas, the latents' sample ids, the mean value per σ, and `made_by`: the
fingerprint of the models, seed, sampler and latents, which the readers check; written last: it marks the stage
complete). The seconds go to the run record reports/runs/truth.json. With mc_rollouts 0 both are written empty.
A re-run whose inputs made the stored truth (the same `made_by`: a Dagster re-materialisation) keeps it instead of
rolling out again; DVC deletes the outputs before it runs a stage, so `dvc repro -f truth` always recomputes.
"""
from __future__ import annotations

import time

import torch
from safetensors import SafetensorError
from safetensors.torch import save as save_safetensors

from stitchvm.config import Params
from stitchvm.data.storage import read_index
from stitchvm.stages.run_record import write_record
from stitchvm.stages.runtime import Paths, models, needs
from stitchvm.stages.upstream import (SAMPLES, TRUTH, num_shards, read_noisy_eval, read_truth, truth_key,
                                      truth_made_by)
from stitchvm.value.monte_carlo import monte_carlo_value


def true_values(params: Params, backbone, reward, noisy: dict[float, torch.Tensor], prompts: list[str],
                progress: bool) -> dict[float, torch.Tensor]:
    """{σ: (N,) Monte Carlo value of noisy[σ]} at evaluate.mc_sigmas, each latent continued under its prompt; one
    seeded generator draws every rollout, σ after σ in mc_sigmas' order."""
    cfg = params.evaluate
    gen = torch.Generator(backbone.device).manual_seed(params.seed)
    return {s: monte_carlo_value(backbone, reward, noisy[s], s, prompts, cfg.mc_rollouts, params.samples.steps,
                                 params.samples.guidance_scale, gen, cfg.batch_size, progress=progress)
            for s in cfg.mc_sigmas}


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    storage = paths.storage()
    cfg = params.evaluate
    start = time.perf_counter()
    values, ids, made_by, reused = {}, [], None, False
    if cfg.mc_rollouts:
        noisy, ids = read_noisy_eval(storage, params, cfg.mc_sigmas)
        index = read_index(storage, SAMPLES, hint=needs("samples"), expected_shards=num_shards(params))
        prompt_of = dict(zip(index.column("sample_id").to_pylist(), index.column("prompt").to_pylist()))
        prompts = [prompt_of[i] for i in ids]
        made_by = truth_made_by(params, noisy, prompts)
        values = stored_truth(storage, params, noisy, prompts, ids)  # made by these inputs: a re-materialisation
        reused = values is not None
        if not reused:
            backbone, reward = models(params)
            values = true_values(params, backbone, reward, noisy, prompts, progress)
    seconds = round(time.perf_counter() - start, 3)
    summary = {"rollouts": cfg.mc_rollouts, "sigmas": list(cfg.mc_sigmas), "latents": len(ids),
               "mean_value": {truth_key(s): v.mean().item() for s, v in values.items()}, "sample_ids": ids,
               "made_by": made_by}
    if not reused:
        storage.write_bytes_atomic(f"{TRUTH}/values.safetensors",
                                   save_safetensors({truth_key(s): v.contiguous() for s, v in values.items()}))
        storage.write_json(f"{TRUTH}/summary.json", summary)  # last: marks the stage complete
        write_record(paths.reports, "truth", {"seconds": seconds})
    return {**{k: v for k, v in summary.items() if k != "sample_ids"}, "seconds": seconds, "reused": reused,
            "path": storage.path(TRUTH)}


def stored_truth(storage, params: Params, noisy: dict[float, torch.Tensor], prompts: list[str],
                 ids: list[int]) -> dict[float, torch.Tensor] | None:
    """The stored truth when `read_truth` accepts it for these inputs, else None (none stored, made by other inputs,
    or damaged)."""
    try:
        return read_truth(storage, params, noisy, prompts, ids)
    except (FileNotFoundError, ValueError, KeyError, SafetensorError):
        return None
