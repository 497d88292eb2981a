"""Issue 17, kill and resume: a stage killed with SIGKILL at a random point leaves no partial file under a final name,
and its re-run finishes with outputs byte-identical to an uninterrupted run's, writing only what was missing.

The e2e tests run the real command lines (`python -m stitchvm <stage>`, `dagster asset materialize`, `dvc repro`) as
subprocesses on small params, kill the process group once the run is under way (a first shard, checkpoint or
training line) plus a seeded random delay (STITCHVM_KILL_SEED picks another), re-run and compare every output file's
sha256 with an uninterrupted run's. `die_at` kills at the worst instant instead: inside a write, just before the rename
that publishes a file. The fast tests check the pieces in-process (stale temporaries, pruning, installs, history).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from stitchvm.config import Params, from_dict
from stitchvm.data.storage import (TMP_MARK, index_parts, open_root, prune_shard_set, read_shards, shard_status,
                                   write_shard)
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SEED = int(os.environ.get("STITCHVM_KILL_SEED", "17"))
# 4 prompts x 6 samples in shards of 2 on the shipped world: 12 shards of pipeline samples, about 0.6 s each on one
# thread (labels: about 0.1 s each)
SAMPLES = {"seed": 0, "backbone": {"source": "world:sd3"}, "reward": {"source": "world:clip"},
           "prompts": {"train": 2, "val": 0, "test": 2},
           "samples": {"source": "pipeline", "per_prompt": 6, "steps": 8, "batch_size": 2},
           "storage": {"shard_size": 2}}
N_SHARDS = 12
# the value pipeline up to `train` on smooth samples (tests/test_stages.py's sizes), then 60 steps checkpointed every 10
TRAIN = {"prompts": {"train": 2, "val": 0, "test": 2}, "samples": {"source": "smooth", "per_prompt": 6},
         "storage": {"shard_size": 5}, "noisy": {"probe_size": 8, "sigmas": [0.25, 0.5]},
         "search": {"j_max": 2, "batch_size": 8},
         "train": {"steps": 100, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 10},
         "mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}  # relative: each run's own store, in its cwd
EVALUATOR = {"world": {"evaluator": {"steps": 60, "batch_size": 32}, "report": {"scenes": 32}},
             "mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}
# run as `python -c DIE_AT FN N args...`: the stitchvm CLI, SIGKILLed by itself at the N-th call of os.FN (before it
# happens): a kill at the instant a completely written temporary file is about to be renamed into place
DIE_AT = """
import os, runpy, signal, sys
fn, n = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, fn), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, fn, dying)
sys.argv = ["stitchvm", *sys.argv[3:]]
runpy.run_module("stitchvm", run_name="__main__")
"""


# ---- running and killing --------------------------------------------------------------------------------------------
def env(**extra: str) -> dict:
    """One torch thread per process (outputs depend on the thread count in their last bits), telemetry off."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "STITCHVM_"))}
    out.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", STITCHVM_THREADS="1", PYTHONUNBUFFERED="1",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return out


