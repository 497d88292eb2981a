"""Rows of safetensors shard sets (data/storage.py) read through `torch.utils.data`, with a bounded number of shards
in memory at a time, so what a reader holds does not grow with the data set.

- `ShardRows` (map-style): rows of one or more aligned shard sets (e.g. `samples` and `labels`, written shard by
  shard alongside each other) chosen by position in their index. `__getitems__(positions)` loads each shard it needs
  once, through a per-process cache of at most `cache_shards` shards per set, and returns {key: (len(positions),
  ...)} in the order asked: the same rows, bit for bit, as indexing the whole set read into memory. A `DataLoader`
  with a `batch_sampler` of position lists fetches whole batches; with `num_workers` > 0 each worker keeps its own
  cache and the loader hands the batches back in sampler order.
- `ShardChunks` (iterable): the chosen rows shard by shard, in shard order. Under `num_workers` W, worker w reads
  shards w, w + W, ... of those holding chosen rows; the loader's in-order round robin over the workers returns them
  in shard order again, so the result does not depend on W (`gather_rows`).
- `TensorRows`: the same `__getitems__` over tensors already in memory (a set small enough to hold, tests).

A shard's sha256 is checked against its index the first time a process loads it; after that, a reload of the same
shard (evicted from the cache) trusts it.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from stitchvm.data.storage import Storage, sha256, shard_digests, shard_index_name, shard_name

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def as_is(batch):
    """collate_fn of loaders whose dataset returns whole batches already (`__getitems__`)."""
    return batch


class ShardCache:
    """The last `max_shards` shards of one set that this process loaded ({key: tensor} each), least recently used
    first out; every load is counted, and `resident` is what is held now."""

    def __init__(self, storage: Storage, name: str, keys: list[str], digests: dict[int, str], max_shards: int):
        if max_shards < 1:
            raise ValueError(f"a shard cache holds at least 1 shard, got cache_shards={max_shards}")
        self.storage, self.name, self.keys, self.digests, self.max_shards = storage, name, keys, digests, max_shards
        self.shards: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.verified: set[int] = set()
        self.loads = 0

    def resident(self) -> int:
        return len(self.shards)

    def get(self, shard: int) -> dict[str, torch.Tensor]:
        if shard in self.shards:
            self.shards.move_to_end(shard)
            return self.shards[shard]
        while len(self.shards) >= self.max_shards:  # evict first, so at most max_shards are ever held
            self.shards.popitem(last=False)
        self.shards[shard] = self.load(shard)
        return self.shards[shard]

    def load(self, shard: int) -> dict[str, torch.Tensor]:
        rel = shard_name(self.name, shard)
        data = self.storage.read_bytes(rel, hint=f"listed in {self.storage.path(shard_index_name(self.name, shard))}; "
                                                 f"run the stage that writes {self.name!r} again")
        if shard not in self.verified:
            if sha256(data) != self.digests[shard]:
                raise ValueError(f"shard {self.storage.path(rel)} is corrupted or truncated (its sha256 differs from "
                                 f"its index): run the stage that writes {self.name!r} again")
            self.verified.add(shard)
        loaded = load_safetensors(data)
        missing = [k for k in self.keys if k not in loaded]
        if missing:
            raise KeyError(f"{self.storage.path(rel)} has no tensor {missing[0]!r}; it has {sorted(loaded)}")
        self.loads += 1
        return {k: loaded[k] for k in self.keys}


def row_layout(index: pa.Table, key: str, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape of one row, dtype) of tensor `key` of a shard set, from its index's JSON columns."""
    shape, dtype = json.loads(index.column("shape")[0].as_py()), json.loads(index.column("dtype")[0].as_py())
    if key not in shape:
        raise KeyError(f"shard set {name!r} has no tensor {key!r}; it has {sorted(shape)}")
    return tuple(shape[key]), DTYPES[dtype[key]]


