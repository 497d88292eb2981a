"""Stage outputs under one storage root: Parquet tables and safetensors shard sets, on a local folder or s3://.

A shard set `name` is laid out so that each shard can be written by a separate process (one Dagster partition
per shard) without any shared file to coordinate on:

    name/shard-00000.safetensors     rows [0, shard_size) of every tensor
    name/index/shard-00000.parquet   that shard's index rows (row, shard, shard_row, user columns, dtype, shape,
                                     sha256), written only after its shard file

A file only ever appears under its final name once it is complete (temporary name + rename locally; a single
committed PUT on S3), and a shard's index part is written after the shard itself, so a shard without its part is
simply "not written yet". A process killed mid-write leaves at most a `*.tmp-<uuid>` file, removed by the next
write of that file or by `prune_shard_set`, so a resumed set ends up holding exactly the files of an uninterrupted
one. An S3 endpoint lost mid-run fails the call in one line (ConnectionError naming it); the re-run resumes.

The index is the concatenation of all parts; `expected_shards` makes a reader fail clearly, naming the missing
shard ids, instead of quietly reading a partial set. Every shard's sha256 is in its part, so a truncated or
corrupted shard is detected on read instead of being silently used, and re-running a stage skips shards whose bytes
already match what it would write.

A shard also records what made it: the writer's `fingerprint` (a digest of the params and upstream inputs that
determine its contents) sits in its index part's Parquet metadata. A shard whose fingerprint differs from the one
the stage would write now counts as not written (`shard_status` says why), so changed params never reuse stale data.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import uuid
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from stitchvm.progress import tqdm

INDEX_DIR = "index"  # name/index/ holds one Parquet index part per shard
PART_RE = re.compile(r"shard-(\d+)\.parquet$")
RESERVED = ("row", "shard", "shard_row", "dtype", "shape", "sha256")
FINGERPRINT_KEY = b"stitchvm.fingerprint"  # in an index part's schema metadata
NOT_WRITTEN = "not written yet"  # `shard_status` of a shard without an index part
TMP_MARK = ".tmp-"  # a local file being written is `final.tmp-<uuid>` until its rename
SHARD_RE = re.compile(r"shard-(\d+)\.safetensors$")


class Storage:
    """An fsspec filesystem plus a root path; every method takes paths relative to the root."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str, endpoint: str | None = None):
        self.fs, self.base = fs, base.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self.endpoint = endpoint  # an S3 root's endpoint, named when it cannot be reached

    @contextmanager
    def reaching(self, full: str):
        """Turn a lost S3 endpoint (refused, reset, timed out after botocore's and s3fs's retries) into one line.

        Without it the CLI prints botocore's 100-line traceback; with it the failure names the endpoint and says that
        the re-run resumes (files complete before the failure are kept; nothing partial is visible on S3)."""
        if self.local:
            yield
            return
        import botocore.exceptions as boto  # s3fs's dependency: present whenever the root is on S3

        try:
            yield
        except (boto.ConnectionError, boto.HTTPClientError) as e:
            raise ConnectionError(f"{full}: lost the S3 endpoint {self.endpoint or 'of storage.root'} "
                                  f"({type(e).__name__}): when it is reachable again, re-run the stage (it resumes)"
                                  ) from None

    def path(self, *parts: str) -> str:
        """Full path (s3://bucket/prefix/... or /local/dir/...), as used by the filesystem and in error messages."""
        joined = "/".join([self.base, *(p.strip("/") for p in parts if p)])
        return joined if self.local else self.fs.unstrip_protocol(joined)

    def exists(self, rel: str) -> bool:
        with self.reaching(self.path(rel)):
            return self.fs.exists(self.path(rel))

    def remove(self, rel: str) -> None:
        with self.reaching(self.path(rel)):
            self.fs.rm_file(self.path(rel))

    def glob(self, *parts: str) -> list[str]:
        """Full paths matching the pattern `parts` (joined like `path`); listing caches are dropped first, since other
        processes add files behind s3fs's back."""
        pattern = self.path(*parts)
        with self.reaching(pattern):
            self.fs.invalidate_cache(os.path.dirname(pattern))
            return self.fs.glob(pattern)

    def read_bytes_or_none(self, rel: str) -> bytes | None:
        """The file's bytes, or None when there is none (a single read: no separate, cacheable exists())."""
        with self.reaching(self.path(rel)):
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError:
                return None

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write so that readers see either the old file or the complete new one, never a partial one.

        Locally: write + fsync a sibling `rel.tmp-<uuid>` and os.replace it onto the final name (atomic on POSIX).
        A sibling left by a writer killed before its rename is removed first (one writer per file: a shard belongs
        to one process). On S3 an object becomes visible only when its PUT (or multipart upload) completes, so
        writing the final key directly is already atomic, and a tmp key + copy would double the traffic for nothing.
        """
        final = self.path(rel)
        if not self.local:
            with self.reaching(final):
                self.fs.pipe_file(final, data)
            return
        self.fs.makedirs(os.path.dirname(final), exist_ok=True)
        for stale in glob.glob(glob.escape(final) + TMP_MARK + "*"):
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex}"
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
        data = self.read_bytes_or_none(rel)
        if data is None:
            raise FileNotFoundError(f"{self.path(rel)} does not exist" + (f": {hint}" if hint else ""))
        return data

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes_atomic(rel, buf.getvalue())

    def read_table(self, rel: str, hint: str | None = None) -> pa.Table:
        data = self.read_bytes(rel, hint)
        try:
            return pq.read_table(io.BytesIO(data))
        except pa.ArrowException as e:  # pyarrow names only its in-memory buffer
            raise ValueError(f"{self.path(rel)} is not a readable Parquet file ({e}): delete it and run the stage "
                             f"that writes it again") from None

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes_atomic(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str, hint: str | None = None):
        try:
            return json.loads(self.read_bytes(rel, hint))
        except ValueError as e:  # JSONDecodeError (or bad UTF-8) without the file's name
            raise ValueError(f"{self.path(rel)} is not valid JSON ({e}): delete it and run the stage that writes it "
                             f"again") from None


def open_root(root: str, storage_options: dict | None = None) -> Storage:
    """`root` is a local folder or `s3://bucket/prefix`; storage_options go to fsspec (endpoint_url, key, secret...).
    An S3 root is checked once per process first (`check_s3_root`), so a wrong endpoint fails in seconds."""
    if fsspec.utils.get_protocol(root) not in ("s3", "s3a"):
        return Storage(*fsspec.core.url_to_fs(root, **(storage_options or {})))
    check_s3_root(root, storage_options)
    options = dict(storage_options or {})
    options["config_kwargs"] = {**STORAGE_CONFIG, **options.get("config_kwargs", {})}  # the user's keys win
    return Storage(*fsspec.core.url_to_fs(root, **options), endpoint=s3_endpoint(storage_options))


def s3_endpoint(storage_options: dict | None) -> str:
    """The endpoint an S3 root talks to, as error messages name it."""
    options = storage_options or {}
    return (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url") or \
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"


# The storage's own client: botocore's `standard` retry mode (3 attempts in all, throttling and transient errors
# included: what AWS recommends) instead of the `legacy` default, whose 5 attempts with random exponential backoff
# took 4-12 s per call on an endpoint that went away mid-run (then the stage fails in one line: `Storage.reaching`).
STORAGE_CONFIG = {"connect_timeout": 10, "retries": {"mode": "standard", "total_max_attempts": 3}}
# The reachability check's own client: botocore's defaults (retries, 60 s timeouts) and s3fs's own retries turn an
# endpoint where nothing listens into half a minute and a 135-line traceback; with these it fails in <= 5 s (a
# legacy `max_attempts: 1` would still try twice).
PROBE_CONFIG = {"connect_timeout": 5, "read_timeout": 5, "retries": {"total_max_attempts": 1}}  # one try in all
_checked_s3_roots: set[str] = set()


def check_s3_root(root: str, storage_options: dict | None = None) -> None:
    """One HEAD on the root's bucket with short timeouts and no retries: ConnectionError naming the endpoint when it
    cannot be reached, PermissionError without credentials, FileNotFoundError when the bucket does not exist."""
    import botocore.exceptions as boto

    options = dict(storage_options or {})
    key = json.dumps([root, options], sort_keys=True, default=str)
    if key in _checked_s3_roots:
        return
    probe_options = {**options, "skip_instance_cache": True,
                     "config_kwargs": {**options.get("config_kwargs", {}), **PROBE_CONFIG}}
    probe, base = fsspec.core.url_to_fs(root, **probe_options)
    probe.retries = 1  # s3fs's own retry loop, on top of botocore's
    bucket = base.split("/", 1)[0]
    endpoint = s3_endpoint(options)
    where = f"storage.root {root}"
    try:
        probe.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:  # s3fs's translation of a 404
        raise FileNotFoundError(f"{where}: bucket {bucket!r} does not exist at {endpoint}: create it or fix "
                                f"storage.root") from None
    except boto.NoCredentialsError:
        raise PermissionError(f"{where}: no S3 credentials for {endpoint}: set storage.options key/secret or "
                              f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
    except (boto.ConnectionError, boto.HTTPClientError, ConnectionError, TimeoutError) as e:  # refused, silent, DNS
        raise ConnectionError(f"{where}: cannot reach the S3 endpoint {endpoint} ({type(e).__name__}): start the "
                              f"server or fix storage.options.client_kwargs.endpoint_url") from None
    except OSError:
        pass  # S3 answered (403 on HEAD where reads and writes are allowed, a region redirect): the stage decides
    _checked_s3_roots.add(key)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_name(name: str, shard: int) -> str:
    return f"{name}/shard-{shard:05d}.safetensors"


def shard_index_name(name: str, shard: int) -> str:
    """Index part of one shard: one file per shard, so independent writers never touch a shared index file."""
    return f"{name}/{INDEX_DIR}/shard-{shard:05d}.parquet"


def shard_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `tensors`; sorted keys + contiguous CPU copies make them deterministic."""
    return save_safetensors({k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)})


