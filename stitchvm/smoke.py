"""The value-model pipeline (every stage but the world bootstrap and the consumers) in-process on a temporary root.

`python -m stitchvm smoke --out reports/smoke.json`: builds the backbone and reward of the params, samples, labels,
searches, finetunes and evaluates, prints the evaluation table and writes
`{"pair": {"i", "j"}, "search": [{"i", "j", "error"}, …], "eval": [{"sigma", "method", …}, …], …}`.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from stitchvm.config import Params, to_dict
from stitchvm.stages import VALUE_PIPELINE, stage
from stitchvm.stages.runtime import Paths


def run(params: Params, out: str | Path | None = None, progress: bool = True) -> dict:
    timings = {}
    with tempfile.TemporaryDirectory(prefix="stitchvm-smoke-") as tmp:
        paths = Paths(root=str(Path(tmp) / "data"), reports=Path(tmp) / "reports",
                      checkpoints=Path(tmp) / "checkpoints", track=False)
        summaries = {}
        for name in VALUE_PIPELINE:  # the world is used as shipped; guidance/align have their own stages
            start = time.perf_counter()
            summaries[name] = stage(name).run(params, paths, progress=progress)
            timings[name] = round(time.perf_counter() - start, 3)
    report = {
        "pair": summaries["search"]["pair"],
        "search": summaries["search"]["table"],
        **summaries["evaluate"],
        "train": {k: summaries["train"][k] for k in ("steps", "first_loss", "final_loss", "samples_per_s")},
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
    cols = ["sigma", "method", "spearman", "spearman_within_prompt", "spearman_within_prompt_vs_mc", "pearson",
            "recall_at_1", "distill_loss", "ms_per_eval", "peak_mem_mb"]
    cols = [c for c in cols if any(c in r for r in report["eval"])]

    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"stitch search: chose (i, j) = ({report['pair']['i']}, {report['pair']['j']}); "
             f"trivial-predictor loss {report['trivial_loss']:.4g}"]
    rows = [[cell(r.get(c)) for c in cols] for r in report["eval"]]
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
