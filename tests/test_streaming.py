"""Streaming data (stitchvm/data/shard_dataset.py): rows read from the shards through torch.utils.data equal the set
read whole, whatever the number of loader workers; a bounded number of shards is ever resident; training on streamed
rows is the in-memory run bit for bit (batches drawn as they always were), resume included."""
import pyarrow as pa
import pytest
import torch

from stitchvm.config import TrainConfig
from stitchvm.data.shard_dataset import ShardCache, ShardChunks, ShardRows, TensorRows, gather_rows
from stitchvm.data.storage import open_root, read_index, read_shards, shard_digests, write_shard, write_shards
from stitchvm.diffusion.flow import logit_normal
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.training import BatchDraws, teacher_targets, train_value_model

from conftest import latents, resumed_after_a_crash

PROMPTS = ["a red square", "a green square", "a blue square", "a yellow square"]


def write_pair(storage, gen, n=23, shard_size=4):
    """`samples` (latents) and `labels` (embeds, tokens) of n rows, every third in the test split."""
    rows = {"sample_id": list(range(n)), "split": ["test" if k % 3 == 0 else "train" for k in range(n)]}
    write_shards(storage, "samples", {"latents": torch.randn(n, 4, 3, 3, generator=gen)}, rows, shard_size,
                 progress=False)
    write_shards(storage, "labels", {"embeds": torch.randn(n, 6, generator=gen),
                                     "tokens": torch.randn(n, 5, 2, generator=gen, dtype=torch.float64)},
                 {"sample_id": rows["sample_id"]}, shard_size, progress=False)


def pair_rows(storage, rows, cache_shards=2) -> ShardRows:
    return ShardRows(storage, {"samples": (read_index(storage, "samples"), ["latents"]),
                               "labels": (read_index(storage, "labels"), ["embeds", "tokens"])}, rows, cache_shards)


def whole(storage) -> dict[str, torch.Tensor]:
    """Both sets read whole into memory, the way read_split did."""
    samples, _ = read_shards(storage, "samples", progress=False)
    labels, _ = read_shards(storage, "labels", progress=False)
    return {**samples, **labels}


def test_rows_equal_the_set_read_whole(tmp_path, gen):
    storage = open_root(str(tmp_path))
    write_pair(storage, gen)
    rows = torch.tensor([k for k in range(23) if k % 3 != 0])  # the train split: positions skip rows
    data, ref = pair_rows(storage, rows), whole(storage)
    positions = torch.randint(len(rows), (40,), generator=gen).tolist()  # repeats, every shard, any order
    batch = data.__getitems__(positions)
    for key in ("latents", "embeds", "tokens"):
        assert batch[key].dtype == ref[key].dtype
        assert torch.equal(batch[key], ref[key][rows][positions])
    assert torch.equal(data[5]["tokens"], ref["tokens"][rows[5]])
    assert data.row_shape("latents") == (4, 3, 3) and len(data) == len(rows)


def test_shard_cache_holds_at_most_its_size(tmp_path, gen):
    storage = open_root(str(tmp_path))
    write_pair(storage, gen)  # 6 shards
    index = read_index(storage, "labels")
    cache = ShardCache(storage, "labels", ["tokens"], shard_digests(index), max_shards=2)
    held = []
    for shard in [0, 1, 0, 2, 3, 4, 5, 5, 4]:
        cache.get(shard)
        held.append(cache.resident())
    assert max(held) == 2
    assert cache.loads == 6  # each shard once: the second 0 and the repeated 5 and 4 were still held
    cache.get(0)  # evicted since (least recently used): read again
    assert cache.loads == 7 and list(cache.shards) == [4, 0]
    # through the dataset: a batch touching every shard still holds at most cache_shards per set afterwards
    data = pair_rows(storage, list(range(23)), cache_shards=2)
    data.__getitems__(list(range(23)))
    assert data.resident() == 4  # 2 of samples + 2 of labels
    with pytest.raises(ValueError, match="at least 1 shard"):
        ShardCache(storage, "labels", ["tokens"], shard_digests(index), max_shards=0)


def test_a_corrupted_shard_is_refused(tmp_path, gen):
    storage = open_root(str(tmp_path))
    write_pair(storage, gen)
    path = tmp_path / "labels" / "shard-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    data = pair_rows(storage, list(range(23)))
    with pytest.raises(ValueError, match="shard-00002.safetensors is corrupted"):
        data.__getitems__([9])


