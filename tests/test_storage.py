import hashlib
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stitchvm.data.storage import (open_root, read_index, read_shards, shard_complete, shard_index_name, verify_shards,
                              write_shard, write_shards)

N, SHARD = 10, 4  # 3 shards: 4 + 4 + 2 rows


def make_set(seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {"latents": torch.randn(N, 2, 3, 3, generator=g), "reward": torch.rand(N, generator=g).double()}
    rows = {"id": [f"s{i}" for i in range(N)], "prompt": [f"p{i // 2}" for i in range(N)], "seed": list(range(N))}
    return tensors, rows


def shard_files(root, name="samples"):
    return sorted(os.path.join(root, name, f) for f in os.listdir(os.path.join(root, name)) if f.startswith("shard-"))


def part_files(root, name="samples"):
    return sorted(os.path.join(root, name, "index", f) for f in os.listdir(os.path.join(root, name, "index")))


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


def piece(tensors, rows, shard):
    """Tensors and rows of one shard, as a partitioned stage would compute them on its own."""
    start, stop = shard * SHARD, min((shard + 1) * SHARD, N)
    return {k: t[start:stop] for k, t in tensors.items()}, {c: v[start:stop] for c, v in rows.items()}, start


def test_local_round_trip(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    index = write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    files = shard_files(tmp_path)
    assert [os.path.basename(f) for f in files] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert [os.path.basename(f) for f in part_files(tmp_path)] == [f"shard-{i:05d}.parquet" for i in range(3)]
    assert not os.path.exists(tmp_path / "samples" / "index.parquet")
    assert shard_index_name("samples", 2) == "samples/index/shard-00002.parquet"

    out, stored = read_shards(storage, "samples", progress=False, expected_shards=3)
    assert set(out) == {"latents", "reward"}
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype and torch.equal(out[k], tensors[k])
    assert stored.equals(index)
    assert read_index(storage, "samples").equals(index)
    part = pq.read_table(part_files(tmp_path)[1])
    assert part.equals(index.slice(4, 4))  # each part holds exactly its shard's rows
    assert index.column("row").type == pa.int64() and index.column("shard").type == pa.int32()
    assert index.column("row").to_pylist() == list(range(N))
    assert index.column("shard").to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert index.column("shard_row").to_pylist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    for col in rows:
        assert index.column(col).to_pylist() == rows[col]
    digests = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]
    assert index.column("sha256").to_pylist() == [digests[s] for s in index.column("shard").to_pylist()]
    assert '"latents": [2, 3, 3]' in index.column("shape")[0].as_py()
    assert '"reward": "float64"' in index.column("dtype")[0].as_py()

    # subsets of keys and shards come back in row order with the matching index rows
    part, part_index = read_shards(storage, "samples", keys=["reward"], shards=[2, 0], progress=False)
    assert list(part) == ["reward"]
    assert part_index.column("row").to_pylist() == [0, 1, 2, 3, 8, 9]
    assert torch.equal(part["reward"], tensors["reward"][[0, 1, 2, 3, 8, 9]])


def test_same_inputs_give_byte_identical_files(tmp_path):
    for root in ("a", "b"):
        tensors, rows = make_set()
        if root == "b":  # dict insertion order must not matter
            tensors = dict(reversed(tensors.items()))
        write_shards(open_root(str(tmp_path / root)), "samples", tensors, rows, shard_size=SHARD, progress=False)
    names = all_files(tmp_path / "a")
    assert names == all_files(tmp_path / "b") and "samples/index/shard-00002.parquet" in names
    for f in names:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_rerun_skips_complete_shards_and_repairs_a_truncated_one(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    files = shard_files(tmp_path)
    before = mtimes(files)
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    assert mtimes(files) == before

    bad = files[1]
    good_bytes = open(bad, "rb").read()
    with open(bad, "r+b") as f:
        f.truncate(len(good_bytes) // 2)
    with pytest.raises(ValueError, match="corrupted or truncated") as err:
        read_shards(storage, "samples", progress=False)
    assert bad in str(err.value)
    assert verify_shards(storage, "samples", progress=False) == [bad]

    before = mtimes([files[0], files[2]])
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    assert mtimes([files[0], files[2]]) == before
    assert open(bad, "rb").read() == good_bytes
    assert verify_shards(storage, "samples", progress=False) == []
    out, _ = read_shards(storage, "samples", progress=False)
    assert torch.equal(out["latents"], tensors["latents"])

    # a missing shard is reported as bad too
    os.remove(files[2])
    assert verify_shards(storage, "samples", progress=False) == [files[2]]


def test_changed_inputs_rewrite_the_shards(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set(seed=0)
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    new, _ = make_set(seed=1)
    write_shards(storage, "samples", new, rows, shard_size=SHARD, progress=False)
    out, _ = read_shards(storage, "samples", progress=False)
    assert torch.equal(out["latents"], new["latents"])


def test_no_temporary_files_left_visible(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    storage.write_table("prompts.parquet", pa.table(rows))
    storage.write_json("meta/params.json", {"seed": 1})
    names = all_files(tmp_path)
    assert len(names) == 8 and not [f for f in names if ".tmp-" in f]  # 3 shards, 3 index parts, 2 files

    # a write that fails half way leaves the previous complete file and no temporary behind
    with pytest.raises(TypeError):
        storage.write_bytes_atomic("meta/params.json", "not bytes")
    assert storage.read_json("meta/params.json") == {"seed": 1}
    assert os.listdir(tmp_path / "meta") == ["params.json"]


def test_tables_and_json_round_trip(tmp_path):
    storage = open_root(str(tmp_path))
    table = pa.table({"prompt": ["a cat", "a dog"], "score": [0.5, 1.5]})
    storage.write_table("labels.parquet", table)
    assert storage.read_table("labels.parquet").equals(table)
    storage.write_json("metrics.json", {"spearman": 0.25, "n": 2})
    assert storage.read_json("metrics.json") == {"spearman": 0.25, "n": 2}
    assert storage.exists("metrics.json") and not storage.exists("nope.json")
    assert storage.path("a", "b.parquet") == f"{tmp_path}/a/b.parquet"


def test_missing_files_name_the_path_and_the_hint(tmp_path):
    storage = open_root(str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        read_shards(storage, "samples", hint="run the `samples` stage first")
    assert str(tmp_path / "samples" / "index") in str(err.value)
    assert "run the `samples` stage first" in str(err.value)
    with pytest.raises(FileNotFoundError, match="run the `labels` stage first") as err:
        storage.read_table("labels.parquet", hint="run the `labels` stage first")
    assert str(tmp_path / "labels.parquet") in str(err.value)


def test_length_mismatch_names_the_key(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    tensors["reward"] = tensors["reward"][:7]
    with pytest.raises(ValueError, match=r"'reward'.*7.*10"):
        write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    tensors, rows = make_set()
    rows["id"] = rows["id"][:9]
    with pytest.raises(ValueError):  # pyarrow rejects ragged columns itself (ArrowInvalid)
        write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    with pytest.raises(ValueError, match=r"'latents'.*10.*9"):
        write_shards(storage, "samples", tensors, pa.table({"id": rows["id"]}), shard_size=SHARD, progress=False)
    assert not os.path.exists(tmp_path / "samples")


def test_shards_written_one_at_a_time_in_reverse_match_write_shards(tmp_path):
    tensors, rows = make_set()
    index = write_shards(open_root(str(tmp_path / "a")), "samples", tensors, rows, shard_size=SHARD, progress=False)
    storage = open_root(str(tmp_path / "b"))
    parts = {}
    for shard in (2, 1, 0):  # separate partitions, finishing in any order
        t, r, first_row = piece(tensors, rows, shard)
        parts[shard] = write_shard(storage, "samples", shard, t, r, first_row=first_row)
    assert parts[1].equals(index.slice(4, 4))
    names = all_files(tmp_path / "a")
    assert names == all_files(tmp_path / "b")
    for f in names:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert read_index(storage, "samples", expected_shards=3).equals(index)
    out, _ = read_shards(storage, "samples", progress=False, expected_shards=3)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_tensors_follow_row_order_when_shard_ids_do_not(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    t, r, _ = piece(tensors, rows, 0)
    write_shard(storage, "samples", 0, t, r, first_row=4)  # shard 0 holds rows 4..7, shard 1 rows 0..3
    t, r, _ = piece(tensors, rows, 1)
    write_shard(storage, "samples", 1, t, r, first_row=0)
    out, index = read_shards(storage, "samples", progress=False, expected_shards=2)
    assert index.column("shard").to_pylist() == [1] * 4 + [0] * 4
    assert torch.equal(out["latents"], torch.cat([tensors["latents"][4:8], tensors["latents"][:4]]))


def test_expected_shards_names_the_missing_ones(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    for shard in (0, 2):
        t, r, first_row = piece(tensors, rows, shard)
        write_shard(storage, "samples", shard, t, r, first_row=first_row)

    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 3: run stage samples for partition 1") as err:
        read_index(storage, "samples", hint="run stage samples for partition 1", expected_shards=3)
    assert str(tmp_path / "samples" / "index") in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1, 3, 4 of 5.*incomplete"):
        read_shards(storage, "samples", progress=False, expected_shards=5)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 3"):
        verify_shards(storage, "samples", progress=False, expected_shards=3)

    # without expected_shards the complete shards so far are read; parts past expected_shards are left out
    assert read_index(storage, "samples").column("row").to_pylist() == [0, 1, 2, 3, 8, 9]
    assert read_index(storage, "samples", expected_shards=1).column("row").to_pylist() == [0, 1, 2, 3]


def test_shard_without_its_index_part_is_incomplete_until_rerun(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    index = write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    os.remove(tmp_path / "samples" / "index" / "shard-00001.parquet")  # crashed after the shard, before its part
    shard_file = str(tmp_path / "samples" / "shard-00001.safetensors")
    before = mtimes([shard_file])

    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 3"):
        read_index(storage, "samples", expected_shards=3)
    assert 1 not in read_index(storage, "samples").column("shard").to_pylist()
    assert [shard_complete(storage, "samples", k) for k in range(4)] == [True, False, True, False]

    t, r, first_row = piece(tensors, rows, 1)
    write_shard(storage, "samples", 1, t, r, first_row=first_row)
    assert mtimes([shard_file]) == before  # the complete shard file was kept, only its part was written
    assert read_index(storage, "samples", expected_shards=3).equals(index)
    assert verify_shards(storage, "samples", progress=False, expected_shards=3) == []
    assert shard_complete(storage, "samples", 1)

    with open(shard_file, "r+b") as f:  # a damaged shard is not complete either, so the stage redoes it
        f.truncate(100)
    assert not shard_complete(storage, "samples", 1)


def test_shorter_rerun_drops_stale_parts_and_inconsistent_parts_are_rejected(tmp_path):
    storage = open_root(str(tmp_path))
    tensors, rows = make_set()
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    index = write_shards(storage, "samples", tensors, rows, shard_size=N, progress=False)
    assert [os.path.basename(f) for f in part_files(tmp_path)] == ["shard-00000.parquet"]
    assert read_index(storage, "samples").equals(index) and index.num_rows == N

    # parts whose rows overlap (e.g. from runs with different shard sizes) are an error, not a silent mix
    t, r, _ = piece(tensors, rows, 1)
    write_shard(storage, "samples", 1, t, r, first_row=4)
    with pytest.raises(ValueError, match="overlap"):
        read_index(storage, "samples")

    # parts must agree on their columns
    other = open_root(str(tmp_path / "other"))
    for shard in (0, 1):
        t, r, first_row = piece(tensors, rows, shard)
        if shard == 1:
            r = {"id": r["id"]}
        write_shard(other, "samples", shard, t, r, first_row=first_row)
    with pytest.raises(ValueError, match="different rows columns") as err:
        read_index(other, "samples")
    assert other.path(shard_index_name("samples", 1)) in str(err.value)

    with pytest.raises(ValueError, match="at least one row"):
        write_shard(storage, "empty", 0, {"x": torch.zeros(0)}, {"id": []}, first_row=0)
    with pytest.raises(ValueError, match=">= 0"):
        write_shard(storage, "samples", -1, t, r, first_row=0)


# --- S3 against a real local moto server -----------------------------------------------------------------------


def test_s3_round_trip_and_corruption(s3_options):
    storage = open_root("s3://bucket/run1", s3_options)
    assert storage.path(shard_index_name("samples", 0)) == "s3://bucket/run1/samples/index/shard-00000.parquet"
    tensors, rows = make_set()
    index = write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    out, stored = read_shards(storage, "samples", progress=False, expected_shards=3)
    assert stored.equals(index)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)

    table = pa.table({"prompt": ["a cat", "a dog"], "score": [0.5, 1.5]})
    storage.write_table("labels.parquet", table)
    assert storage.read_table("labels.parquet").equals(table)
    storage.write_json("metrics.json", {"n": 2})
    assert storage.read_json("metrics.json") == {"n": 2}

    fs = fsspec.filesystem("s3", **s3_options)
    keys = fs.ls("bucket/run1/samples")
    expected = ["index"] + [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == expected  # no temporary keys on S3 either
    parts = fs.ls("bucket/run1/samples/index")
    assert sorted(k.rsplit("/", 1)[1] for k in parts) == [f"shard-{i:05d}.parquet" for i in range(3)]
    shard1 = "samples/shard-00001.safetensors"
    assert fs.cat_file(f"bucket/run1/{shard1}") == storage.read_bytes(shard1)

    bad = "s3://bucket/run1/samples/shard-00001.safetensors"
    good_bytes = fs.cat_file(bad)
    fs.pipe_file(bad, good_bytes[:100])
    with pytest.raises(ValueError, match="corrupted or truncated") as err:
        read_shards(storage, "samples", progress=False)
    assert bad in str(err.value)
    assert verify_shards(storage, "samples", progress=False) == [bad]
    write_shards(storage, "samples", tensors, rows, shard_size=SHARD, progress=False)
    assert fs.cat_file(bad) == good_bytes and verify_shards(storage, "samples", progress=False) == []

    with pytest.raises(FileNotFoundError, match="s3://bucket/run1/missing/index .*stage first"):
        read_shards(storage, "missing", hint="run the stage first")


def test_s3_shards_from_separate_writers_are_seen_despite_listing_caches(s3_options):
    tensors, rows = make_set()
    reader = open_root("s3://bucket/run2", {**s3_options, "use_listings_cache": True, "skip_instance_cache": True})
    for shard in (2, 0):  # each partition in its own process, i.e. its own filesystem instance
        writer = open_root("s3://bucket/run2", {**s3_options, "skip_instance_cache": True})
        t, r, first_row = piece(tensors, rows, shard)
        write_shard(writer, "samples", shard, t, r, first_row=first_row)
    with pytest.raises(FileNotFoundError, match=r"s3://bucket/run2/samples/index has no index part for shard\(s\) 1 "):
        read_index(reader, "samples", expected_shards=3)
    assert len(reader.fs.ls(reader.path("samples", "index"))) == 2  # an ls fills s3fs's listing cache (glob reads it)
    t, r, first_row = piece(tensors, rows, 1)
    write_shard(writer, "samples", 1, t, r, first_row=first_row)
    out, index = read_shards(reader, "samples", progress=False, expected_shards=3)
    assert index.column("row").to_pylist() == list(range(N))
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
