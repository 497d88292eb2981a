"""Stage `prompts`: train / val / test prompts with their GenEval category and spec, deterministic under the seed
-> `prompts.parquet` (columns prompt_id, prompt, split, category, spec: JSON, or null where unknown).

Sources: `builtin` (the world's GenEval-style set, stitchvm/world/prompt_set.py: its own splits, the test split
holding compositions never seen in training; `prompts.train/val/test` prompts are taken from each, spread over the
categories), `builtin:single` (the 24 single-group prompts "a {colour} {shape}", shuffled and split), or a file /
image folder of prompts (category "custom", no spec; shuffled and split).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stitchvm.config import Params
from stitchvm.data.image_folder import read_metadata
from stitchvm.stages.runtime import Paths
from stitchvm.stages.upstream import PROMPTS, prompts_in_split
from stitchvm.world.prompt_set import CATEGORIES, prompt_set
from stitchvm.world.scenes import COLOURS, SHAPES

# The single-group prompts: attribute-object captions of one kind of shape.
SINGLE = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)
SPLITS = ("train", "val", "test")


def read_source(source: str) -> list[dict]:
    """The source's prompts as rows {"prompt", "category", "spec"} (and "split" for the built-in set)."""
    if source == "builtin":
        return prompt_set()
    if source == "builtin:single":
        return [{"prompt": p, "category": "colors",
                 "spec": {"groups": [{"colour": p.split()[1], "shape": p.split()[2]}]}} for p in SINGLE]
    path = Path(source)
    if path.is_dir():
        prompts = [text for _, text in read_metadata(path)]
    elif not path.is_file():
        raise FileNotFoundError(f"prompt source {path} does not exist (prompts.source)")
    elif path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:  # one line that names the key, not pyarrow's exception
            raise ValueError(f"prompt source {path} is not a readable Parquet file ({e}) (prompts.source)") from None
        if "prompt" not in table.column_names:
            raise ValueError(f"{path} has no column 'prompt' (columns: {table.column_names})")
        prompts = [str(p).strip() for p in table.column("prompt").to_pylist() if p is not None and str(p).strip()]
    else:
        raise ValueError(f"prompt source {path} is not a .txt, a .parquet or an image folder (prompts.source)")
    if not prompts:  # blank lines are skipped, so a file of blanks is empty too
        raise ValueError(f"prompt source {path} holds no prompts (prompts.source): give one prompt a line")
    return [{"prompt": p, "category": "custom", "spec": None} for p in dict.fromkeys(prompts)]  # unique, in order


def _take_spread(rows: list[dict], k: int, generator: torch.Generator) -> list[dict]:
    """`k` rows spread over the categories: each category shuffled, then taken round-robin."""
    by_category = {c: [r for r in rows if r["category"] == c] for c in CATEGORIES}
    queues = [[group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
              for group in by_category.values() if group]
    out = []
    while len(out) < k:
        for queue in queues:
            if queue and len(out) < k:
                out.append(queue.pop(0))
    return out


def split_prompts(rows: list[dict], train: int, val: int, test: int, seed: int) -> pa.Table:
    counts = dict(zip(SPLITS, (train, val, test)))
    generator = torch.Generator().manual_seed(seed)
    if all("split" in r for r in rows):  # the built-in set: its own splits
        chosen = []
        for split, k in counts.items():
            pool = [r for r in rows if r["split"] == split]
            if k > len(pool):
                raise ValueError(f"prompts.{split} is {k}, the built-in set has {len(pool)} {split} prompts")
            chosen += [dict(r, split=split) for r in _take_spread(pool, k, generator)]
    else:
        need = sum(counts.values())
        if len(rows) < need:
            raise ValueError(f"the prompt source has {len(rows)} unique prompts, the splits need {need} "
                             f"(prompts.train + prompts.val + prompts.test)")
        order = torch.randperm(len(rows), generator=generator)[:need].tolist()
        splits = [s for s, k in counts.items() for _ in range(k)]
        chosen = [dict(rows[j], split=s) for j, s in zip(order, splits)]
    return pa.table({"prompt_id": pa.array(range(len(chosen)), pa.int32()),
                     "prompt": [r["prompt"] for r in chosen], "split": [r["split"] for r in chosen],
                     "category": [r["category"] for r in chosen],
                     "spec": pa.array([None if r["spec"] is None else json.dumps(r["spec"]) for r in chosen],
                                      pa.string())})


def prompt_table(params: Params) -> pa.Table:
    """The table this stage writes, computed from params alone (benchmarks use it without a pipeline run)."""
    p = params.prompts
    return split_prompts(read_source(p.source), p.train, p.val, p.test, params.seed)


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    table = prompt_table(params)
    storage = paths.storage()
    storage.write_table(PROMPTS, table)
    categories = table.column("category").to_pylist()
    return {"path": storage.path(PROMPTS), "rows": table.num_rows,
            "splits": {s: len(prompts_in_split(table, s)) for s in SPLITS},
            "categories": {c: categories.count(c) for c in dict.fromkeys(categories)}}