def test_sets_that_do_not_line_up_are_refused(tmp_path, gen):
    storage = open_root(str(tmp_path))
    write_pair(storage, gen, shard_size=4)
    write_shards(storage, "other", {"x": torch.zeros(23, 1)}, {"sample_id": list(range(23))}, 5, progress=False)
    with pytest.raises(ValueError, match="does not line up"):
        ShardRows(storage, {"samples": (read_index(storage, "samples"), ["latents"]),
                            "other": (read_index(storage, "other"), ["x"])}, list(range(23)))


@pytest.mark.parametrize("workers", [0, 2])
def test_gather_rows_equals_the_set_read_whole(tmp_path, gen, workers):
    storage = open_root(str(tmp_path))
    write_pair(storage, gen)
    rows = torch.tensor([k for k in range(23) if k % 3 == 0])  # the test split
    data = pair_rows(storage, rows)
    chunks = ShardChunks(data)
    assert chunks.shards == sorted(set(data.shard.tolist()))
    got, ref = gather_rows(data, num_workers=workers), whole(storage)
    for key in ("latents", "embeds", "tokens"):
        assert torch.equal(got[key], ref[key][rows])


def test_draws_are_the_training_scheme_of_before(gen):
    """BatchDraws draws rows, then t, then ε from one generator per step, as the in-memory loop always did: the
    committed pipeline outputs (dvc.lock) depend on it."""
    cfg = TrainConfig(steps=3, batch_size=6, warmup_steps=1)
    draws = BatchDraws(11, (4, 3, 3), cfg, torch.Generator().manual_seed(7), start=0, share=slice(0, 6))
    batches = list(draws)
    ref = torch.Generator().manual_seed(7)
    for batch, (idx, t, noise, state) in zip(batches, draws.pending):
        want_idx = torch.randint(11, (6,), generator=ref)
        want_t = logit_normal(6, cfg.sigma_logit_mean, cfg.sigma_logit_std, ref)
        want_noise = torch.randn((6, 4, 3, 3), generator=ref)
        assert batch == want_idx.tolist() and torch.equal(idx, want_idx)
        assert torch.equal(t, want_t) and torch.equal(noise, want_noise)
        assert torch.equal(state, ref.get_state())  # what a checkpoint after this step saves


def training_data(backbone, reward, gen, tmp_path, n=16):
    """Clean latents, their teacher targets and prompts in memory, and the same rows written as shards of 5."""
    z0 = latents(backbone, n, gen)
    targets = teacher_targets(backbone, reward, z0, 8)
    prompts = [PROMPTS[k % 4] for k in range(n)]
    storage = open_root(str(tmp_path / "data"))
    for shard, start in enumerate(range(0, n, 5)):
        stop = min(start + 5, n)
        write_shard(storage, "samples", shard, {"latents": z0[start:stop]},
                    pa.table({"prompt": prompts[start:stop]}), start)
        write_shard(storage, "labels", shard, {"embeds": targets.embeds[start:stop],
                                               "tokens": targets.tokens[start:stop]},
                    pa.table({"prompt": prompts[start:stop]}), start)
    streamed = ShardRows(storage, {"samples": (read_index(storage, "samples"), ["latents"]),
                                   "labels": (read_index(storage, "labels"), ["embeds", "tokens"])},
                         list(range(n)), cache_shards=1)
    return z0, targets, prompts, streamed


def test_streamed_training_is_the_in_memory_run(tmp_path, backbone, reward, gen):
    z0, targets, prompts, streamed = training_data(backbone, reward, gen, tmp_path)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, group_size=2, lambda_rank=0.5)
    runs = {}
    for name, data, tgt, workers in [("memory", z0, targets, 0), ("stream", streamed, None, 0),
                                     ("stream-2-workers", streamed, None, 2)]:
        model = StitchedValueModel(backbone, reward, 2, 1)
        history = train_value_model(model, data, tgt, cfg, seed=5, progress=False, prompts=prompts,
                                    num_workers=workers)
        runs[name] = history, model.trainable_state_dict()
    ref_history, ref_weights = runs.pop("memory")
    for name, (history, weights) in runs.items():
        assert history == ref_history, name
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), name
    assert 0 < streamed.resident() <= 2  # the run in this process held one shard of each set: cache_shards=1


