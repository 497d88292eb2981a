"""`python -m stitchvm bench guidance --sweep METHOD=S1,S2,… [--sweep …]`: DPS guidance scales, chosen on val prompts.

The two DPS value sources need scales that differ by orders of magnitude (docs/method.md), and the right scale
depends on the world; a scale chosen on the test prompts would flatter the method. This sweep runs each listed DPS
method at each scale on the profile's *validation* prompts (`guidance.prompts` of them × `guidance.per_prompt`
samples, the same seeds for every scale) and reports, per (method, scale), the world evaluator's `geneval`, the true
reward and the time; `best` names, per method, the scale with the highest `geneval` (ties: the higher reward), the
value to put in `guidance.scale_tweedie` / `guidance.scale_stitchvm`. JSON: {"profile", "prompts", "rows", "best"}.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from stitchvm.benchmarks import load_profile
from stitchvm.stages.tables import format_table

SCALE_KEY = {"dps-tweedie": "scale_tweedie", "dps-stitchvm": "scale_stitchvm"}  # method -> its GuidanceConfig key
COLUMNS = ("method", "scale", "geneval", "reward_mean", "reward_std", "sec_per_sample")


def parse_sweeps(texts: list[str]) -> dict[str, list[float]]:
    """`["dps-stitchvm=1,3,10"]` -> {"dps-stitchvm": [1.0, 3.0, 10.0]}; a one-line error for anything else."""
    sweeps = {}
    for text in texts:
        method, _, scales = text.partition("=")
        if method not in SCALE_KEY or not scales:
            raise ValueError(f"--sweep {text!r}: expected METHOD=S1,S2,… with METHOD one of {', '.join(SCALE_KEY)}")
        try:
            values = [float(s) for s in scales.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {text!r}: scales must be numbers separated by commas") from None
        if any(v < 0 for v in values):
            raise ValueError(f"--sweep {text!r}: scales must be >= 0")
        sweeps[method] = values
    return sweeps


def best_scales(rows: list[dict]) -> dict[str, float]:
    """Per method, the scale with the highest geneval (ties: the higher true reward)."""
    best = {}
    for r in rows:
        key = (r.get("geneval") or 0.0, r["reward_mean"])
        if r["method"] not in best or key > best[r["method"]][0]:
            best[r["method"]] = (key, r["scale"])
    return {m: scale for m, (_, scale) in best.items()}


def run(profile: str, out: str | Path | None, sweeps: dict[str, list[float]], progress: bool = True,
        root: str | None = None) -> dict:
    """Every (method, scale) of `sweeps` on the val prompts; `root` overrides the storage root (the value model's)."""
    from stitchvm.benchmarks.guidance import judged_row, setup
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.upstream import prompts_in_split

    name, params = load_profile(profile)
    s = dataclasses.replace(setup(params, root), prompts=prompts_in_split(prompt_table(params), "val")[:params.guidance.prompts])
    if not s.prompts:
        raise ValueError(f"profile {name!r} has no validation prompts to sweep on (prompts.val is 0)")
    rows = []
    for method, scales in sweeps.items():
        for scale in scales:
            if progress:
                print(f"  {method} at scale {scale:g} …", flush=True)
            cfg = dataclasses.replace(params.guidance, **{SCALE_KEY[method]: scale})
            rows.append({**judged_row(params, s, method, cfg), "scale": scale})
    report = {"profile": name, "split": "val", "prompts": s.prompts, "value_model": s.value_source, "rows": rows,
              "best": best_scales(rows)}
    print(format_table(rows, COLUMNS))
    print("best scales (val geneval): " + ", ".join(f"{m} {v:g}" for m, v in report["best"].items()))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report
