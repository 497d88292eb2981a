"""Stage `prompts`: train / val / test prompts, deterministic under the seed → `prompts.parquet`."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stitchvm.config import Params
from stitchvm.data.image_folder import read_metadata
from stitchvm.stages.runtime import Paths
from stitchvm.stages.upstream import PROMPTS, prompts_in_split
from stitchvm.world.scenes import COLOURS, SHAPES

# A built-in list suited to CLIP-style rewards: attribute-object captions of simple scenes.
BUILTIN = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)


def read_source(source: str) -> list[str]:
    if source == "builtin":
        return list(BUILTIN)
    path = Path(source)
    if path.is_dir():
        prompts = [text for _, text in read_metadata(path)]
    elif not path.is_file():
        raise FileNotFoundError(f"prompt source {path} does not exist (prompts.source)")
    elif path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        if "prompt" not in table.column_names:
            raise ValueError(f"{path} has no column 'prompt' (columns: {table.column_names})")
        prompts = [str(p) for p in table.column("prompt").to_pylist()]
    else:
        raise ValueError(f"prompt source {path} is not a .txt, a .parquet or an image folder (prompts.source)")
    return list(dict.fromkeys(prompts))  # unique, in order


def split_prompts(prompts: list[str], train: int, val: int, test: int, seed: int) -> pa.Table:
    need = train + val + test
    if len(prompts) < need:
        raise ValueError(f"the prompt source has {len(prompts)} unique prompts, the splits need {need} "
                         f"(prompts.train + prompts.val + prompts.test)")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:need].tolist()
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    return pa.table({"prompt_id": pa.array(range(need), pa.int32()),
                     "prompt": [prompts[k] for k in order], "split": splits})


def prompt_table(params: Params) -> pa.Table:
    """The table this stage writes, computed from params alone (benchmarks use it without a pipeline run)."""
    p = params.prompts
    return split_prompts(read_source(p.source), p.train, p.val, p.test, params.seed)


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    table = prompt_table(params)
    storage = paths.storage()
    storage.write_table(PROMPTS, table)
    return {"path": storage.path(PROMPTS), "rows": table.num_rows,
            "splits": {s: len(prompts_in_split(table, s)) for s in ("train", "val", "test")}}