def as_table(rows: pa.Table | dict) -> pa.Table:
    return rows if isinstance(rows, pa.Table) else pa.table(rows)


def check_lengths(tensors: dict[str, torch.Tensor], rows: pa.Table) -> int:
    """Number of rows, after checking that every tensor has one entry per row and no column shadows the index."""
    if not tensors:
        raise ValueError("a shard set needs at least one tensor")
    for key, t in tensors.items():
        if t.dim() == 0 or t.shape[0] != rows.num_rows:
            n = t.shape[0] if t.dim() else "a scalar"
            raise ValueError(f"tensor {key!r} has length {n} along dim 0 but rows has {rows.num_rows} rows")
    clash = [c for c in rows.column_names if c in RESERVED]
    if clash:
        raise ValueError(f"rows columns {clash} clash with index columns {list(RESERVED)}")
    if rows.num_rows == 0:  # an empty set would have no index part, i.e. read back as "not written yet"
        raise ValueError("a shard needs at least one row")
    return rows.num_rows


def existing_digest(storage: Storage, rel: str) -> str | None:
    """sha256 of the file at `rel`, or None when there is none."""
    data = storage.read_bytes_or_none(rel)
    return None if data is None else sha256(data)


def index_part(tensors: dict[str, torch.Tensor], rows: pa.Table, shard: int, first_row: int, digest: str) -> pa.Table:
    """Index rows of one shard; dtype and shape (per row, i.e. without dim 0) are JSON {key: ...} strings."""
    n, keys = rows.num_rows, sorted(tensors)
    dtype = json.dumps({k: str(tensors[k].dtype).removeprefix("torch.") for k in keys})
    shape = json.dumps({k: list(tensors[k].shape[1:]) for k in keys})
    return pa.table({
        "row": pa.array(range(first_row, first_row + n), pa.int64()),
        "shard": pa.array([shard] * n, pa.int32()),
        "shard_row": pa.array(range(n), pa.int32()),
        **{c: rows.column(c) for c in rows.column_names},
        "dtype": pa.array([dtype] * n, pa.string()),
        "shape": pa.array([shape] * n, pa.string()),
        "sha256": pa.array([digest] * n, pa.string()),
    })