def write_params(folder: Path, data: dict, root: str = "data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({**data, "storage": {**data.get("storage", {}), "root": root}}))
    return folder / "params.yaml"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stitchvm", "--params", "params.yaml", *args]


def run_to_end(cmd: list[str], cwd: Path, environ: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def start(cmd: list[str], cwd: Path, environ: dict, log: Path) -> subprocess.Popen:
    """Start `cmd` in its own process group (SIGKILL reaches its children too: Dagster's step processes, DVC's
    stage command), stdout and stderr to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def kill_at_random_point(proc: subprocess.Popen, under_way: Callable[[], bool], log: Path, max_delay: float,
                         timeout: float = 300) -> float:
    """Wait until `under_way()` (the run is past its imports and has done some work), then a random delay in
    [0, max_delay) seeded by STITCHVM_KILL_SEED, then SIGKILL the process group; returns the delay. Fails when the run
    ends before it is killed: the kill must land mid-way."""
    deadline = time.monotonic() + timeout
    while not under_way():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before it got under way:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not under way after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    delay = random.Random(SEED).uniform(0, max_delay)
    time.sleep(delay)
    assert proc.poll() is None, (f"finished {delay:.2f} s after getting under way, before the kill (seed {SEED}): "
                                 f"make the run longer\n{log.read_text()[-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return delay


def die_at(fn: str, n: int, *args: str) -> list[str]:
    """The stitchvm CLI with `args`, SIGKILLed by itself at the n-th call of os.<fn>."""
    return [sys.executable, "-c", DIE_AT, fn, str(n), "--params", "params.yaml", *args]


# ---- what a folder holds ----------------------------------------------------------------------------------------------
def digests(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (inode, mtime_ns)}: a file rewritten in place or replaced by a rename changes one of them."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_partial(folder: Path) -> list[str]:
    """Every file under a final name (not `*.tmp-*`) is complete: it parses; every index part's shard matches its
    sha256. Returns the temporaries found (what a kill mid-write may leave, never under a final name)."""
    temporaries = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if TMP_MARK in p.name:
            temporaries.append(str(p.relative_to(folder)))
        elif p.suffix == ".safetensors":
            load_safetensors(p.read_bytes())
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix in (".json", ".jsonl"):
            [json.loads(line) for line in p.read_text().splitlines() if line] if p.suffix == ".jsonl" \
                else json.loads(p.read_text())
        elif p.suffix == ".png":
            assert p.read_bytes()[-8:] == b"IEND\xaeB`\x82", f"{p} is cut short"
    for name in ("samples", "labels"):
        if (folder / name / "index").is_dir():
            storage = open_root(str(folder))
            for shard in index_parts(storage, name):
                assert shard_status(storage, name, shard) is None, f"{name} shard {shard} is listed but damaged"
    return temporaries


def complete_shards(data: Path, name: str) -> list[int]:
    storage = open_root(str(data))
    return [s for s in index_parts(storage, name) if shard_status(storage, name, s) is None]


def summary_of(done: subprocess.CompletedProcess) -> dict:
    """The JSON summary the CLI prints last on stdout."""
    return json.loads(done.stdout[done.stdout.index("{"):])


# ---- the e2e tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples_reference(tmp_path_factory) -> Path:
    """`prompts` + an uninterrupted `samples` run on SAMPLES through the CLI: the data folder every killed run of
    `samples` must end up equal to."""
    ref = tmp_path_factory.mktemp("samples-ref")
    write_params(ref, SAMPLES)
    run_to_end(cli("--no-progress", "prompts"), ref, env())
    run_to_end(cli("--no-progress", "samples"), ref, env())
    assert len(complete_shards(ref / "data", "samples")) == N_SHARDS
    return ref / "data"


def prompts_only(folder: Path, reference: Path) -> None:
    """A data folder holding the reference's prompts.parquet (the `prompts` stage's output) and nothing else."""
    (folder / "data").mkdir(parents=True)
    shutil.copy2(reference / "prompts.parquet", folder / "data" / "prompts.parquet")


@pytest.mark.e2e
def test_samples_killed_mid_way_resumes_to_the_uninterrupted_output(samples_reference, tmp_path):
    write_params(tmp_path, SAMPLES)
    prompts_only(tmp_path, samples_reference)
    data, log = tmp_path / "data", tmp_path / "killed.log"
    proc = start(cli("--no-progress", "samples"), tmp_path, env(), log)
    kill_at_random_point(proc, lambda: (data / "samples" / "index" / "shard-00000.parquet").exists(), log, 2.0)
    assert_nothing_partial(data)
    done = complete_shards(data, "samples")
    assert 0 < len(done) < N_SHARDS, f"killed after {len(done)} of {N_SHARDS} shards: not mid-way (seed {SEED})"
    before = stamps(data / "samples")
    rerun = summary_of(run_to_end(cli("--no-progress", "samples"), tmp_path, env()))
    assert rerun["written"] == [s for s in range(N_SHARDS) if s not in done] and rerun["rewritten"] == {}
    after = stamps(data / "samples")
    for shard in done:  # the complete shards were kept, not written again
        for rel in (f"shard-{shard:05d}.safetensors", f"index/shard-{shard:05d}.parquet"):
            assert after[rel] == before[rel], rel
    assert digests(data / "samples") == digests(samples_reference / "samples")


@pytest.mark.e2e
@pytest.mark.parametrize("fn, n", [("replace", 5), ("replace", 6)], ids=["before-shard-rename", "before-part-rename"])
def test_samples_killed_inside_a_write_leaves_only_a_temporary(samples_reference, tmp_path, fn, n):
    """Killed at the rename of the 3rd shard (5th os.replace: shard, part, shard, part, shard) or of its index part:
    the complete file exists only under its temporary name, the shard reads as not written (or its part is
    missing), and the re-run writes it, removes the temporary and ends equal to the uninterrupted run."""
    write_params(tmp_path, SAMPLES)
    prompts_only(tmp_path, samples_reference)
    data = tmp_path / "data"
    killed = subprocess.run(die_at(fn, n, "--no-progress", "samples"), cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    temporaries = assert_nothing_partial(data)
    wanted = "samples/shard-00002.safetensors" if n == 5 else "samples/index/shard-00002.parquet"
    assert [t.split(TMP_MARK)[0] for t in temporaries] == [wanted]
    assert complete_shards(data, "samples") == [0, 1]
    rerun = summary_of(run_to_end(cli("--no-progress", "samples"), tmp_path, env()))
    assert rerun["written"] == list(range(2, N_SHARDS))
    assert digests(data / "samples") == digests(samples_reference / "samples")  # no temporary left over either


@pytest.fixture(scope="module")
def labels_reference(samples_reference, tmp_path_factory) -> Path:
    """An uninterrupted `labels` run on the reference samples."""
    ref = tmp_path_factory.mktemp("labels-ref")
    write_params(ref, SAMPLES)
    shutil.copytree(samples_reference, ref / "data", ignore=shutil.ignore_patterns("labels"))
    run_to_end(cli("--no-progress", "labels"), ref, env())
    return ref / "data"


@pytest.mark.e2e
def test_labels_killed_mid_way_resumes_to_the_uninterrupted_output(labels_reference, tmp_path):
    """Killed at a random point (a shard takes about 0.1 s: the delay is short), then just before publishing the
    4th shard's index part (8th os.replace) of a fresh run: each re-run writes what is missing and ends equal."""
    write_params(tmp_path, SAMPLES)
    shutil.copytree(labels_reference, tmp_path / "data", ignore=shutil.ignore_patterns("labels"))
    data, log = tmp_path / "data", tmp_path / "killed.log"
    proc = start(cli("--no-progress", "labels"), tmp_path, env(), log)
    kill_at_random_point(proc, lambda: (data / "labels" / "index" / "shard-00000.parquet").exists(), log, 0.3)
    assert_nothing_partial(data)
    done = complete_shards(data, "labels")
    assert 0 < len(done) < N_SHARDS, f"killed after {len(done)} of {N_SHARDS} shards: not mid-way (seed {SEED})"
    rerun = summary_of(run_to_end(cli("--no-progress", "labels"), tmp_path, env()))
    assert rerun["written"] == [s for s in range(N_SHARDS) if s not in done]
    assert digests(data / "labels") == digests(labels_reference / "labels")

    shutil.rmtree(data / "labels")
    killed = subprocess.run(die_at("replace", 8, "--no-progress", "labels"), cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [t.split(TMP_MARK)[0] for t in assert_nothing_partial(data)] == ["labels/index/shard-00003.parquet"]
    assert complete_shards(data, "labels") == [0, 1, 2]  # shard 3's safetensors is there, unlisted: not written yet
    rerun = summary_of(run_to_end(cli("--no-progress", "labels"), tmp_path, env()))
    assert rerun["written"] == list(range(3, N_SHARDS))
    assert digests(data / "labels") == digests(labels_reference / "labels")


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory) -> Path:
    """A data folder with everything `train` reads (prompts .. search on smooth samples), made in-process."""
    base = tmp_path_factory.mktemp("train-inputs")
    params = from_dict(Params, {**TRAIN, "storage": {**TRAIN["storage"], "root": str(base / "data")}})
    paths = Paths.from_params(params, reports=base / "reports", checkpoints=base / "ckpt", track=False)
    for name in ("prompts", "samples", "labels", "noisy", "search"):
        stage(name).run(params, paths, progress=False)
    return base / "data"


def train_folder(base: Path, inputs: Path) -> Path:
    write_params(base, TRAIN)
    shutil.copytree(inputs, base / "data")
    return base


@pytest.mark.e2e
def test_train_killed_mid_way_resumes_from_its_checkpoint_to_the_uninterrupted_output(train_inputs, tmp_path):
    """The model, the curve and the summary (first loss included: the history before the checkpoint is kept with
    it) equal an uninterrupted run's; the checkpoint is gone after the run."""
    ref, killed = train_folder(tmp_path / "ref", train_inputs), train_folder(tmp_path / "killed", train_inputs)
    log = killed / "killed.log"
    reference = start(cli("--no-progress", "train"), ref, env(), ref / "ref.log")  # side by side with the killed run
    proc = start(cli("--no-progress", "train"), killed, env(), log)
    kill_at_random_point(proc, lambda: any((killed / "checkpoints").glob("train-*/last/step.json")), log, 1.5)
    assert reference.wait(timeout=600) == 0, (ref / "ref.log").read_text()[-3000:]
    (ckpt,) = (killed / "checkpoints").glob("train-*")
    step = json.loads(((ckpt / "last") if (ckpt / "last").is_dir() else (ckpt / "last.old")).joinpath(
        "step.json").read_text())["step"]
    assert 10 <= step < 100
    assert_nothing_partial(killed / "data")
    run_to_end(cli("--no-progress", "train"), killed, env())
    assert not ckpt.exists()
    for out in ("value_model", "train"):
        assert digests(killed / "data" / out) == digests(ref / "data" / out), out


@pytest.mark.e2e
def test_world_stage_killed_mid_way_reruns_to_the_uninterrupted_output(tmp_path):
    """world_evaluator (the cheapest world stage: a small CNN on rendered scenes) into a temporary STITCHVM_WORLD:
    killed during training, and killed between the install's renames, the re-run installs the same weights and
    the same report (but its wall time), and leaves no staging folder behind."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for base in (ref, killed):
        write_params(base, EVALUATOR)
    reference = start(cli("--no-progress", "world_evaluator"), ref, env(STITCHVM_WORLD=str(ref / "world")),
                      ref / "ref.log")
    log = killed / "killed.log"
    world = env(STITCHVM_WORLD=str(killed / "world"), STITCHVM_PROGRESS="1")  # tqdm's bar: the training has started
    proc = start(cli("world_evaluator"), killed, world, log)
    kill_at_random_point(proc, lambda: "world evaluator" in log.read_text(), log, 2.0)
    assert reference.wait(timeout=600) == 0, (ref / "ref.log").read_text()[-3000:]
    assert not (killed / "world" / "evaluator.safetensors").exists()
    # the second run dies inside install, at its rename of the new weights into place (first os.replace)
    dying = subprocess.run(die_at("replace", 1, "--no-progress", "world_evaluator"), cwd=killed, env=world,
                           capture_output=True, text=True, timeout=600)
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-3000:]
    assert [p.name.startswith(".evaluator.safetensors-") for p in (killed / "world").iterdir()] == [True]
    run_to_end(cli("--no-progress", "world_evaluator"), killed, world)
    assert digests(killed / "world") == digests(ref / "world")  # the same weights, no staging folder left
    assert (killed / "reports" / "world_evaluator_curve.png").read_bytes() == \
        (ref / "reports" / "world_evaluator_curve.png").read_bytes()
    reports = [json.loads((base / "reports" / "world_evaluator.json").read_text()) for base in (ref, killed)]
    for report in reports:
        report.pop("seconds"), report.pop("curve"), report.pop("run_id", None)
    assert reports[0] == reports[1]


@pytest.mark.e2e
def test_dagster_run_killed_mid_way_resumes_to_the_uninterrupted_output(samples_reference, tmp_path):
    """`dagster asset materialize -m pipelines --select samples`, its process group (the run, the executor's
    forkserver and step process) SIGKILLed mid-way; the same command again finishes the asset."""
    params = write_params(tmp_path, SAMPLES, root=str(tmp_path / "data"))
    prompts_only(tmp_path, samples_reference)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster_env = env(STITCHVM_PARAMS=str(params), STITCHVM_REPORTS=str(tmp_path / "reports"),
                      STITCHVM_CHECKPOINTS=str(tmp_path / "checkpoints"), DAGSTER_HOME=str(home))
    cmd = [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", "pipelines", "--select", "samples"]
    data, log = tmp_path / "data", tmp_path / "killed.log"
    proc = start(cmd, tmp_path, dagster_env, log)
    kill_at_random_point(proc, lambda: (data / "samples" / "index" / "shard-00000.parquet").exists(), log, 2.0)
    time.sleep(1.0)  # nothing of the killed run goes on writing
    assert_nothing_partial(data)
    done = complete_shards(data, "samples")
    assert 0 < len(done) < N_SHARDS, f"killed after {len(done)} of {N_SHARDS} shards: not mid-way (seed {SEED})"
    frozen = stamps(data / "samples")
    time.sleep(1.0)
    assert stamps(data / "samples") == frozen, "a process of the killed run is still writing"
    again = run_to_end(cmd, tmp_path, dagster_env)
    assert "RUN_SUCCESS" in again.stderr
    assert digests(data / "samples") == digests(samples_reference / "samples")


def dvc_project(base: Path, reference: Path) -> Path:
    """A git + DVC project holding the code and the repository's own `prompts` and `samples` stages of dvc.yaml (the
    other stages' outs are not needed), with `prompts` already reproduced from the reference's prompts."""
    shutil.copytree(ROOT / "stitchvm", base / "stitchvm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "prompts", base / "prompts")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (base / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("prompts", "samples")}},
                                                  sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update({k: {**params[k], **v} if isinstance(v, dict) else v for k, v in SAMPLES.items()})
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_env = env(DVC_SITE_CACHE_DIR=str(base.parent / "dvc-home" / "site"),
                  DVC_GLOBAL_CONFIG_DIR=str(base.parent / "dvc-home" / "global"),
                  DVC_SYSTEM_CONFIG_DIR=str(base.parent / "dvc-home" / "system"))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@stitchvm.invalid"],
                ["git", "config", "user.name", "t"], [str(VENV_BIN / "dvc"), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"],
                [str(VENV_BIN / "dvc"), "repro", "prompts"]):
        run_to_end(cmd, base, dvc_env)
    assert (base / "data" / "prompts.parquet").read_bytes() == (reference / "prompts.parquet").read_bytes()
    return base


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("git") is None or not (VENV_BIN / "dvc").is_file(), reason="needs git and dvc")
def test_dvc_repro_killed_mid_way_resumes_the_sharded_stage(samples_reference, tmp_path):
    """DVC deletes a stage's outs before running it unless they are `persist: true` (dvc.yaml's samples and labels
    are): the re-run of a killed `dvc repro samples` keeps the complete shards (same inode and mtime) and writes the
    rest; the out equals the uninterrupted run's, and DVC records it (`dvc status` clean)."""
    base = dvc_project(tmp_path / "project", samples_reference)
    dvc_env = env(DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-home" / "site"),
                  DVC_GLOBAL_CONFIG_DIR=str(tmp_path / "dvc-home" / "global"),
                  DVC_SYSTEM_CONFIG_DIR=str(tmp_path / "dvc-home" / "system"))
    data, log = base / "data", tmp_path / "killed.log"
    proc = start([str(VENV_BIN / "dvc"), "repro", "samples"], base, dvc_env, log)
    kill_at_random_point(proc, lambda: (data / "samples" / "index" / "shard-00000.parquet").exists(), log, 2.0)
    assert_nothing_partial(data)
    done = complete_shards(data, "samples")
    assert 0 < len(done) < N_SHARDS, f"killed after {len(done)} of {N_SHARDS} shards: not mid-way (seed {SEED})"
    before = stamps(data / "samples")
    rerun = run_to_end([str(VENV_BIN / "dvc"), "repro", "samples"], base, dvc_env)
    assert "Running stage 'samples'" in rerun.stdout
    after = stamps(data / "samples")
    for shard in done:
        for rel in (f"shard-{shard:05d}.safetensors", f"index/shard-{shard:05d}.parquet"):
            assert after[rel] == before[rel], f"{rel} was written again"
    assert digests(data / "samples") == digests(samples_reference / "samples")
    status = run_to_end([str(VENV_BIN / "dvc"), "status"], base, dvc_env)
    assert "up to date" in status.stdout, status.stdout