class ShardRows(Dataset):
    """Rows `rows` (positions in the indexes) of aligned shard sets `sets` = {name: (index, keys)}; see the module
    docstring. Every set's index must place each chosen row in the same shard and shard row."""

    def __init__(self, storage: Storage, sets: dict[str, tuple[pa.Table, list[str]]], rows: list[int] | torch.Tensor,
                 cache_shards: int = 4):
        rows = torch.as_tensor(rows, dtype=torch.long)
        first, (index, _) = next(iter(sets.items()))
        self.shard = torch.tensor(index.column("shard").to_numpy())[rows]  # (N,) shard of each chosen row
        self.shard_row = torch.tensor(index.column("shard_row").to_numpy())[rows]  # (N,) its row in that shard
        for name, (other, _) in sets.items():
            if other.num_rows != index.num_rows or not (
                    torch.equal(torch.tensor(other.column("shard").to_numpy())[rows], self.shard)
                    and torch.equal(torch.tensor(other.column("shard_row").to_numpy())[rows], self.shard_row)):
                raise ValueError(f"{storage.path(name)} does not line up with {storage.path(first)} (other shards or "
                                 f"rows): write {name!r} again from {first!r}")
        self.storage, self.cache_shards = storage, cache_shards
        self.keys = {name: list(keys) for name, (_, keys) in sets.items()}
        self.digests = {name: shard_digests(idx) for name, (idx, _) in sets.items()}
        self.layout = {k: row_layout(idx, k, name) for name, (idx, keys) in sets.items() for k in keys}
        self.caches: dict[str, ShardCache] | None = None  # made in the process that reads (each worker its own)

    def __len__(self) -> int:
        return len(self.shard)

    def row_shape(self, key: str) -> tuple[int, ...]:
        return self.layout[key][0]

    def cache(self, name: str) -> ShardCache:
        if self.caches is None:
            self.caches = {n: ShardCache(self.storage, n, keys, self.digests[n], self.cache_shards)
                           for n, keys in self.keys.items()}
        return self.caches[name]

    def resident(self) -> int:
        """Shards held in this process's caches now (every set together)."""
        return 0 if self.caches is None else sum(c.resident() for c in self.caches.values())

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        positions = torch.as_tensor(positions, dtype=torch.long)
        out = {k: torch.empty((len(positions), *shape), dtype=dtype) for k, (shape, dtype) in self.layout.items()}
        shards = self.shard[positions]
        # each shard once, in order of first appearance: a batch never holds more than the cache
        for shard in dict.fromkeys(shards.tolist()):
            where = torch.nonzero(shards == shard).squeeze(1)  # (n,) places in the batch
            local = self.shard_row[positions[where]]  # (n,) rows in the shard
            for name, keys in self.keys.items():
                tensors = self.cache(name).get(shard)
                for k in keys:
                    out[k][where] = tensors[k][local]
        return out

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}


class TensorRows(Dataset):
    """`ShardRows`' interface over tensors in memory ({key: (N, ...)}, equal lengths)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors of one row set need equal lengths, got {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def row_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape[1:])

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[position] for k, v in self.tensors.items()}


class ShardChunks(IterableDataset):
    """The rows of a `ShardRows` shard by shard: yields (positions (n,), {key: (n, ...)}) per shard holding chosen
    rows, in shard order; worker w of W takes the w-th, (w + W)-th, ... of those shards."""

    def __init__(self, rows: ShardRows):
        self.rows = rows
        order = torch.argsort(rows.shard, stable=True)  # positions grouped by shard, in position order within one
        self.shards = list(dict.fromkeys(rows.shard[order].tolist()))
        self.positions = {s: order[rows.shard[order] == s] for s in self.shards}

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            positions = self.positions[shard]
            yield positions, self.rows.__getitems__(positions.tolist())


def gather_rows(rows: ShardRows, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Every chosen row in memory ({key: (N, ...)} in position order), read shard by shard by `num_workers` workers:
    the set read whole, with no more than the chosen rows and a cache of shards held."""
    out = {k: torch.empty((len(rows), *shape), dtype=dtype) for k, (shape, dtype) in rows.layout.items()}
    loader = DataLoader(ShardChunks(rows), batch_size=None, num_workers=num_workers, collate_fn=as_is,
                        generator=torch.Generator())  # its own generator: the global RNG is left as it was
    for positions, tensors in loader:
        for k, v in tensors.items():
            out[k][positions] = v
    return out
