"""Stage outputs under one storage root: Parquet tables and safetensors shard sets, on a local folder or s3://.

A file only ever appears under its final name once it is complete (temporary name + rename locally; a single
committed PUT on S3), a shard set's index is written last, and every shard carries a sha256 in the index so a
truncated or corrupted shard is detected on read instead of being silently used. Re-running a stage skips shards
whose bytes already match what it would write.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

INDEX = "index.parquet"
RESERVED = ("row", "shard", "shard_row", "dtype", "shape", "sha256")


class Storage:
    """An fsspec filesystem plus a root path; every method takes paths relative to the root."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str):
        self.fs, self.base = fs, base.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Full path (s3://bucket/prefix/... or /local/dir/...), as used by the filesystem and in error messages."""
        joined = "/".join([self.base, *(p.strip("/") for p in parts if p)])
        return joined if self.local else self.fs.unstrip_protocol(joined)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write so that readers see either the old file or the complete new one, never a partial one.

        Locally: write + fsync a sibling `rel.tmp-<uuid>` and os.replace it onto the final name (atomic on POSIX).
        On S3 an object becomes visible only when its PUT (or multipart upload) completes, so writing the final
        key directly is already atomic, and a tmp key + copy would double the traffic for nothing.
        """
        final = self.path(rel)
        if not self.local:
            self.fs.pipe_file(final, data)
            return
        self.fs.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def read_bytes(self, rel: str, hint: str | None = None) -> bytes:
        full = self.path(rel)
        try:
            return self.fs.cat_file(full)
        except FileNotFoundError:
            raise FileNotFoundError(f"{full} does not exist" + (f": {hint}" if hint else "")) from None

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes_atomic(rel, buf.getvalue())

    def read_table(self, rel: str, hint: str | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel, hint)))

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes_atomic(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str, hint: str | None = None):
        return json.loads(self.read_bytes(rel, hint))


def open_root(root: str, storage_options: dict | None = None) -> Storage:
    """`root` is a local folder or `s3://bucket/prefix`; storage_options go to fsspec (endpoint_url, key, secret...)."""
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    return Storage(fs, base)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_name(name: str, shard: int) -> str:
    return f"{name}/shard-{shard:05d}.safetensors"


def shard_bytes(tensors: dict[str, torch.Tensor], start: int, stop: int) -> bytes:
    """safetensors bytes of rows [start, stop); sorted keys + contiguous CPU copies make them deterministic."""
    return save_safetensors({k: tensors[k][start:stop].detach().cpu().contiguous() for k in sorted(tensors)})


def check_lengths(tensors: dict[str, torch.Tensor], rows: pa.Table) -> int:
    if not tensors:
        raise ValueError("write_shards needs at least one tensor")
    for key, t in tensors.items():
        if t.dim() == 0 or t.shape[0] != rows.num_rows:
            n = t.shape[0] if t.dim() else "a scalar"
            raise ValueError(f"tensor {key!r} has length {n} along dim 0 but rows has {rows.num_rows} rows")
    clash = [c for c in rows.column_names if c in RESERVED]
    if clash:
        raise ValueError(f"rows columns {clash} clash with index columns {list(RESERVED)}")
    return rows.num_rows


def write_shards(storage: Storage, name: str, tensors: dict[str, torch.Tensor], rows: pa.Table | dict,
                 shard_size: int, progress: bool = True) -> pa.Table:
    """Split tensors along dim 0 into `name/shard-NNNNN.safetensors`, then write `name/index.parquet` last.

    A shard whose existing bytes already hash to what would be written is skipped, so re-running a stage only
    rewrites missing or damaged shards. Returns the index table.
    """
    rows = rows if isinstance(rows, pa.Table) else pa.table(rows)
    n = check_lengths(tensors, rows)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    starts = range(0, n, shard_size)
    digests = []
    for shard, start in enumerate(tqdm(starts, desc=f"write {name}", disable=not progress)):
        rel, data = shard_name(name, shard), shard_bytes(tensors, start, min(start + shard_size, n))
        digests.append(sha256(data))
        if not (storage.exists(rel) and sha256(storage.read_bytes(rel)) == digests[-1]):
            storage.write_bytes_atomic(rel, data)
    row = torch.arange(n)
    shard_of_row = (row // shard_size).tolist()
    keys = sorted(tensors)
    dtype = json.dumps({k: str(tensors[k].dtype).removeprefix("torch.") for k in keys})
    shape = json.dumps({k: list(tensors[k].shape[1:]) for k in keys})  # per-row shape, i.e. without dim 0
    index = pa.table({
        "row": pa.array(row.tolist(), pa.int64()),
        "shard": pa.array(shard_of_row, pa.int32()),
        "shard_row": pa.array((row % shard_size).tolist(), pa.int32()),
        **{c: rows.column(c) for c in rows.column_names},
        "dtype": pa.array([dtype] * n, pa.string()),
        "shape": pa.array([shape] * n, pa.string()),
        "sha256": pa.array([digests[s] for s in shard_of_row], pa.string()),
    })
    storage.write_table(f"{name}/{INDEX}", index)
    return index


def read_index(storage: Storage, name: str, hint: str | None = None) -> pa.Table:
    hint = hint or f"shard set {name!r} has not been written yet (run the stage that produces it first)"
    return storage.read_table(f"{name}/{INDEX}", hint=hint)


def shard_digests(index: pa.Table) -> dict[int, str]:
    """{shard: sha256} from the index (each shard's digest is repeated on all of its rows)."""
    return dict(zip(index.column("shard").to_pylist(), index.column("sha256").to_pylist()))


def read_shards(storage: Storage, name: str, keys: list[str] | None = None, shards: list[int] | None = None,
                hint: str | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], pa.Table]:
    """Load (a subset of keys / shards of) a shard set, checking every shard's sha256 against the index.

    Returns the tensors concatenated in row order and the matching rows of the index.
    """
    index = read_index(storage, name, hint)
    if shards is not None:
        index = index.filter(pc.is_in(index.column("shard"), pa.array(shards, pa.int32())))
    index = index.sort_by("row")
    parts: dict[str, list[torch.Tensor]] = {}
    for shard, digest in tqdm(sorted(shard_digests(index).items()), desc=f"read {name}", disable=not progress):
        rel = shard_name(name, shard)
        data = storage.read_bytes(rel, hint=f"listed in {storage.path(name, INDEX)}; re-run write_shards")
        if sha256(data) != digest:
            raise ValueError(f"shard {storage.path(rel)} is corrupted or truncated: "
                             f"sha256 {sha256(data)} != index {digest}")
        loaded = load_safetensors(data)
        for key in keys if keys is not None else sorted(loaded):
            if key not in loaded:
                raise KeyError(f"{storage.path(rel)} has no tensor {key!r}; it has {sorted(loaded)}")
            parts.setdefault(key, []).append(loaded[key])
    return {k: torch.cat(v) for k, v in parts.items()}, index


def verify_shards(storage: Storage, name: str, progress: bool = True) -> list[str]:
    """Full paths of shards that are missing or whose sha256 differs from the index (empty when all are good)."""
    bad = []
    digests = sorted(shard_digests(read_index(storage, name)).items())
    for shard, digest in tqdm(digests, desc=f"verify {name}", disable=not progress):
        rel = shard_name(name, shard)
        if not storage.exists(rel) or sha256(storage.read_bytes(rel)) != digest:
            bad.append(storage.path(rel))
    return bad