# ---- the pieces, in-process (fast) ------------------------------------------------------------------------------------
def test_a_write_removes_the_temporary_a_killed_writer_left(tmp_path):
    storage = open_root(str(tmp_path))
    storage.write_bytes_atomic("a/b.bin", b"old")
    (tmp_path / "a" / f"b.bin{TMP_MARK}dead").write_bytes(b"half")  # a writer killed before its rename
    (tmp_path / "a" / f"c.bin{TMP_MARK}dead").write_bytes(b"other")  # another file's: not this write's to remove
    storage.write_bytes_atomic("a/b.bin", b"new")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", f"c.bin{TMP_MARK}dead"]
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"new"


def test_prune_keeps_exactly_the_set(tmp_path):
    """Shards of a longer earlier run and killed writers' temporaries go; the set reads back unchanged."""
    storage = open_root(str(tmp_path))
    for shard in range(4):
        write_shard(storage, "s", shard, {"x": torch.full((2, 3), float(shard))}, {"id": [2 * shard, 2 * shard + 1]},
                    2 * shard)
    want = read_shards(storage, "s", progress=False, expected_shards=3)
    (tmp_path / "s" / f"shard-00001.safetensors{TMP_MARK}dead").write_bytes(b"half")
    (tmp_path / "s" / "index" / f"shard-00002.parquet{TMP_MARK}dead").write_bytes(b"half")
    removed = prune_shard_set(storage, "s", 3)
    assert sorted(Path(p).name for p in removed) == sorted([f"shard-00001.safetensors{TMP_MARK}dead",
                                                            f"shard-00002.parquet{TMP_MARK}dead",
                                                            "shard-00003.safetensors", "shard-00003.parquet"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [f"s/shard-{k:05d}.safetensors" for k in range(3)] + [f"s/index/shard-{k:05d}.parquet" for k in range(3)])
    got = read_shards(storage, "s", progress=False)
    assert torch.equal(got[0]["x"], want[0]["x"]) and got[1].equals(want[1])


def test_install_restores_a_part_a_killed_install_moved_aside(tmp_path, monkeypatch):
    """A kill between install's two renames leaves the previous part only in the staging folder: the next install
    puts it back before anything else, and an install that completes leaves no staging folder."""
    from stitchvm.stages.bootstrap import PREVIOUS, install, restore_killed_installs

    monkeypatch.setenv("STITCHVM_WORLD", str(tmp_path))
    with install("vae") as path:
        path.mkdir()
        (path / "w.bin").write_bytes(b"v1")
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]
    staging = tmp_path / ".vae-killed"  # as a kill right after `dest.rename(tmp / PREVIOUS)` leaves it
    staging.mkdir()
    (tmp_path / "vae").rename(staging / PREVIOUS)
    (staging / "vae").mkdir()
    restore_killed_installs(tmp_path, "vae")
    assert [p.name for p in tmp_path.iterdir()] == ["vae"] and (tmp_path / "vae" / "w.bin").read_bytes() == b"v1"
    with install("vae") as path:
        path.mkdir()
        (path / "w.bin").write_bytes(b"v2")
    assert [p.name for p in tmp_path.iterdir()] == ["vae"] and (tmp_path / "vae" / "w.bin").read_bytes() == b"v2"


def test_resumed_history_keeps_the_rows_its_checkpoint_holds(tmp_path):
    """Rows after the checkpoint (and a last line cut short) are dropped; a checkpoint missing one of its own rows
    (killed between its save and the row's append) is removed, so the run starts afresh instead of with a hole."""
    from stitchvm.stages.train import HISTORY, history_log, resumed_history

    ckpt = tmp_path / "train-x"
    append = history_log(ckpt)
    for step in range(1, 8):
        append({"step": step, "loss": 1.0 / step})
    with open(ckpt / HISTORY, "a") as f:
        f.write('{"step": 8, "lo')  # cut short by the kill
    (ckpt / "last").mkdir()
    (ckpt / "last" / "step.json").write_text(json.dumps({"step": 5}))
    rows = resumed_history(ckpt)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] == 1.0 / 3
    assert [json.loads(line)["step"] for line in (ckpt / HISTORY).read_text().splitlines()] == [1, 2, 3, 4, 5]
    (ckpt / "last" / "step.json").write_text(json.dumps({"step": 6}))  # saved, but row 6 never appended
    assert resumed_history(ckpt) == [] and not ckpt.exists()
    assert resumed_history(ckpt) == []  # no checkpoint: nothing to resume