def fingerprint(what: dict) -> str:
    """A short digest of JSON-serialisable inputs (params sections, upstream digests): what made a shard."""
    return sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode())[:16]


def write_shard(storage: Storage, name: str, shard: int, tensors: dict[str, torch.Tensor], rows: pa.Table | dict,
                first_row: int, made_by: str | None = None) -> pa.Table:
    """Write `name/shard-NNNNN.safetensors`, then its index part `name/index/shard-NNNNN.parquet`; returns the part.

    Touches only this shard's two files, so separate processes (one per partition) can write a set in any order.
    The part comes second, so a crash in between leaves a shard that readers treat as not written; the re-run
    skips the shard file when its bytes already match and just writes the missing part. `made_by`: the shard's
    fingerprint (see `fingerprint`), recorded in the part's metadata.
    """
    if shard < 0 or first_row < 0:
        raise ValueError(f"shard and first_row must be >= 0, got shard={shard}, first_row={first_row}")
    rows = as_table(rows)
    check_lengths(tensors, rows)
    rel, data = shard_name(name, shard), shard_bytes(tensors)
    digest = sha256(data)
    if existing_digest(storage, rel) != digest:
        storage.write_bytes_atomic(rel, data)
    part = index_part(tensors, rows, shard, first_row, digest)
    if made_by is not None:
        part = part.replace_schema_metadata({**(part.schema.metadata or {}), FINGERPRINT_KEY: made_by.encode()})
    storage.write_table(shard_index_name(name, shard), part)
    return part


