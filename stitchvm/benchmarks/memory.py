"""Benchmark `memory`: peak resident memory of the `train` stage as the data set grows.

`python -m stitchvm bench memory --profile NAME --out PATH [--steps N] [--per-prompt 192,768] [--modes stream,in-memory]`
builds the profile's data at each `samples.per_prompt` on a temporary root with the stages themselves (prompts,
samples, labels, noisy, search; `samples.source: smooth` by default, since the sampler's cost says nothing about
memory and smooth fields have the shapes of the backbone's latents), then runs the `train` stage for `--steps` steps
in a fresh subprocess per (per_prompt, mode) and reads the subprocess's peak RSS from `os.wait4` (ru_maxrss: the
largest of the process and the loader workers it waited for). Modes: `stream` is the stage as shipped (rows read from
the shards as batches need them, `stitchvm/data/shard_dataset.py`); `in-memory` is the same stage with the reader
that held every row first (`read_split` into `TensorRows`: the batches are the same, and each row's
`weights_sha256` of the trained value model shows it). The report's `ratio` is each mode's peak at the largest
per_prompt over its peak at the smallest; the issue's bar is <= 1.2 for `stream`. The token fit (`train.fit`,
value/token_fit.py) does not stream: it holds the split's latents and the teacher's entry tokens (N · P · D values),
so with `train.fit.steps` > 0 the `stream` peak grows with the data too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stitchvm.benchmarks import load_profile
from stitchvm.config import Params
from stitchvm.stages import tables

PER_PROMPT = (192, 768)
MODES = ("stream", "in-memory")
DATA_STAGES = ("prompts", "samples", "labels", "noisy", "search")
COLUMNS = ("mode", "per_prompt", "train_rows", "data_mb", "peak_rss_mb", "seconds", "weights_sha256")


def bench_params(params: Params, per_prompt: int, steps: int, source: str, workers: int | None = None) -> Params:
    """The profile with `per_prompt` samples per prompt, `steps` training steps (and `workers` loader workers, when
    given), no Monte Carlo value and no checkpoint before the last step: only the data set's size changes between the
    runs compared."""
    workers = params.train.num_workers if workers is None else workers
    return dataclasses.replace(
        params,
        samples=dataclasses.replace(params.samples, per_prompt=per_prompt, source=source),
        train=dataclasses.replace(params.train, steps=steps, checkpoint_every=steps, num_workers=workers),
        evaluate=dataclasses.replace(params.evaluate, mc_rollouts=0))


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def build_data(params: Params, root: Path, progress: bool) -> None:
    """The stages up to `search` on `root`, in this process."""
    from stitchvm.stages import stage
    from stitchvm.stages.runtime import Paths

    paths = Paths(root=str(root / "data"), reports=root / "reports", checkpoints=root / "checkpoints", track=False)
    for name in DATA_STAGES:
        stage(name).run(params, paths, progress=progress)


def child(spec: dict) -> None:
    """The measured process: the `train` stage on the spec's root, with the reader its mode names."""
    import torch

    from stitchvm.data.shard_dataset import TensorRows, gather_rows
    from stitchvm.stages import train
    from stitchvm.stages.runtime import Paths
    from stitchvm.stages.upstream import read_split

    torch.set_num_threads(1)
    _, profile = load_profile(spec["profile"])
    params = bench_params(profile, spec["per_prompt"], spec["steps"], spec["source"], spec.get("workers"))
    root = Path(spec["root"])
    if spec["mode"] == "in-memory":
        def in_memory(storage, params, split, labels=False, cache_shards=4):
            if not labels:  # the token fit's latents
                z0, index = read_split(storage, params, split)
                return TensorRows({"latents": z0}), index
            z0, index, targets, _ = read_split(storage, params, split, labels=labels)
            rows = {"latents": z0, "embeds": targets.embeds, "tokens": targets.tokens}
            return TensorRows(rows if targets.scores is None else {**rows, "score": targets.scores}), index

        def gather_in_memory(rows, num_workers=0):  # the fit gathers its latents: here they are held already
            return rows.tensors if isinstance(rows, TensorRows) else gather_rows(rows, num_workers)
        train.stream_split, train.gather_rows = in_memory, gather_in_memory
    paths = Paths(root=str(root / "data"), reports=root / f"reports-{spec['mode']}",
                  checkpoints=root / f"checkpoints-{spec['mode']}", track=False)
    train.run(params, paths, progress=False)


def measure(spec: dict) -> dict:
    """Peak RSS (MiB) and wall time of `child(spec)` in a fresh interpreter."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stitchvm.benchmarks.memory", json.dumps(spec)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "STITCHVM_PROGRESS": "0"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the train stage ({spec['mode']}, per_prompt {spec['per_prompt']}) exited with "
                           f"{proc.returncode}: see its stderr above")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def weights_digest(root: Path) -> str:
    """A short sha256 of the value model the last train run wrote: the modes must agree on it."""
    return hashlib.sha256((root / "data" / "value_model" / "model.safetensors").read_bytes()).hexdigest()[:16]


def run(profile: str, out: str | Path, *, steps: int = 20, per_prompt: tuple[int, ...] = PER_PROMPT,
        modes: tuple[str, ...] = MODES, source: str = "smooth", workers: int | None = None,
        progress: bool = True) -> dict:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown} (known: {', '.join(MODES)})")
    name, params = load_profile(profile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stitchvm-bench-memory-") as tmp:
        for n in per_prompt:
            root = Path(tmp) / f"per_prompt-{n}"
            p = bench_params(params, n, steps, source)
            start = time.perf_counter()
            build_data(p, root, progress)
            built, data_mb = round(time.perf_counter() - start, 1), folder_mb(root / "data")  # before train writes
            for mode in modes:
                spec = {"profile": profile, "per_prompt": n, "steps": steps, "source": source, "mode": mode,
                        "root": str(root), "workers": workers}
                rows.append({"mode": mode, "per_prompt": n, "train_rows": params.prompts.train * n,
                             "data_mb": data_mb, "build_seconds": built, **measure(spec),
                             "weights_sha256": weights_digest(root)})
    ratio = {m: round(max(r["peak_rss_mb"] for r in rows if r["mode"] == m and r["per_prompt"] == max(per_prompt))
                      / min(r["peak_rss_mb"] for r in rows if r["mode"] == m and r["per_prompt"] == min(per_prompt)),
                      3) for m in modes}
    result = {"host": platform.node(), "profile": name, "steps": steps, "source": source,
              "batch_size": params.train.batch_size,
              "num_workers": params.train.num_workers if workers is None else workers,
              "shard_size": params.storage.shard_size, "rows": rows, "ratio": ratio}
    print(tables.format_table(rows, COLUMNS))
    print("peak RSS ratio (largest / smallest per_prompt): "
          + ", ".join(f"{m} {r:.3f}" for m, r in ratio.items()))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # the measured subprocess (see `measure`)
    child(json.loads(sys.argv[1]))
