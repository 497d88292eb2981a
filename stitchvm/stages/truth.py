"""Stage `truth`: the true value of the stored noisy test latents, by Monte Carlo (value/monte_carlo.py).

V*(z_σ) = E[r(D(z0)) | z_σ] at `evaluate.mc_sigmas`, by `evaluate.mc_rollouts` rollouts per latent of the sampler that
drew the data (samples.steps, samples.guidance_scale). It depends on the world, the data and the noise, never on the
value model: a stage of its own, so that a retrained value model is evaluated without it (on 2 cores the truth is
12 of the evaluation's 14 minutes). `evaluate` and `bench value` read it (upstream.read_truth).

Writes data/truth/values.safetensors ({"sigma_<σ>": (N,)}, in noisy/eval's order of the test latents) and
data/truth/summary.json (rollouts, sigmas, the latents' sample ids, the mean value per σ; written last: it marks the
stage complete). The seconds go to the run record reports/runs/truth.json. With mc_rollouts 0 both are written empty.
"""
from __future__ import annotations

import time

import torch
from safetensors.torch import save as save_safetensors

from stitchvm.config import Params
from stitchvm.data.storage import read_index
from stitchvm.stages.run_record import write_record
from stitchvm.stages.runtime import Paths, models, needs
from stitchvm.stages.upstream import SAMPLES, TRUTH, num_shards, read_noisy_eval, truth_key
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
    values, ids = {}, []
    if cfg.mc_rollouts:
        backbone, reward = models(params)
        noisy, ids = read_noisy_eval(storage, params, cfg.mc_sigmas)
        index = read_index(storage, SAMPLES, hint=needs("samples"), expected_shards=num_shards(params))
        prompt_of = dict(zip(index.column("sample_id").to_pylist(), index.column("prompt").to_pylist()))
        values = true_values(params, backbone, reward, noisy, [prompt_of[i] for i in ids], progress)
    seconds = round(time.perf_counter() - start, 3)
    storage.write_bytes_atomic(f"{TRUTH}/values.safetensors",
                               save_safetensors({truth_key(s): v.contiguous() for s, v in values.items()}))
    summary = {"rollouts": cfg.mc_rollouts, "sigmas": list(cfg.mc_sigmas), "latents": len(ids),
               "mean_value": {truth_key(s): v.mean().item() for s, v in values.items()}, "sample_ids": ids}
    storage.write_json(f"{TRUTH}/summary.json", summary)  # last: marks the stage complete
    write_record(paths.reports, "truth", {"seconds": seconds})
    return {**{k: v for k, v in summary.items() if k != "sample_ids"}, "seconds": seconds,
            "path": storage.path(TRUTH)}
