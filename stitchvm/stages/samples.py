"""Stage `samples`: N clean latents per prompt → safetensors shards + Parquet index (`--shards` runs a subset).

`pipeline`: the backbone's flow-matching Euler sampler with CFG (`diffusion.sampling.sample`, the one sampler every
caller uses; it reproduces the SD3 pipeline's loop), one seeded generator per sample, so a sample does not depend on
how samples are batched or sharded, nor on which of torchrun's processes writes its shard. `images`: the k-th image
(sorted by file name) of the sample's caption in an image folder, VAE-encoded. `smooth`: smooth latent fields (the
random-weight testbed).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from stitchvm.progress import tqdm

from stitchvm import distributed
from stitchvm.models.backbone import Backbone
from stitchvm.config import Params, to_dict
from stitchvm.data.image_folder import images_by_text, load_image
from stitchvm.data.latent_fields import smooth_latents
from stitchvm.data.storage import fingerprint, prune_shard_set, write_shard
from stitchvm.diffusion.sampling import sample
from stitchvm.stages.runtime import Paths, models
from stitchvm.stages.upstream import SAMPLES, must_write, num_shards, read_prompts, shards_to_run


def sample_seed(seed: int, sample_id: int) -> int:
    return seed * 2**32 + sample_id


def sample_rows(params: Params, prompts: pa.Table) -> pa.Table:
    """One row per sample: every prompt (in prompt_id order) × `per_prompt`."""
    n = params.samples.per_prompt
    ids = prompts.column("prompt_id").to_pylist()
    text, split = prompts.column("prompt").to_pylist(), prompts.column("split").to_pylist()
    rows = [(k * n + s, pid, text[k], split[k]) for k, pid in enumerate(ids) for s in range(n)]
    return pa.table({
        "sample_id": pa.array([r[0] for r in rows], pa.int64()),
        "prompt_id": pa.array([r[1] for r in rows], pa.int32()),
        "prompt": [r[2] for r in rows],
        "split": [r[3] for r in rows],
        "seed": pa.array([sample_seed(params.seed, r[0]) for r in rows], pa.int64()),
    })


def generate(backbone: Backbone, rows: pa.Table, params: Params) -> torch.Tensor:
    """(n, C, h, w) clean latents for `rows`."""
    cfg = params.samples
    seeds = rows.column("seed").to_pylist()
    size = backbone.image_size // backbone.vae_scale
    if cfg.source == "smooth":
        return torch.cat([smooth_latents(1, backbone.latent_channels, size, torch.Generator().manual_seed(s))
                          for s in seeds])
    if cfg.source == "images":
        return encode_folder_images(backbone, rows, params)
    prompts = rows.column("prompt").to_pylist()
    out = []
    for start in range(0, len(seeds), cfg.batch_size):
        batch = slice(start, start + cfg.batch_size)
        gens = [torch.Generator(backbone.device).manual_seed(s) for s in seeds[batch]]
        out.append(sample(backbone, prompts[batch], cfg.steps, cfg.guidance_scale, gens).float().cpu())
    return torch.cat(out)


def made_by(params: Params, rows: pa.Table) -> str:
    """The fingerprint of a samples shard: everything that decides its latents (the shard's own rows, prompts and
    seeds, are in its index; `batch_size` is left out: one generator per sample makes it irrelevant)."""
    cfg = {k: v for k, v in to_dict(params.samples).items() if k != "batch_size"}
    return fingerprint({"backbone": to_dict(params.backbone), "samples": cfg,
                        "rows": rows.select(["sample_id", "prompt", "seed"]).to_pydict()})


def run(params: Params, paths: Paths, shards: list[int] | None = None, progress: bool = True) -> dict:
    todo = shards_to_run(params, shards)
    storage = paths.storage()
    rows, size = sample_rows(params, read_prompts(storage)), params.storage.shard_size
    distributed.init_from_env()  # before the models: on CUDA each process builds them on its own GPU
    backbone, _ = models(params)
    written, rewritten = [], {}
    # under torchrun rank r of W writes shards r, r + W, ... of `todo`
    for shard in tqdm(distributed.rank_share(todo), desc="samples", disable=not progress or not distributed.is_main()):
        part = rows.slice(shard * size, size)
        fp = made_by(params, part)
        if not must_write(storage, SAMPLES, shard, fp, rewritten):
            continue
        write_shard(storage, SAMPLES, shard, {"latents": generate(backbone, part, params)}, part, shard * size, fp)
        written.append(shard)
    written, rewritten = distributed.gather_share(todo, written, rewritten)  # every rank's shards, all finished
    if shards is None and distributed.is_main():  # the whole set, every writer done: drop what it does not hold
        prune_shard_set(storage, SAMPLES, num_shards(params))  # (a killed writer's *.tmp-*, shards of a longer run)
    return {"path": storage.path(SAMPLES), "rows": rows.num_rows, "shards": num_shards(params), "written": written,
            "rewritten": rewritten}


def encode_folder_images(backbone: Backbone, rows: pa.Table, params: Params) -> torch.Tensor:
    folder, n = params.samples.image_folder, params.samples.per_prompt
    files = images_by_text(folder)
    pixels = []
    for sample_id, prompt in zip(rows.column("sample_id").to_pylist(), rows.column("prompt").to_pylist()):
        names = files.get(prompt, [])
        if len(names) < n:
            raise ValueError(f"{folder} has {len(names)} images captioned {prompt!r}; samples.per_prompt needs {n}")
        pixels.append(load_image(Path(folder) / names[sample_id % n], backbone.image_size))
    pixels = torch.stack(pixels)
    bs = params.samples.batch_size
    return torch.cat([backbone.encode(pixels[s:s + bs].to(backbone.device)).float().cpu()
                      for s in range(0, len(pixels), bs)])
