"""Data assets: prompts, samples, labels, noisy (each calls its stage; the stage reads/writes the storage root)."""
from __future__ import annotations

import torch
from dagster import AssetCheckResult, MaterializeResult, MetadataValue, asset, asset_check
from safetensors.torch import load as load_safetensors

from stitchvm.stages import GRAPH
from stitchvm.stages.upstream import EVAL, LABELS, PROBE, SAMPLES, num_shards, read_prompts
from stitchvm.data.storage import read_index, sha256, shard_digests, shard_name, verify_shards

from assets.metadata import md_table, shard_metadata, stage_doc as doc
from assets.resources import StitchVMResource

GROUP = "data"


@asset(group_name=GROUP, deps=list(GRAPH["prompts"]), description=doc("prompts"))
def prompts(stitchvm: StitchVMResource) -> MaterializeResult:
    _, paths, summary = stitchvm.run_stage("prompts")
    table = read_prompts(paths.storage())
    return MaterializeResult(metadata={
        "dagster/row_count": summary["rows"],
        "path": MetadataValue.path(summary["path"]),
        "splits": MetadataValue.json(summary["splits"]),
        "preview": md_table(table.slice(0, 10).to_pylist(), ["prompt_id", "split", "prompt"]),
    })


def run_sharded(stitchvm: StitchVMResource, name: str, shapes_key: str, extra: dict) -> MaterializeResult:
    """Run a sharded stage (all shards; complete ones are skipped) and report per-shard metadata."""
    params, paths, summary = stitchvm.run_stage(name)
    index = read_index(paths.storage(), name, expected_shards=summary["shards"])
    return MaterializeResult(metadata={
        **shard_metadata(summary["path"], index, summary, params.storage.shard_size),
        **{k: v(params) for k, v in extra.items()},
        shapes_key: MetadataValue.text(index.column("shape")[0].as_py()),
    })


# Not Dagster-partitioned (a decision of the project): `dagster asset materialize --select '*'` refuses partitioned
# assets without --partition. One materialisation runs every shard; the stage skips shards that are already complete,
# and the metadata reports per-shard progress. Scale-out inside a step: STITCHVM_NPROC=N runs the stage under torchrun
# through Dagster Pipes (assets/torchrun.py), its N processes sharing the shards; across machines, single shards run
# with `python -m stitchvm samples --shards 0,3` (same for labels), and a later materialisation only fills the gaps.
@asset(group_name=GROUP, deps=list(GRAPH["samples"]), pool="gpu", description=doc("samples"))
def samples(stitchvm: StitchVMResource) -> MaterializeResult:
    return run_sharded(stitchvm, SAMPLES, "latent_shape", {"source": lambda p: p.samples.source})


@asset(group_name=GROUP, deps=list(GRAPH["labels"]), pool="gpu", description=doc("labels"))
def labels(stitchvm: StitchVMResource) -> MaterializeResult:
    return run_sharded(stitchvm, LABELS, "tensor_shapes",
                       {"reward": lambda p: MetadataValue.text(f"{p.reward.source} ({p.reward.kind})")})


@asset(group_name=GROUP, deps=list(GRAPH["noisy"]), description=doc("noisy"))
def noisy(stitchvm: StitchVMResource) -> MaterializeResult:
    _, paths, summary = stitchvm.run_stage("noisy")
    storage = paths.storage()
    return MaterializeResult(metadata={
        "dagster/row_count": summary["probe"] + summary["eval"],
        "probe_rows": summary["probe"],
        "eval_rows": summary["eval"],
        "sigmas": MetadataValue.json(summary["sigmas"]),
        "probe_path": MetadataValue.path(storage.path(PROBE)),
        "eval_path": MetadataValue.path(storage.path(EVAL)),
    })


# ---- checks -------------------------------------------------------------------------------------------------------
def checksums(stitchvm: StitchVMResource, name: str) -> AssetCheckResult:
    """Every shard of `name` present and matching the sha256 in its index part."""
    params = stitchvm.params()
    storage, n = stitchvm.paths(params).storage(), num_shards(params)
    try:
        bad = verify_shards(storage, name, progress=False, expected_shards=n)
    except FileNotFoundError as e:
        return AssetCheckResult(passed=False, metadata={"shards": n, "error": MetadataValue.text(str(e))})
    return AssetCheckResult(passed=not bad, metadata={
        "shards": n, "bad_shards": len(bad), "bad_paths": MetadataValue.json(bad),
        "path": MetadataValue.path(storage.path(name))})


@asset_check(asset="samples", blocking=True, description="every samples shard present, sha256 matching its index")
def samples_checksums(stitchvm: StitchVMResource) -> AssetCheckResult:
    return checksums(stitchvm, SAMPLES)


@asset_check(asset="labels", blocking=True, description="every labels shard present, sha256 matching its index")
def labels_checksums(stitchvm: StitchVMResource) -> AssetCheckResult:
    return checksums(stitchvm, LABELS)


@asset_check(asset="labels", blocking=True, description="embeds, tokens and score of every label are finite")
def labels_finite(stitchvm: StitchVMResource) -> AssetCheckResult:
    params = stitchvm.params()
    storage = stitchvm.paths(params).storage()
    non_finite: dict[str, int] = {}
    try:
        index = read_index(storage, LABELS, expected_shards=num_shards(params))
        for shard, digest in shard_digests(index).items():  # one shard in memory at a time
            data = storage.read_bytes(shard_name(LABELS, shard))
            if sha256(data) != digest:
                raise ValueError(f"{storage.path(shard_name(LABELS, shard))} does not match its index sha256")
            for key, t in load_safetensors(data).items():
                non_finite[key] = non_finite.get(key, 0) + int((~torch.isfinite(t)).sum())
    except (FileNotFoundError, ValueError) as e:  # missing or corrupted shards
        return AssetCheckResult(passed=False, metadata={"error": MetadataValue.text(str(e))})
    return AssetCheckResult(passed=not any(non_finite.values()), metadata={
        "rows": index.num_rows, "non_finite": MetadataValue.json(dict(sorted(non_finite.items())))})


@asset_check(asset="labels", blocking=True, description="one label per sample, every shard present")
def labels_complete(stitchvm: StitchVMResource) -> AssetCheckResult:
    params = stitchvm.params()
    storage, n = stitchvm.paths(params).storage(), num_shards(params)
    try:
        samples_index = read_index(storage, SAMPLES, expected_shards=n)
        labels_index = read_index(storage, LABELS, expected_shards=n)
    except FileNotFoundError as e:
        return AssetCheckResult(passed=False, metadata={"shards": n, "error": MetadataValue.text(str(e))})
    same_ids = labels_index.column("sample_id").equals(samples_index.column("sample_id"))
    return AssetCheckResult(passed=labels_index.num_rows == samples_index.num_rows and same_ids, metadata={
        "shards": n, "label_rows": labels_index.num_rows, "sample_rows": samples_index.num_rows,
        "same_sample_ids": same_ids})


ASSETS = [prompts, samples, labels, noisy]
CHECKS = [samples_checksums, labels_checksums, labels_finite, labels_complete]
