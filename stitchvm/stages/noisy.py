"""Stage `noisy`: the fixed noisy inputs, stored so that search and evaluation are reproducible across runs.

`noisy/probe`: `probe_size` train latents at t ~ U[0, 1] (stage-1 fits). `noisy/eval`: every test latent at every σ of
the evaluation grid (fresh noise per σ).
"""
from __future__ import annotations

import pyarrow as pa
import torch

from stitchvm.config import Params
from stitchvm.diffusion.flow import forward_noise
from stitchvm.data.storage import write_shards
from stitchvm.stages.runtime import Paths
from stitchvm.stages.upstream import EVAL, PROBE, read_split


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    storage = paths.storage()
    gen = torch.Generator().manual_seed(params.seed + 1)
    z_train, train_rows = read_split(storage, params, "train")
    probe = torch.randperm(len(z_train), generator=gen)[: params.noisy.probe_size]
    t = torch.rand(len(probe), generator=gen)
    z_t = forward_noise(z_train[probe], t, torch.randn(z_train[probe].shape, generator=gen))
    probe_ids = train_rows.column("sample_id").take(pa.array(probe.tolist()))
    write_shards(storage, PROBE, {"z_t": z_t, "t": t}, {"sample_id": probe_ids}, params.storage.shard_size, progress)

    z_test, test_rows = read_split(storage, params, "test")
    sigmas = params.noisy.sigmas
    noisy = torch.cat([forward_noise(z_test, torch.full((len(z_test),), s), torch.randn(z_test.shape, generator=gen))
                       for s in sigmas])
    ids = test_rows.column("sample_id").to_pylist()
    rows = {"sample_id": pa.array(ids * len(sigmas), pa.int64()),
            "sigma": pa.array([float(s) for s in sigmas for _ in ids], pa.float64())}
    write_shards(storage, EVAL, {"z_t": noisy}, rows, params.storage.shard_size, progress)
    return {"probe": len(probe), "eval": len(noisy), "sigmas": list(sigmas)}