def test_streamed_resume_with_workers_equals_an_uninterrupted_run(tmp_path, backbone, reward, gen):
    """The loader's workers fetch ahead, and the generator runs ahead with them: a checkpoint must still hold the
    state after its own step's draws."""
    z0, targets, prompts, streamed = training_data(backbone, reward, gen, tmp_path)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    full = StitchedValueModel(backbone, reward, 2, 1)
    train_value_model(full, z0, targets, cfg, seed=5, checkpoint_dir=tmp_path / "a", progress=False)
    history, resumed = resumed_after_a_crash(backbone, reward, streamed, None, cfg, tmp_path / "b", crash_step=4,
                                             num_workers=2)
    assert [r["step"] for r in history] == [4, 5, 6]
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_rows_need_equal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        TensorRows({"latents": torch.zeros(3, 1), "embeds": torch.zeros(2, 1)})


def test_stage_readers_equal_read_split(tmp_path):
    """On the stages' own outputs: `stream_split` gives read_split's rows, and the evaluation's inputs read shard by
    shard equal the sets read whole."""
    from stitchvm.config import Params, from_dict
    from stitchvm.stages import stage
    from stitchvm.stages.evaluate import eval_inputs
    from stitchvm.stages.runtime import Paths
    from stitchvm.stages.upstream import EVAL, read_split, stream_split

    params = from_dict(Params, {
        "prompts": {"train": 2, "val": 0, "test": 2}, "samples": {"source": "smooth", "per_prompt": 6},
        "storage": {"shard_size": 5, "root": str(tmp_path / "data")}, "noisy": {"probe_size": 8, "sigmas": [0.25, 0.5]}})
    paths = Paths.from_params(params, reports=tmp_path / "reports", checkpoints=tmp_path / "ckpt", track=False)
    for name in ("prompts", "samples", "labels", "noisy"):
        stage(name).run(params, paths, progress=False)
    storage = paths.storage()
    for split in ("train", "test"):
        z0, index, targets, _ = read_split(storage, params, split, labels=True)
        rows, stream_index = stream_split(storage, params, split, labels=True)
        got = gather_rows(rows)
        assert stream_index.equals(index)
        assert torch.equal(got["latents"], z0) and torch.equal(got["embeds"], targets.embeds)
        assert torch.equal(got["tokens"], targets.tokens) and "score" not in got  # a CLIP reward: no scalar target
        positions = [3, 0, 11, 3, 7]  # across shards, repeated
        assert torch.equal(rows.__getitems__(positions)["tokens"], targets.tokens[positions])
    data, noisy, teacher, _, _, ids = eval_inputs(params, storage)
    z0, _, targets, _ = read_split(storage, params, "test", labels=True)
    assert torch.equal(data.z0, z0) and torch.equal(teacher.tokens, targets.tokens)
    whole, eval_index = read_shards(storage, EVAL, progress=False)
    sigmas = eval_index.column("sigma").to_pylist()
    assert list(noisy) == [0.25, 0.5] and ids == eval_index.column("sample_id").to_pylist()[:len(ids)]
    for s, z_t in noisy.items():
        assert torch.equal(z_t, whole["z_t"][torch.tensor([k for k, x in enumerate(sigmas) if x == s])])


@pytest.mark.e2e
def test_bench_memory_runs_from_the_command_line(tmp_path):
    """`python -m stitchvm bench memory` at tiny sizes: both modes train the same model in their subprocesses and the
    report holds a peak per (mode, per_prompt) and each mode's ratio (the real measurement: 192 and 768)."""
    import json

    from stitchvm.__main__ import main as cli

    out = tmp_path / "bench_memory.json"
    assert cli(["bench", "memory", "--profile", "smoke", "--per-prompt", "4,8", "--steps", "2", "--out", str(out),
                "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert {(r["mode"], r["per_prompt"]) for r in report["rows"]} == {
        (m, n) for m in ("stream", "in-memory") for n in (4, 8)}
    assert all(r["peak_rss_mb"] > 100 for r in report["rows"])  # a python process with torch and the world models
    assert set(report["ratio"]) == {"stream", "in-memory"}
    for n in (4, 8):  # the same batches, so the same trained weights
        assert len({r["weights_sha256"] for r in report["rows"] if r["per_prompt"] == n}) == 1
