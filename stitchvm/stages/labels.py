"""Stage `labels`: the frozen teacher on the decoded clean images, shard by shard alongside `samples`.

Per sample: the l2-normalised image embedding, the per-token outputs of the reward's last block (what r_{≥j}
regresses onto, whatever j the search picks) and the scalar score for the sample's own prompt. A shard's labels depend
on its samples shard alone, so torchrun's processes split the shards between them.
"""
from __future__ import annotations


import torch
from stitchvm.progress import tqdm

from stitchvm import distributed
from stitchvm.config import Params, to_dict
from stitchvm.value.training import teacher_targets
from stitchvm.data.storage import fingerprint, prune_shard_set, read_shards, shard_index_name, write_shard
from stitchvm.stages.runtime import Paths, models, needs
from stitchvm.stages.samples import sample_rows
from stitchvm.stages.upstream import LABELS, SAMPLES, must_write, num_shards, read_prompts, shards_to_run


def run(params: Params, paths: Paths, shards: list[int] | None = None, progress: bool = True) -> dict:
    todo = shards_to_run(params, shards)
    storage = paths.storage()
    distributed.init_from_env()  # before the models: on CUDA each process builds them on its own GPU
    backbone, reward = models(params)
    written, rewritten = [], {}
    encode_prompts_in_shard_order(reward, params, storage)
    # under torchrun rank r of W labels shards r, r + W, ... of `todo`
    for shard in tqdm(distributed.rank_share(todo), desc="labels", disable=not progress or not distributed.is_main()):
        fp = made_by(params, read_shard_index(storage, SAMPLES, shard))
        if not must_write(storage, LABELS, shard, fp, rewritten):
            continue
        tensors, index = read_shards(storage, SAMPLES, shards=[shard], progress=False,
                                     hint=needs("samples"))
        target = teacher_targets(backbone, reward, tensors["latents"], params.evaluate.batch_size)
        with torch.no_grad():
            text = reward.prompt_embeds(index.column("prompt").to_pylist())
            score = target.scores if text is None else reward.score(target.embeds, text.to(target.embeds.device))
        labels = {"embeds": target.embeds, "tokens": target.tokens, "score": score.float().cpu()}
        write_shard(storage, LABELS, shard, labels, index.select(["sample_id", "prompt_id", "split"]),
                    index.column("row")[0].as_py(), fp)
        written.append(shard)
    written, rewritten = distributed.gather_share(todo, written, rewritten)  # every rank's shards, all finished
    if shards is None and distributed.is_main():  # the whole set, every writer done: drop what it does not hold
        prune_shard_set(storage, LABELS, num_shards(params))  # (a killed writer's *.tmp-*, shards of a longer run)
    return {"path": storage.path(LABELS), "shards": num_shards(params), "written": written, "rewritten": rewritten}


@torch.no_grad()
def encode_prompts_in_shard_order(reward, params: Params, storage) -> None:
    """Fill the reward's text cache as a full run meets the prompts: shard by shard from shard 0. A prompt's text
    embedding varies in its last bit with the other prompts it is encoded with, and the cache keeps the first; so
    a shard's scores depend on the shard alone, not on the rank that labels it or the shards labelled before."""
    if not reward.reads_prompt:
        return
    prompts, size = sample_rows(params, read_prompts(storage)).column("prompt").to_pylist(), params.storage.shard_size
    for start in range(0, len(prompts), size):
        reward.prompt_embeds(prompts[start:start + size])


def made_by(params: Params, samples_part) -> str:
    """The fingerprint of a labels shard: the teacher (reward and decoder), the batch it runs in, and the exact
    samples shard it labels (its sha256)."""
    return fingerprint({"backbone": to_dict(params.backbone), "reward": to_dict(params.reward),
                        "batch_size": params.evaluate.batch_size, "samples": samples_part.column("sha256")[0].as_py()})


def read_shard_index(storage, name: str, shard: int):
    """The index part of one upstream shard; a missing one names the stage to run."""
    try:
        return storage.read_table(shard_index_name(name, shard))
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.path(name)} has no shard {shard}: {needs('samples')}") from None
