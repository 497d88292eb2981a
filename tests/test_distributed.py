"""Data parallelism under torchrun (2 gloo processes on CPU): training on 2 ranks equals 1 rank at the same global
batch, a SIGKILL of every process + resume and a failure recovered by `--max-restarts` equal an uninterrupted run,
and the sharded stages write byte-identical shards on 1 and 2 ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import torchrun_train
from stitchvm import distributed
from stitchvm.__main__ import main as cli
from stitchvm.config import TrainConfig, from_dict, Params
from stitchvm.stages import stage
from stitchvm.stages import runtime
from stitchvm.stages.runtime import Paths
from stitchvm.value.training import Checkpointer, batch_share

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "torchrun_train.py"
TINY = {"prompts": {"train": 2, "val": 0, "test": 2},  # 8 samples in 3 shards: rank 0 takes shards 0 and 2
        "samples": {"source": "pipeline", "per_prompt": 2, "steps": 2, "batch_size": 2},
        "storage": {"shard_size": 3}}


# each launch costs 15-25 s on 2 cores (two processes importing torch, diffusers, transformers): the e2e lane
torchrun_lane = pytest.mark.e2e


def torchrun(*args: str, env: dict | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=2 ARGS` with one thread per process, gloo on the loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STITCHVM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1", "STITCHVM_PROGRESS": "0", **(env or {})}
    # torchrun's restarts reuse the store it shares with the workers; a fresh one per attempt (pytorch#135712)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def trained(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    return load_file(str(out / "weights.safetensors")), json.loads((out / "history.json").read_text())


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The tiny float64 run in this process, unlaunched: the 1-rank reference."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    try:
        torchrun_train.main(out, out / "ckpt")
    finally:
        torch.set_num_threads(threads)
    return trained(out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    run = torchrun(str(SCRIPT), str(out), str(out / "ckpt"))
    assert run.returncode == 0, run.stderr[-3000:]
    return trained(out)


@torchrun_lane
def test_two_ranks_equal_one_rank_at_the_same_global_batch(one_rank, two_ranks):
    (w1, h1), (w2, h2) = one_rank, two_ranks
    assert w1.keys() == w2.keys() and [r["step"] for r in h2] == list(range(1, 7))
    # the only difference is the order of a few float64 sums (each rank's mean over half the batch, then their mean);
    # measured against the largest weight, since the attention key biases get gradients that are zero up to rounding
    # (softmax ignores a shift common to every key) and Adam moves them by amounts of that size
    a, b = flat(w1), flat(w2)
    assert (a - b).abs().max() <= 1e-10 * a.abs().max()
    for r1, r2 in zip(h1, h2):
        for k in ("loss", "embed", "tokens", "rank", "grad_norm"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-10), (r1["step"], k)


@torchrun_lane
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, two_ranks):
    """After step 4 (checkpointed) rank 0 SIGKILLs torchrun's agent, rank 1 and itself; a new launch resumes."""
    killed = torchrun(str(SCRIPT), str(tmp_path), str(tmp_path / "ckpt"), env={"STITCHVM_KILL_AT_STEP": "4"})
    assert killed.returncode == -9 and not (tmp_path / "weights.safetensors").exists()
    assert json.loads((tmp_path / "ckpt" / "last" / "step.json").read_text()) == {"step": 4}
    resumed = torchrun(str(SCRIPT), str(tmp_path), str(tmp_path / "ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, history = trained(tmp_path)
    assert [r["step"] for r in history] == [5, 6]
    assert all(torch.equal(weights[k], two_ranks[0][k]) for k in weights)


@torchrun_lane
def test_a_failure_recovered_by_torchrun_equals_an_uninterrupted_run(tmp_path, two_ranks):
    """Rank 1 raises at step 3; torchrun restarts both ranks, which resume from the checkpoint of step 2."""
    run = torchrun(str(SCRIPT), str(tmp_path), str(tmp_path / "ckpt"), env={"STITCHVM_FAIL_AT_STEP": "3"}, restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "failed").exists() and "injected failure at step 3" in run.stderr
    weights, history = trained(tmp_path)
    assert [r["step"] for r in history] == [3, 4, 5, 6]
    assert all(torch.equal(weights[k], two_ranks[0][k]) for k in weights)


@torchrun_lane
def test_sharded_stages_write_the_same_bytes_on_one_and_two_ranks(tmp_path):
    def params_at(root: Path) -> Params:
        return from_dict(Params, {**TINY, "storage": {**TINY["storage"], "root": str(root)}})

    one = params_at(tmp_path / "one")
    # fresh models, as in each torchrun process: the reward's text cache keeps what earlier tests encoded
    runtime._backbone.cache_clear()
    runtime._reward.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        for name in ("prompts", "samples", "labels"):
            stage(name).run(one, Paths.from_params(one, track=False), progress=False)
    finally:
        torch.set_num_threads(threads)
    two = params_at(tmp_path / "two")
    stage("prompts").run(two, Paths.from_params(two, track=False))  # not data parallel: one process
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**TINY, "storage": {**TINY["storage"],
                                                                            "root": str(tmp_path / "two")}}))
    for name in ("samples", "labels"):
        run = torchrun("-m", "stitchvm", "--no-progress", name, "--params", str(tmp_path / "two.yaml"))
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout[run.stdout.index("{"):])  # printed once, by rank 0: every rank's shards
        assert summary["written"] == [0, 1, 2]
    files = shard_files(tmp_path / "one")
    assert len(files) == 12 and shard_files(tmp_path / "two") == files  # 3 shards + 3 index parts per stage
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def shard_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for d in ("samples", "labels") for p in (root / d).rglob("*") if p.is_file())


def test_a_batch_must_split_into_whole_groups_per_rank(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert batch_share(TrainConfig(batch_size=8, group_size=2)) == slice(4, 8)
    with pytest.raises(ValueError, match=r"batch_size 6 does not split into 2 processes of whole groups of "
                                         r"train.group_size 2: make it a multiple of 4"):
        batch_share(TrainConfig(batch_size=6, group_size=2))


def test_a_kill_between_the_checkpoint_renames_leaves_the_previous_checkpoint(tmp_path):
    class Tiny(torch.nn.Linear):
        def trainable_state_dict(self):
            return {k: v.detach().clone() for k, v in self.state_dict().items()}

    model = Tiny(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator().manual_seed(0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, model, opt, sched, gen)
    (tmp_path / "last").rename(tmp_path / "last.old")  # the instant between `last -> last.old` and `tmp -> last`
    assert ckpt.restore(model, opt, sched, gen) == 2
    ckpt.save(4, model, opt, sched, gen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and ckpt.restore(model, opt, sched, gen) == 4


def test_rank_share_and_gather_share_on_one_process():
    assert distributed.rank_share([3, 0, 5]) == [3, 0, 5]
    assert distributed.gather_share([3, 0, 5], [5, 3], {5: "damaged"}) == ([3, 5], {5: "damaged"})


def test_only_the_data_parallel_stages_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(["prompts"]) == 2
    assert "stitchvm prompts: runs in one process; under torchrun only samples, labels, train" in capsys.readouterr().err
