"""The smoke run: every stage but the world bootstrap, in-process on a temporary root, on a small profile.

`python -m stitchvm smoke --out reports/smoke.json` runs the value pipeline (prompts → samples → labels → noisy →
search → train → evaluate) and its consumers (guidance, align) on `profiles/smoke.yaml` (the default; `--params FILE`
runs another params file) with the world as shipped, without MLflow; prints the evaluation table and the consumers'
results and writes
`{"pair": {"i", "j"}, "search": [{"i", "j", "error"}, …], "eval": [{"sigma", "method", …}, …], "trivial_loss", …,
"train": {…}, "guidance": {…}, "align": {…}, "timings_s": {stage: seconds}, "params": {…}}`.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from stitchvm.config import Params, to_dict
from stitchvm.stages import CONSUMERS, VALUE_PIPELINE, stage
from stitchvm.stages.runtime import Paths
from stitchvm.stages.tables import EVAL_COLUMNS, GUIDANCE_COLUMNS, format_cell
from stitchvm.stages.tables import format_table as _table

PROFILE = "profiles/smoke.yaml"  # the smoke command's default params
GUIDANCE_KEYS = ("pair", "device", "rows", "reward_mean", "reward_gain", "sec_per_sample", "peak_mem_mb")
ALIGN_KEYS = ("method", "updates", "steps", "batch", "reward_before", "reward_after", "reward_gain", "train_seconds",
              "sec_per_update", "sampling_s", "reward_s", "update_s", "seconds", "evaluated_adapter", "curve")


def run(params: Params, out: str | Path | None = None, progress: bool = True, threads: int = 1) -> dict:
    """Run the stages, print the report's text and write it as JSON to `out` (when given); returns the report.
    `threads`: torch's CPU threads during the run (0: leave torch's default). One by default: the smoke profile's
    models are so small that a second thread only adds synchronisation (on a busy 2-core machine, 20× slower)."""
    timings = {}
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="stitchvm-smoke-") as tmp:
            paths = Paths(root=str(Path(tmp) / "data"), reports=Path(tmp) / "reports",
                          checkpoints=Path(tmp) / "checkpoints", track=False)
            summaries = {}
            for name in VALUE_PIPELINE + CONSUMERS:  # the world is used as shipped
                start = time.perf_counter()
                summaries[name] = stage(name).run(params, paths, progress=progress)
                timings[name] = round(time.perf_counter() - start, 3)
    finally:
        torch.set_num_threads(before)
    report = {
        "pair": summaries["search"]["pair"],
        "search": summaries["search"]["table"],
        **summaries["evaluate"],
        "train": {k: summaries["train"][k] for k in ("steps", "first_loss", "final_loss", "samples_per_s")},
        # the consumers' results (their files lived in the temporary root: no paths)
        "guidance": {k: summaries["guidance"][k] for k in GUIDANCE_KEYS if k in summaries["guidance"]},
        "align": {k: summaries["align"][k] for k in ALIGN_KEYS if k in summaries["align"]},
        "timings_s": timings,
        "params": to_dict(params),
    }
    print(format_table(report))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict) -> str:
    """The smoke report as text: the chosen stitch, the evaluation table, the guidance table, the alignment result
    and the stage timings."""
    lines = [f"stitch search: chose (i, j) = ({report['pair']['i']}, {report['pair']['j']}); "
             f"trivial-predictor loss {report['trivial_loss']:.4g}",
             _table(report["eval"], EVAL_COLUMNS)]
    if report.get("guidance"):
        lines += ["guidance (true reward of each sampler on the same prompts and seeds):",
                  _table(report["guidance"]["rows"], GUIDANCE_COLUMNS)]
    if report.get("align"):
        a = report["align"]
        lines.append(f"align: {a['method']}, {a['updates']} updates: true reward {format_cell(a['reward_before'])} -> "
                     f"{format_cell(a['reward_after'])} ({a['sec_per_update']:.3g} s/update)")
    if report.get("timings_s"):
        lines.append("timings (s): " + ", ".join(f"{k} {v:.3g}" for k, v in report["timings_s"].items()))
    return "\n".join(lines)
