"""The run record of a stage: what one run measured or where it ran, kept out of the stage's DVC outputs.

Everything DVC hashes (a stage's outs, metrics and plots) must be a pure function of params, code and inputs, so that
`dvc repro` in two clean clones records the same hashes and `dvc metrics diff` after an identical run shows nothing.
Wall times, throughput, peak memory, the device, MLflow run ids and model versions, and paths on this machine go
instead to `<reports>/runs/<stage>.json` (and to MLflow where the run is tracked): no DVC out, but committed with the
reports (.gitignore), read by `python -m stitchvm summary`, the stages downstream (evaluate and guidance log to
train's MLflow run) and, through each stage's returned summary, the Dagster assets. Timed rows (evaluation rows,
guidance rows, curve points) keep their key columns in the record so they join back to the quality rows.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

RUNS = "runs"  # the run records' folder under the reports folder


def record_path(reports: Path, stage: str) -> Path:
    return Path(reports) / RUNS / f"{stage}.json"


def write_record(reports: Path, stage: str, record: dict) -> Path:
    path = record_path(reports, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def read_record(reports: Path, stage: str) -> dict | None:
    """The stage's run record, or None where the stage has not run (or ran before run records existed)."""
    return read_json(record_path(reports, stage))


def read_json(path: Path) -> dict | None:
    """A report's JSON, None where the file does not exist; a one-line ValueError naming it where it is broken."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def split_fields(summary: dict, fields: Iterable[str]) -> tuple[dict, dict]:
    """(the summary without `fields`, the `fields` it has): the deterministic part and the run's part."""
    fields = set(fields)
    return ({k: v for k, v in summary.items() if k not in fields},
            {k: v for k, v in summary.items() if k in fields})


def split_rows(rows: Sequence[dict], fields: Iterable[str], key: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(rows without `fields`, one row of `key` + `fields` per row): quality rows and their timings, joinable on
    `key` (`join_rows`)."""
    fields = tuple(fields)
    return ([{k: v for k, v in r.items() if k not in fields} for r in rows],
            [{k: r[k] for k in (*key, *fields) if k in r} for r in rows])


def join_rows(rows: Sequence[dict], timed: Sequence[dict] | None, key: Sequence[str]) -> list[dict]:
    """`rows` with the fields of the `timed` row of the same `key` (a row without one is left as it is)."""
    by_key = {tuple(t.get(k) for k in key): t for t in timed or []}
    return [{**r, **by_key.get(tuple(r.get(k) for k in key), {})} for r in rows]


def repo_relative(path) -> str:
    """`path` relative to the repository root (the working directory every stage runs in, as DVC runs them) when it
    lies under it, else as given (an s3:// URL, a folder elsewhere): reports name no folder of one machine."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return Path(text).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return text