def write_shards(storage: Storage, name: str, tensors: dict[str, torch.Tensor], rows: pa.Table | dict,
                 shard_size: int, progress: bool = True) -> pa.Table:
    """Split tensors along dim 0 into shards of `shard_size` rows (shard k starts at row k * shard_size) and write
    each with write_shard; returns the whole index.

    Shards left by an earlier, longer run are deleted first (`prune_shard_set`), since readers would otherwise take
    them as part of this set (before any new shard, so an interrupted run reads as incomplete rather than as a stale
    mix).
    """
    rows = as_table(rows)
    n = check_lengths(tensors, rows)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n_shards = (n + shard_size - 1) // shard_size
    prune_shard_set(storage, name, n_shards)
    parts = []
    for shard in tqdm(range(n_shards), desc=f"write {name}", disable=not progress):
        start = shard * shard_size
        stop = min(start + shard_size, n)
        parts.append(write_shard(storage, name, shard, {k: t[start:stop] for k, t in tensors.items()},
                                 rows.slice(start, stop - start), first_row=start))
    return pa.concat_tables(parts)


def prune_shard_set(storage: Storage, name: str, n_shards: int) -> list[str]:
    """Delete what a set of `n_shards` shards does not hold: shards (and index parts) numbered >= n_shards, left by
    an earlier run with more shards, and `*.tmp-*` files left by a writer that was killed; returns their paths.

    For a process that writes the whole set (a full stage run): a partial run (`--shards`) beside other writers
    must not call it, as their files being written are `*.tmp-*` too. The set's folder then holds exactly what an
    uninterrupted run writes, which is what DVC hashes (its outs keep these files: `persist: true`)."""
    doomed = [p for p in storage.glob(name, "*") + storage.glob(name, INDEX_DIR, "*")
              if TMP_MARK in os.path.basename(p)]
    for path, pattern in ((shard_name(name, 0), SHARD_RE), (shard_index_name(name, 0), PART_RE)):
        folder = path.rsplit("/", 1)[0]
        for full in storage.glob(folder, "shard-*"):
            m = pattern.search(full)
            if m and int(m.group(1)) >= n_shards:
                doomed.append(full)
    for full in doomed:
        with storage.reaching(full):
            storage.fs.rm_file(full)
    return doomed


