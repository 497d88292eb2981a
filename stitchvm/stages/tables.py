"""Plain-text tables of report rows: the one formatter of the smoke run, the summary and the benchmarks."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["EVAL_COLUMNS", "GUIDANCE_COLUMNS", "format_cell", "format_table"]

# the columns of the evaluation table (reports/eval.json's "eval" rows), in order; a column no row has is left out
EVAL_COLUMNS = ("sigma", "method", "spearman", "spearman_within_prompt", "spearman_within_prompt_vs_mc", "pearson",
                "recall_at_1", "distill_loss", "ms_per_eval", "peak_mem_mb")
# the columns of the guidance table (reports/guidance.json's "rows": one per sampler)
GUIDANCE_COLUMNS = ("method", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std", "geneval")


def format_cell(value) -> str:
    """A table cell: `-` for None (a missing value), floats to 4 significant digits (`:.4g`), anything else `str`."""
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: Sequence[Mapping], columns: Sequence[str], drop_missing: bool = True) -> str:
    """A header line of `columns` and one line per row, each column right-aligned to its widest cell, columns
    separated by two spaces; cells by `format_cell` (a key a row lacks shows `-`). `drop_missing`: leave out the
    columns that no row has. No columns left: an empty string."""
    if drop_missing:
        columns = [c for c in columns if any(c in r for r in rows)]
    if not columns:
        return ""
    body = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(line[k]) for line in body)]) for k, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
