"""How precise a GenEval number is, and a difference between two methods run on the same prompts and seeds.

GenEval's overall score is the mean over categories of each category's fraction of correct samples
(`world.evaluation.accuracy_by_category`), and the samples of one prompt are not independent: the prompt is the unit.
So a category's variance is that of its prompts' accuracies over their number (stratified by category), and where a
category holds one prompt only (the built-in test split has one single-object prompt), that of its samples. A paired
difference takes the same estimator over per-sample differences (sample k of a prompt starts from the same noise in
every method), which removes what the prompts' own difficulty adds to the variance of each method's score.
"""
from __future__ import annotations

import torch


def verdicts_by_prompt(correct: list[bool], prompts: list[str]) -> dict[str, list[int]]:
    """{prompt: [1 / 0 per sample, in sampling order]}: the evaluator's verdicts grouped by prompt."""
    out: dict[str, list[int]] = {}
    for ok, prompt in zip(correct, prompts, strict=True):
        out.setdefault(prompt, []).append(int(ok))
    return out


def macro_mean_se(values: dict[str, list[float]], category_of: dict[str, str]) -> tuple[float, float | None]:
    """The mean over categories of each category's per-sample mean (`values`: {prompt: per-sample values}), and its
    standard error (prompt-clustered within each category; see the module docstring); None with one sample only."""
    by_category: dict[str, list[torch.Tensor]] = {}
    for prompt, v in values.items():
        by_category.setdefault(category_of[prompt], []).append(torch.tensor(v, dtype=torch.float64))
    means, variances = [], []
    for prompts in by_category.values():
        if len({len(v) for v in prompts}) != 1:
            raise ValueError("every prompt of a category needs the same number of samples")
        per_prompt = torch.stack([v.mean() for v in prompts])  # (P,)
        means.append(per_prompt.mean())
        units = per_prompt if len(prompts) > 1 else prompts[0]  # one prompt: its samples are the units
        variances.append(units.var() / len(units) if len(units) > 1 else None)
    mean = torch.stack(means).mean().item()
    if any(v is None for v in variances):
        return mean, None
    return mean, (torch.stack(variances).sum().sqrt() / len(means)).item()


PAIRS = (("dps-stitchvm", "dps-tweedie"), ("fk-stitchvm", "fk-tweedie"), ("dps-stitchvm", "unguided"),
         ("dps-tweedie", "unguided"), ("fk-stitchvm", "unguided"), ("fk-tweedie", "unguided"),
         ("fk-stitchvm-noselect", "fk-tweedie-noselect"), ("fk-stitchvm", "best-of-n-matched"))


def paired_differences(rows: list[dict], category_of: dict[str, str]) -> list[dict]:
    """{a, b, diff, se, z} for each pair of `PAIRS` whose rows carry `verdicts`: diff = a's GenEval - b's, `se` from
    the per-sample differences (`macro_mean_se`), z = diff / se."""
    by = {r["method"]: r["verdicts"] for r in rows if "verdicts" in r}
    out = []
    for a, b in PAIRS:
        if a not in by or b not in by:
            continue
        if by[a].keys() != by[b].keys():
            raise ValueError(f"{a} and {b} were judged on different prompts: no paired difference")
        d = {p: [x - y for x, y in zip(by[a][p], by[b][p], strict=True)] for p in by[a]}
        diff, se = macro_mean_se(d, category_of)
        out.append({"a": a, "b": b, "diff": diff, "se": se, "z": diff / se if se else None})
    return out