def shard_status(storage: Storage, name: str, shard: int, made_by: str | None = None) -> str | None:
    """None when the shard is written, intact and (given `made_by`) made by that fingerprint; else why it is not:
    not written yet, its bytes do not match its index, or it was made by other params or inputs.

    Lets a partitioned stage skip its expensive work for done shards and redo a crashed, corrupted or stale one.
    """
    try:
        part = storage.read_table(shard_index_name(name, shard))
    except FileNotFoundError:
        return NOT_WRITTEN
    if part.num_rows == 0 or existing_digest(storage, shard_name(name, shard)) != part.column("sha256")[0].as_py():
        return f"{storage.path(shard_name(name, shard))} is missing or does not match its index (sha256)"
    if made_by is not None:
        recorded = (part.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode() or "none"
        if recorded != made_by:
            return (f"{storage.path(shard_name(name, shard))} was made by other params or inputs (fingerprint "
                    f"{recorded}, now {made_by})")
    return None


def shard_complete(storage: Storage, name: str, shard: int, made_by: str | None = None) -> bool:
    """Whether a shard is written, intact and (given `made_by`) made by that fingerprint (see `shard_status`)."""
    return shard_status(storage, name, shard, made_by) is None


def index_parts(storage: Storage, name: str) -> list[int]:
    """Sorted ids of the shards that have an index part, i.e. that are completely written.

    s3fs caches listings and other processes add parts behind its back, so the cache for name/index (and, by
    s3fs's invalidate_cache, its parents) is dropped first (`Storage.glob`).
    """
    paths = storage.glob(name, INDEX_DIR, "shard-*.parquet")
    return sorted(int(m.group(1)) for m in map(PART_RE.search, paths) if m)


def column_types(schema: pa.Schema) -> dict[str, str]:
    return dict(zip(schema.names, map(str, schema.types)))


def concat_parts(storage: Storage, name: str, parts: dict[int, pa.Table]) -> pa.Table:
    """One index from the parts, sorted by row; parts must agree on columns and must not overlap in rows.

    Each part is written by its own process, so these are checked here rather than trusted.
    """
    first = min(parts)
    for shard, part in parts.items():
        if not part.schema.equals(parts[first].schema):
            raise ValueError(f"{storage.path(shard_index_name(name, shard))} has columns {column_types(part.schema)} "
                             f"but {storage.path(shard_index_name(name, first))} has "
                             f"{column_types(parts[first].schema)}: the shards were written with different rows "
                             f"columns; write them again consistently")
    index = pa.concat_tables(list(parts.values())).sort_by("row")
    if pc.count_distinct(index.column("row")).as_py() != index.num_rows:
        raise ValueError(f"index parts in {storage.path(name, INDEX_DIR)} overlap (repeated row numbers), e.g. left "
                         f"by a run with another shard_size; delete {storage.path(name)} and write the set again")
    return index


def read_index(storage: Storage, name: str, hint: str | None = None, expected_shards: int | None = None) -> pa.Table:
    """The shard set's index: every part under name/index/, concatenated in row order.

    With `expected_shards`, shards 0..expected_shards-1 must all have a part (otherwise FileNotFoundError naming
    the missing ids, so a partitioned run says which partitions to run) and parts beyond that range are ignored.
    Without it, whatever shards are complete so far are returned.
    """
    where = storage.path(name, INDEX_DIR)
    found = index_parts(storage, name)
    if not found:
        hint = hint or f"shard set {name!r} has not been written yet (run the stage that produces it first)"
        raise FileNotFoundError(f"{where} has no index parts (shard-*.parquet): {hint}")
    if expected_shards is not None:
        missing = sorted(set(range(expected_shards)) - set(found))
        if missing:
            hint = hint or f"shard set {name!r} is incomplete (run the stage that produces it for those shards)"
            raise FileNotFoundError(f"{where} has no index part for shard(s) {', '.join(map(str, missing))} "
                                    f"of {expected_shards}: {hint}")
        found = [s for s in found if s < expected_shards]
    return concat_parts(storage, name, {s: storage.read_table(shard_index_name(name, s)) for s in found})


def shard_digests(index: pa.Table) -> dict[int, str]:
    """{shard: sha256} in order of first appearance in the index (each shard's digest is on all of its rows)."""
    return dict(zip(index.column("shard").to_pylist(), index.column("sha256").to_pylist()))


def read_shards(storage: Storage, name: str, keys: list[str] | None = None, shards: list[int] | None = None,
                hint: str | None = None, progress: bool = True,
                expected_shards: int | None = None) -> tuple[dict[str, torch.Tensor], pa.Table]:
    """Load (a subset of keys / shards of) a shard set, checking every shard's sha256 against the index.

    Returns the tensors concatenated in row order and the matching rows of the index.
    """
    index = read_index(storage, name, hint, expected_shards)
    if shards is not None:
        index = index.filter(pc.is_in(index.column("shard"), pa.array(shards, pa.int32())))
    parts: dict[str, list[torch.Tensor]] = {}
    # shards in the order their rows appear (not by id), so the tensors line up with the row-sorted index
    for shard, digest in tqdm(shard_digests(index).items(), desc=f"read {name}", disable=not progress):
        rel = shard_name(name, shard)
        data = storage.read_bytes(rel, hint=f"listed in {storage.path(shard_index_name(name, shard))}; "
                                            f"re-run write_shard for shard {shard}")
        if sha256(data) != digest:
            raise ValueError(f"shard {storage.path(rel)} is corrupted or truncated (its sha256 differs from its "
                             f"index): run the stage that writes {name!r} again (it rewrites damaged shards)")
        loaded = load_safetensors(data)
        for key in keys if keys is not None else sorted(loaded):
            if key not in loaded:
                raise KeyError(f"{storage.path(rel)} has no tensor {key!r}; it has {sorted(loaded)}")
            parts.setdefault(key, []).append(loaded[key])
    return {k: torch.cat(v) for k, v in parts.items()}, index


def verify_shards(storage: Storage, name: str, progress: bool = True,
                  expected_shards: int | None = None) -> list[str]:
    """Full paths of shards that are missing or whose sha256 differs from the index (empty when all are good)."""
    bad = []
    digests = sorted(shard_digests(read_index(storage, name, expected_shards=expected_shards)).items())
    for shard, digest in tqdm(digests, desc=f"verify {name}", disable=not progress):
        rel = shard_name(name, shard)
        if existing_digest(storage, rel) != digest:
            bad.append(storage.path(rel))
    return bad
