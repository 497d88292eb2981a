"""What the `world_*` bootstrap stages share: a seeded scene stream, an atomic install of the trained part into
the shipped world (stitchvm/world/pretrained/), a JSON summary and plot under reports/, and an MLflow run."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from stitchvm.stages import plots
from stitchvm.config import Params, to_dict
from stitchvm.data.storage import open_root
from stitchvm.models.world_source import world_dir
from stitchvm.stages.runtime import Paths

# One scene stream per model, so retraining one part never shifts another part's data.
STREAMS = {"world_clip": 1, "world_vae": 2, "world_backbone": 3, "world_aesthetic": 4, "world_report": 5,
           "world_evaluator": 6, "world_clip_binding": 7}


def scene_stream(params: Params, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(params.world.seed * 1000 + STREAMS[stage])


@contextmanager
def install(part: str) -> Iterator[Path]:
    """Yield a temporary path to write `part` to; on success it replaces world_dir()/part by renames only, so a
    failed or interrupted run leaves the previous world intact.

    The staging folder `.<part>-*` sits beside the part (same filesystem: renames). A file part is replaced in one
    atomic rename; a folder part in two (the old one into the staging folder, the new one into place), nothing
    removed in between. A staging folder left by a killed run is removed by the next install, which first puts the
    previous part back if the kill fell between those two renames."""
    root = world_dir()
    root.mkdir(parents=True, exist_ok=True)
    restore_killed_installs(root, part)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{part}-") as tmp:
        staged = Path(tmp) / part
        yield staged
        dest = root / part
        if dest.is_dir() and not dest.is_symlink():
            dest.rename(Path(tmp) / PREVIOUS)  # removed with the staging folder
        os.replace(staged, dest)


PREVIOUS = "previous"  # in a staging folder: the part being replaced, between install's two renames


def restore_killed_installs(root: Path, part: str) -> None:
    """Remove the staging folders of `part` that killed installs left in `root`; a part found only in one (killed
    between install's two renames) goes back into place first."""
    for stale in sorted(root.glob(f".{part}-*")):
        previous = stale / PREVIOUS
        if previous.exists() and not (root / part).exists():
            previous.rename(root / part)
        shutil.rmtree(stale, ignore_errors=True)


def weight_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def flat_history(history: list[dict]) -> list[dict]:
    """History rows with nested dicts (e.g. zero-shot accuracies) flattened to `outer/inner` numeric keys."""
    out = []
    for row in history:
        flat = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        out.append(flat)
    return out


def finish(stage: str, params: Params, paths: Paths, recipe, history: list[dict], summary: dict,
           curve_keys: tuple[str, ...] = ("loss",)) -> dict:
    """Write reports/<stage>.json and <stage>_curve.png, log an MLflow run (when tracking) and return the summary."""
    history = flat_history(history)
    curve = plots.training_curve(history, keys=curve_keys, title=f"{stage}: training loss")
    reports = open_root(str(paths.reports))  # temporary name + rename: a kill never leaves half a report
    reports.write_bytes_atomic(f"{stage}_curve.png", curve)
    summary = {**summary, "curve": str(paths.reports / f"{stage}_curve.png")}
    if paths.track:
        summary["run_id"] = track(stage, params, recipe, history, summary, curve)
    reports.write_bytes_atomic(f"{stage}.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def track(stage: str, params: Params, recipe, history: list[dict], summary: dict, curve: bytes) -> str:
    from stitchvm.stages import tracking  # mlflow is imported only where a run is tracked

    cfg = params.mlflow
    with tracking.start_run(cfg.experiment, run_name=stage, tracking_uri=cfg.tracking_uri) as run:
        tracking.log_params({f"{stage}.{k}": v for k, v in to_dict(recipe).items()} | {"world.seed": params.world.seed})
        tracking.log_history(history, prefix=stage)
        tracking.log_metrics({f"{stage}/{k}": float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracking.log_png(curve, f"{stage}_curve.png")
        return run.info.run_id


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - start, 2)
