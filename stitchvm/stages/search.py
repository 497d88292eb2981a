"""Stage `search`: the (i, j) error table, its heatmap, and the chosen pair's least-squares initialisation."""
from __future__ import annotations

import pyarrow as pa
from safetensors.torch import save as save_safetensors

from stitchvm.stages import plots
from stitchvm.config import Params
from stitchvm.value.search import SearchResult, search_stitch
from stitchvm.data.storage import read_shards
from stitchvm.stages.runtime import Paths, models, needs
from stitchvm.stages.upstream import PROBE, SEARCH, noisy_shards, samples_for


def search_on_probe(params: Params, storage, backbone, reward, context: str, progress: bool = True,
                    kernel: int | None = None) -> SearchResult:
    """The stitch search on the stored probe set, the head reading CFG branch `context`, F `kernel` × `kernel`
    (default `search.kernel`)."""
    probe, index = read_shards(storage, PROBE, progress=False, hint=needs("noisy"),
                               expected_shards=noisy_shards(params)[PROBE])
    z0, prompts = samples_for(storage, params, index.column("sample_id").to_pylist())
    return search_stitch(backbone, reward, z0, probe["z_t"], probe["t"], params.search.j_max, params.search.batch_size,
                         progress, params.search.upsample, context, prompts, kernel or params.search.kernel)


def run(params: Params, paths: Paths, progress: bool = True) -> dict:
    storage = paths.storage()
    backbone, reward = models(params)
    result = search_on_probe(params, storage, backbone, reward, params.search.context, progress)
    storage.write_table(f"{SEARCH}/table.parquet", pa.Table.from_pylist(result.table))
    storage.write_bytes_atomic(f"{SEARCH}/init.safetensors", save_safetensors(
        {"weight": result.weight.contiguous(), "bias": result.bias.contiguous(),
         "class_token": result.class_token.contiguous()}))
    storage.write_bytes_atomic(f"{SEARCH}/heatmap.png", plots.search_heatmap(result.table, (result.i, result.j)))
    storage.write_json(f"{SEARCH}/result.json", result.to_json())  # last: marks the stage complete
    best = min(r["error"] for r in result.table)
    return {"pair": {"i": result.i, "j": result.j}, "error": best, "kernel": result.kernel,
            "kernel_error": result.kernel_error, "path": storage.path(SEARCH),
            "table": result.table}
