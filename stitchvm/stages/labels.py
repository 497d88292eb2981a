"""Stage `labels`: the frozen teacher on the decoded clean images, shard by shard alongside `samples`.

Per sample: the l2-normalised image embedding, the per-token outputs of the reward's last block (what r_{≥j}
regresses onto, whatever j the search picks) and the scalar score for the sample's own prompt.
"""
from __future__ import annotations

import torch
from stitchvm.progress import tqdm

from stitchvm.config import Params
from stitchvm.value.training import teacher_targets
from stitchvm.data.storage import read_shards, shard_complete, write_shard
from stitchvm.stages.runtime import Paths, models, needs
from stitchvm.stages.upstream import LABELS, SAMPLES, num_shards


def run(params: Params, paths: Paths, shards: list[int] | None = None, progress: bool = True) -> dict:
    storage = paths.storage()
    backbone, reward = models(params)
    todo = shards if shards is not None else range(num_shards(params))
    written = []
    for shard in tqdm(todo, desc="labels", disable=not progress):
        if shard_complete(storage, LABELS, shard):
            continue
        tensors, index = read_shards(storage, SAMPLES, shards=[shard], progress=False,
                                     hint=needs("samples"))
        if index.num_rows == 0:
            raise FileNotFoundError(f"{storage.path(SAMPLES)} has no shard {shard}: {needs('samples')}")
        target = teacher_targets(backbone, reward, tensors["latents"], params.evaluate.batch_size)
        with torch.no_grad():
            text = reward.prompt_embeds(index.column("prompt").to_pylist())
            score = target.scores if text is None else reward.score(target.embeds, text.to(target.embeds.device))
        labels = {"embeds": target.embeds, "tokens": target.tokens, "score": score.float().cpu()}
        write_shard(storage, LABELS, shard, labels, index.select(["sample_id", "prompt_id", "split"]),
                    index.column("row")[0].as_py())
        written.append(shard)
    return {"path": storage.path(LABELS), "shards": num_shards(params), "written": written}
