"""Stage outputs as Dagster metadata and descriptions: markdown tables, inline PNG plots, shard summaries."""
from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from dagster import MetadataValue

from stitchvm.stages import stage


def stage_doc(name: str) -> str:
    """The asset description: its stage module's docstring."""
    return stage(name).__doc__.strip()


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def md_table(rows: Iterable[dict], columns: Sequence[str] | None = None) -> MetadataValue:
    """A markdown table of `rows` (dicts); `columns` picks and orders the columns (default: the first row's keys)."""
    rows = list(rows)
    if not rows:
        return MetadataValue.md("_(no rows)_")
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return MetadataValue.md("\n".join(lines))


def png_md(png: bytes, alt: str = "plot") -> MetadataValue:
    """PNG bytes as an inline image (the Dagster UI renders markdown metadata, data URIs included)."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def shard_rows(index: pa.Table, written: Iterable[int] = ()) -> list[dict]:
    """One row per shard of a shard-set index: rows, first row, sha256 prefix, whether this run wrote it."""
    written = set(written)
    out = []
    for shard in sorted(set(index.column("shard").to_pylist())):
        part = index.filter(pc.equal(index.column("shard"), shard))
        out.append({"shard": shard, "rows": part.num_rows, "first_row": part.column("row")[0].as_py(),
                    "sha256": part.column("sha256")[0].as_py()[:12], "written_this_run": shard in written})
    return out


def shard_metadata(path: str, index: pa.Table, summary: dict, shard_size: int) -> dict:
    """Metadata of a shard-set asset (samples, labels)."""
    return {
        "dagster/row_count": index.num_rows,
        "path": MetadataValue.path(path),
        "shards": summary["shards"],
        "shards_written": len(summary["written"]),
        "shards_written_ids": MetadataValue.json(list(summary["written"])),
        # shards that existed but were made by other params or inputs (or damaged), with the reason
        "shards_rewritten": MetadataValue.json({str(k): v for k, v in summary.get("rewritten", {}).items()}),
        "shard_size": shard_size,
        "shard_table": md_table(shard_rows(index, summary["written"])),
    }
