"""Reading upstream stage outputs; every missing input names the stage to run first."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors

from stitchvm.config import Params, to_dict
from stitchvm.value.training import TeacherTargets
from stitchvm.value.search import SearchResult
from stitchvm.data.storage import (NOT_WRITTEN, Storage, fingerprint, read_index, read_shards, sha256,
                                   shard_status)
from stitchvm.data.shard_dataset import ShardRows, gather_rows
from stitchvm.stages.runtime import needs
from stitchvm.stages.run_record import read_record, record_path

PROMPTS = "prompts.parquet"
SAMPLES, LABELS = "samples", "labels"
PROBE, EVAL = "noisy/probe", "noisy/eval"
SEARCH, VALUE_MODEL = "search", "value_model"
TRUTH = "truth"
TRAIN_SUMMARY = "train/summary.json"
log = logging.getLogger(__name__)


def num_shards(params: Params) -> int:
    """Shards of `samples` and `labels`: known from params alone, so Dagster can declare the partitions up front."""
    p = params.prompts
    rows = (p.train + p.val + p.test) * params.samples.per_prompt
    return -(-rows // params.storage.shard_size)


def noisy_shards(params: Params) -> dict[str, int]:
    """Shards of `noisy/probe` and `noisy/eval`, from params alone: a set left short by a killed `noisy` run fails its
    reader (naming the missing shards) instead of being read as it is."""
    p, per_prompt, size = params.prompts, params.samples.per_prompt, params.storage.shard_size
    probe = min(params.noisy.probe_size, p.train * per_prompt)
    evals = p.test * per_prompt * len(params.noisy.sigmas)
    return {PROBE: -(-probe // size), EVAL: -(-evals // size)}


def shards_to_run(params: Params, shards: list[int] | None) -> list[int]:
    """The shards a sharded stage runs: all of them, or the given ones, which must exist."""
    n = num_shards(params)
    if shards is None:
        return list(range(n))
    bad = [s for s in shards if not 0 <= s < n]
    if bad or not shards:
        raise ValueError(f"shard {bad[0] if bad else '(none)'} does not exist: the set has shards 0..{n - 1} "
                         f"(prompts × samples.per_prompt / storage.shard_size)")
    return list(shards)


def must_write(storage: Storage, name: str, shard: int, made_by: str, rewritten: dict[int, str]) -> bool:
    """Whether a shard of a sharded stage must be written: not written yet, damaged, or made by other params or
    inputs than `made_by`. A present shard written again is logged and recorded in `rewritten` with the reason."""
    status = shard_status(storage, name, shard, made_by)
    if status is not None and status != NOT_WRITTEN:
        rewritten[shard] = status
        log.warning("%s: writing shard %d again: %s", name, shard, status)
    return status is not None


def read_prompts(storage: Storage) -> pa.Table:
    return storage.read_table(PROMPTS, hint=needs("prompts"))


def prompts_in_split(table: pa.Table, split: str) -> list[str]:
    """The prompts of one split (train | val | test) of a `prompts.parquet` table, in prompt_id order."""
    return [p for p, s in zip(table.column("prompt").to_pylist(), table.column("split").to_pylist()) if s == split]


def prompt_specs(table: pa.Table) -> dict[str, tuple[str, dict | None]]:
    """{prompt: (GenEval category, spec or None)} of a `prompts.parquet` table (tables written before the columns
    existed: "custom", None)."""
    prompts = table.column("prompt").to_pylist()
    if "spec" not in table.column_names:
        return {p: ("custom", None) for p in prompts}
    return {p: (c, None if s is None else json.loads(s))
            for p, c, s in zip(prompts, table.column("category").to_pylist(), table.column("spec").to_pylist())}


def _rows_where(index: pa.Table, column: str, values) -> torch.Tensor:
    mask = pc.is_in(index.column(column), pa.array(values))
    return torch.tensor(pc.indices_nonzero(mask).to_pylist(), dtype=torch.long)


def read_split(storage: Storage, params: Params, split: str, labels: bool = False):
    """Clean latents (N, C, H, W) and index rows of one split of `samples` (plus its teacher labels if asked)."""
    n = num_shards(params)
    tensors, index = read_shards(storage, SAMPLES, progress=False, hint=needs("samples"), expected_shards=n)
    rows = _rows_where(index, "split", [split])
    if len(rows) == 0:
        raise ValueError(f"{storage.path(SAMPLES)} has no '{split}' samples (prompts.{split} is 0?)")
    out = (tensors["latents"][rows], index.take(pa.array(rows.tolist())))
    if not labels:
        return out
    lab, lab_index = read_shards(storage, LABELS, progress=False, hint=needs("labels"), expected_shards=n)
    if lab_index.column("sample_id") != index.column("sample_id"):
        raise ValueError(f"{storage.path(LABELS)} does not match {storage.path(SAMPLES)}: re-run `labels`")
    target = TeacherTargets(lab["embeds"][rows], lab["tokens"][rows],
                            lab["score"][rows] if params.reward.kind == "aesthetic" else None)
    return (*out, target, lab["score"][rows])


def stream_split(storage: Storage, params: Params, split: str, labels: bool = False,
                 cache_shards: int = 4) -> tuple[ShardRows, pa.Table]:
    """`read_split` without reading the data: the split's rows of `samples` (and `labels`) as a `ShardRows` that reads
    shards as batches need them ({"latents"[, "embeds", "tokens"[, "score"]]}: the score for a scalar reward only,
    as in `read_split`'s targets), and the split's index rows. Only the indexes are read here."""
    n = num_shards(params)
    index = read_index(storage, SAMPLES, hint=needs("samples"), expected_shards=n)
    rows = _rows_where(index, "split", [split])
    if len(rows) == 0:
        raise ValueError(f"{storage.path(SAMPLES)} has no '{split}' samples (prompts.{split} is 0?)")
    sets = {SAMPLES: (index, ["latents"])}
    if labels:
        lab_index = read_index(storage, LABELS, hint=needs("labels"), expected_shards=n)
        if lab_index.column("sample_id") != index.column("sample_id"):
            raise ValueError(f"{storage.path(LABELS)} does not match {storage.path(SAMPLES)}: re-run `labels`")
        sets[LABELS] = (lab_index, ["embeds", "tokens"] + (["score"] if params.reward.kind == "aesthetic" else []))
    return ShardRows(storage, sets, rows, cache_shards), index.take(pa.array(rows.tolist()))


def samples_for(storage: Storage, params: Params, sample_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """The clean latents (N, C, H, W) and prompts of the given samples."""
    tensors, index = read_shards(storage, SAMPLES, keys=["latents"], progress=False, hint=needs("samples"),
                                 expected_shards=num_shards(params))
    position = {sid: k for k, sid in enumerate(index.column("sample_id").to_pylist())}
    rows = [position[s] for s in sample_ids]
    prompts = index.column("prompt").to_pylist()
    return tensors["latents"][torch.tensor(rows, dtype=torch.long)], [prompts[k] for k in rows]


def read_noisy_eval(storage: Storage, params: Params, sigmas=None) -> tuple[dict[float, torch.Tensor], list[int]]:
    """The stored noisy test latents {σ: (N, C, H, W)} (every σ of noisy/eval, or those of `sigmas`), and their
    sample ids, in the same order at every σ. Read σ by σ: the set is never held twice."""
    index = read_index(storage, EVAL, hint=needs("noisy"), expected_shards=noisy_shards(params)[EVAL])
    column = index.column("sigma").to_pylist()
    missing = [s for s in (sigmas or []) if s not in column]
    if missing:
        raise ValueError(f"{storage.path(EVAL)} holds no latents at σ {missing} (it has {sorted(set(column))}): "
                         f"noisy.sigmas must hold them; re-run `noisy`")
    noisy, ids = {}, None
    for s in dict.fromkeys(sigmas or column):
        rows = [k for k, x in enumerate(column) if x == s]
        noisy[s] = gather_rows(ShardRows(storage, {EVAL: (index, ["z_t"])}, rows))["z_t"]
        at_sigma = index.column("sample_id").take(pa.array(rows)).to_pylist()
        if ids is not None and at_sigma != ids:
            raise ValueError(f"{storage.path(EVAL)} holds its latents in another order at σ {s}: re-run `noisy`")
        ids = at_sigma
    return noisy, ids


def truth_made_by(params: Params, noisy: dict[float, torch.Tensor], prompts: list[str]) -> str:
    """The fingerprint of a `truth`: everything that decides the Monte Carlo values of `noisy` ({σ: (N, C, H, W)}, the
    test latents under `prompts`): the models, the seed, the rollouts, the sampler and the latents themselves."""
    cfg = params.evaluate
    return fingerprint({"backbone": to_dict(params.backbone), "reward": to_dict(params.reward), "seed": params.seed,
                        "rollouts": cfg.mc_rollouts, "sigmas": list(cfg.mc_sigmas), "batch_size": cfg.batch_size,
                        "sampler": [params.samples.steps, params.samples.guidance_scale], "prompts": prompts,
                        "latents": [sha256(noisy[s].contiguous().numpy().tobytes()) for s in cfg.mc_sigmas]})


def read_truth(storage: Storage, params: Params, noisy: dict[float, torch.Tensor], prompts: list[str],
               sample_ids: list[int]) -> dict[float, torch.Tensor]:
    """{σ: (N,) the Monte Carlo value of the noisy test latents `noisy` ({σ: (N, C, H, W)}, of `sample_ids` under
    `prompts`, in that order)} as the `truth` stage stored it; {} when evaluate.mc_rollouts is 0. The stored truth
    must be the one params ask for, of these latents."""
    cfg = params.evaluate
    if cfg.mc_rollouts == 0:
        return {}
    summary = storage.read_json(f"{TRUTH}/summary.json", hint=needs("truth"))
    made = (summary["rollouts"], sorted(summary["sigmas"]))
    if made != (cfg.mc_rollouts, sorted(cfg.mc_sigmas)):
        raise ValueError(f"{storage.path(TRUTH)} holds {made[0]} rollouts at σ {made[1]}, params ask for "
                         f"{cfg.mc_rollouts} at σ {sorted(cfg.mc_sigmas)}: re-run `truth`")
    if summary["sample_ids"] != list(sample_ids):
        raise ValueError(f"{storage.path(TRUTH)} holds the truth of other latents than the test set's: re-run `truth`")
    if summary.get("made_by") != truth_made_by(params, noisy, prompts):
        raise ValueError(f"{storage.path(TRUTH)} was made by other models, seed, sampler or noisy latents than these "
                         f"params and data/noisy: re-run `truth`")
    values = load_safetensors(storage.read_bytes(f"{TRUTH}/values.safetensors", hint=needs("truth")))
    return {s: values[truth_key(s)] for s in cfg.mc_sigmas}


def truth_key(sigma: float) -> str:
    return f"sigma_{sigma}"


def read_search(storage: Storage) -> SearchResult:
    result = storage.read_json(f"{SEARCH}/result.json", hint=needs("search"))
    init = load_safetensors(storage.read_bytes(f"{SEARCH}/init.safetensors", hint=needs("search")))
    return SearchResult(table=result["search"], i=result["pair"]["i"], j=result["pair"]["j"],
                        weight=init["weight"], bias=init["bias"], class_token=init["class_token"],
                        factor=result.get("factor", 1), context=result.get("context", "empty"),
                        kernel=result.get("kernel", 1), kernel_error=result.get("kernel_error"))


def value_model_dir(storage: Storage) -> Path:
    """A local folder holding the trained value model (downloaded first when the root is remote)."""
    if storage.local:
        path = Path(storage.path(VALUE_MODEL))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no trained value model: {needs('train')}")
        return path
    tmp = Path(tempfile.mkdtemp(prefix="stitchvm-value-"))
    for name in ("config.json", "model.safetensors"):
        (tmp / name).write_bytes(storage.read_bytes(f"{VALUE_MODEL}/{name}", hint=needs("train")))
    return tmp


def read_train_run(reports: Path) -> dict:
    """The MLflow run and registered version of the last `train` run ({"run_id", "model_version", "tracking_uri"};
    None values where it ran untracked): from its run record (`<reports>/runs/train.json`), not from the DVC output
    data/train/summary.json, whose hash must not depend on the run."""
    record = read_record(reports, "train")
    if record is None:
        raise FileNotFoundError(f"{record_path(reports, 'train')} does not exist: {needs('train')}")
    return {k: record.get(k) for k in ("run_id", "model_version", "tracking_uri")}
