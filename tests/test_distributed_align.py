"""Data-parallel alignment (DiffusionNFT, DRaFT) under torchrun (2 gloo processes on CPU): 2 ranks equal 1 rank at the
same global batch, a SIGKILL of every process + resume and a failure recovered by `--max-restarts` equal an
uninterrupted run; in one process, a run stopped after a checkpoint and resumed equals an uninterrupted one, the η-SDE
noise of a rollout does not depend on how the batch is split; the `align` stage killed with SIGKILL mid-way and run
again writes the outputs of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import torchrun_align
from test_distributed import ROOT, torchrun, torchrun_lane
from stitchvm import distributed
from stitchvm.alignment.checkpoint import AlignCheckpoint
from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
from stitchvm.alignment.trainer import PolicyEvalSet, rollout, rollout_share, sample_generators, sigma_grid
from stitchvm.config import AlignConfig, from_dict, load_params
from stitchvm.diffusion.sampling import encode_conditioning
from stitchvm.models.lora import LoraPolicy
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths

from conftest import latents

SCRIPT = ROOT / "tests" / "torchrun_align.py"
PROMPTS = ["a red square", "a blue circle", "a green triangle"]
# the smallest run with a checkpoint to resume: 2 updates of 1 prompt × 2 rollouts, the η-SDE sampler,
# micro-batches of 1
TINY = dict(updates=2, prompts_per_update=1, group_size=2, steps=3, eta=1.0, lora_rank=2, lora_alpha=4.0, batch_size=1,
            nft=dict(train_times=1, lr=1e-2))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def finished(out: Path) -> tuple[dict[str, torch.Tensor], list[dict], list[int]]:
    """(every adapter's LoRA tensors, the whole run's history, the updates this launch ran) as the script wrote them."""
    return (load_file(str(out / "adapters.safetensors")), json.loads((out / "history.json").read_text()),
            json.loads((out / "ran.json").read_text()))


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- torchrun: 2 ranks ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The tiny float64 runs in this process, unlaunched: the 1-rank references, per method."""
    runs = {}

    def run(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"one-{method}")
            torchrun_align.main(method, out, out / "ckpt")
            runs[method] = finished(out)
        return runs[method]

    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    runs = {}

    def run(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"two-{method}")
            launch = torchrun(str(SCRIPT), method, str(out), str(out / "ckpt"))
            assert launch.returncode == 0, launch.stderr[-3000:]
            runs[method] = finished(out)
        return runs[method]

    return run


@torchrun_lane
@pytest.mark.parametrize("method", ["nft", "draft"])
def test_two_ranks_equal_one_rank_at_the_same_global_batch(one_rank, two_ranks, method):
    (w1, h1, _), (w2, h2, ran) = one_rank(method), two_ranks(method)
    assert w1.keys() == w2.keys() and ran == [0, 1, 2] and [r["step"] for r in h2] == [0, 1, 2]
    # the only differences are the order of a few float64 sums (each rank's mean over half the batch, then their
    # mean; the text encoder on 2 prompts instead of 4): measured against the largest LoRA weight (2e-13 measured)
    a, b = flat(w1), flat(w2)
    assert (a - b).abs().max() <= 1e-10 * a.abs().max()
    objective = "policy_loss" if method == "nft" else "objective"
    for r1, r2 in zip(h1, h2):
        assert r1.keys() == r2.keys() and r1.get("tau") == r2.get("tau")
        for k in ("loss", objective, "grad_norm", "reward_mean", "reward_std", "eval_reward"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-10, abs=1e-12), (r1["step"], k)


@torchrun_lane
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, two_ranks):
    """After update 1 (checkpointed) rank 0 SIGKILLs torchrun's agent, rank 1 and itself; a new launch resumes."""
    ckpt = tmp_path / "ckpt"
    killed = torchrun(str(SCRIPT), "nft", str(tmp_path), str(ckpt), env={"STITCHVM_KILL_AT_STEP": "1"})
    assert killed.returncode == -9 and not (tmp_path / "adapters.safetensors").exists()
    assert json.loads((ckpt / "last" / "cursor.json").read_text()) == {"update": 1, "samples": 4}
    resumed = torchrun(str(SCRIPT), "nft", str(tmp_path), str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, history, ran = finished(tmp_path)
    reference, reference_history, _ = two_ranks("nft")
    assert ran == [2] and identical(weights, reference) and history == reference_history


@torchrun_lane
def test_a_failure_recovered_by_torchrun_equals_an_uninterrupted_run(tmp_path, two_ranks):
    """Rank 1 raises after update 1 (checkpointed); torchrun restarts both ranks, which resume from it."""
    run = torchrun(str(SCRIPT), "nft", str(tmp_path), str(tmp_path / "ckpt"), env={"STITCHVM_FAIL_AT_STEP": "1"},
                   restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "failed").exists() and "injected failure after update 1" in run.stderr
    weights, history, ran = finished(tmp_path)
    reference, reference_history, _ = two_ranks("nft")
    assert ran == [2] and identical(weights, reference) and history == reference_history


# ---- one process ------------------------------------------------------------------------------------------------
def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_result(backbone, reward, tmp_path):
    """NFT (trained, old and EMA adapters, AdamW, the generator, the evaluations) stopped after update 1 and run again
    from its checkpoint ends bit for bit where the uninterrupted run does."""
    cfg = from_dict(AlignConfig, {**TINY, "method": "nft", "eval_every": 2})

    def run(ckpt: Path, stop_at: int = 0):
        policy = LoraPolicy(backbone, 2, 4.0, adapters=NFT_ADAPTERS)
        evalset = PolicyEvalSet(tuple(PROMPTS[:1]), (0,), 2)

        def stop(row):
            if row["step"] == stop_at:
                raise KeyboardInterrupt(f"stopped after update {stop_at}")

        history = train_nft(policy, reward, PROMPTS, cfg, seed=3, evalset=evalset, callback=stop if stop_at else None,
                            checkpoint_dir=ckpt)
        tensors = {f"{a}/{k}": t.detach().clone() for a in NFT_ADAPTERS for k, t in policy.lora_tensors(a).items()}
        return tensors, [{k: v for k, v in r.items() if not k.endswith("_s")} for r in history], evalset.results

    whole, whole_history, whole_evals = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", stop_at=1)
    assert json.loads((tmp_path / "stopped" / "last" / "cursor.json").read_text()) == {"update": 1, "samples": 2}
    resumed, resumed_history, resumed_evals = run(tmp_path / "stopped")
    assert identical(resumed, whole) and resumed_history == whole_history
    assert [r["step"] for r in whole_history] == [0, 1, 2] and "eval_reward" in whole_history[0]
    # the evaluations before the stop come from the checkpoint: the stage's before / after grid reads them
    assert len(resumed_evals) == len(whole_evals) == 2  # the base policy (restored), update 2
    for (ra, za), (rb, zb) in zip(resumed_evals, whole_evals):
        assert torch.equal(ra, rb) and torch.equal(za, zb)
    with pytest.raises(ValueError, match=r"written with 2 rollouts per update, this run makes 4: delete .* to start"):
        AlignCheckpoint(tmp_path / "stopped").restore(LoraPolicy(backbone, 2, 4.0, adapters=NFT_ADAPTERS),
                                                      torch.optim.AdamW([torch.zeros(1, requires_grad=True)]),
                                                      torch.Generator(), None, 4)


def test_a_kill_between_the_checkpoint_renames_leaves_the_previous_checkpoint(backbone, tmp_path):
    policy = LoraPolicy(backbone, 2, 4.0)
    opt = torch.optim.AdamW(policy.parameters())
    ckpt = AlignCheckpoint(tmp_path)
    ckpt.save(1, 4, policy, opt, torch.Generator().manual_seed(0), [{"step": 0}, {"step": 1}], None, 0.5)
    (tmp_path / "last").rename(tmp_path / "last.old")  # the instant between `last -> last.old` and `tmp -> last`
    assert ckpt.restore(policy, opt, torch.Generator(), None, 4).update == 1
    ckpt.save(2, 8, policy, opt, torch.Generator().manual_seed(0), [{"step": 0}], None, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ckpt.restore(policy, opt, torch.Generator(), None, 4).update == 2


def test_the_sde_noise_of_a_rollout_does_not_depend_on_the_split(backbone, gen):
    """Per-sample generators: 4 rollouts in one batch equal the same rollouts in shares of 2 (two ranks' halves)."""
    sigmas = sigma_grid(backbone, 3)
    z = latents(backbone, 4, gen)
    prompts = [PROMPTS[k % 3] for k in range(4)]
    with torch.no_grad():
        whole = rollout(backbone, encode_conditioning(backbone, prompts, 1.0), z, sigmas, 3, 1.0,
                        sample_generators(7, 2, range(4)))
        halves = torch.cat([rollout(backbone, encode_conditioning(backbone, prompts[s], 1.0), z[s], sigmas, 3, 1.0,
                                    sample_generators(7, 2, range(4)[s])) for s in (slice(0, 2), slice(2, 4))])
        deterministic = rollout(backbone, encode_conditioning(backbone, prompts, 1.0), z, sigmas, 3, 0.0)
    assert torch.allclose(whole, halves, rtol=0, atol=1e-5)  # float32 text encoders batched differently
    assert (whole - deterministic).abs().max() > 1e-2  # the noise is there


def test_an_update_must_split_into_equal_shares(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert rollout_share(8) == slice(4, 8)
    with pytest.raises(ValueError, match=r"align.prompts_per_update × align.group_size = 6 rollouts per update do not "
                                         r"split into 4 processes: make it a multiple of 4"):
        monkeypatch.setattr(distributed, "world_size", lambda: 4)
        rollout_share(6)


# ---- the stage, killed ------------------------------------------------------------------------------------------
STAGE = {"prompts": {"train": 2, "val": 0, "test": 1},
         "align": {**TINY, "method": "nft", "updates": 4, "eval_prompts": 1, "eval_seeds": [0], "eval_every": 2}}
# what DVC hashes: every output of the stage but the run record
OUTPUTS = ("data/adapter/adapter_config.json", "data/adapter/adapter_model.safetensors",
           "data/adapter/stitchvm_adapter.json", "data/align/summary.json", "reports/align.json",
           "reports/align_curve.png", "reports/align_grid.png")


def align_cli(root: Path) -> subprocess.Popen:
    """`python -m stitchvm align` in `root` (its data, reports, checkpoints and MLflow store)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STITCHVM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "STITCHVM_PROGRESS": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "stitchvm", "align", "--params", str(root / "params.yaml")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def prepared(root: Path) -> Path:
    """A project folder holding params.yaml and the `prompts` stage's output (run here, its reports under `root`)."""
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({**STAGE, "storage": {"root": str(root / "data")}}))
    params = load_params(root / "params.yaml")
    stage("prompts").run(params, Paths.from_params(params, reports=root / "reports", checkpoints=root / "checkpoints",
                                                   track=False))
    return root


@torchrun_lane
def test_the_align_stage_killed_mid_way_and_run_again_writes_the_uninterrupted_outputs(tmp_path):
    whole = prepared(tmp_path / "whole")
    run = align_cli(whole)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert not (whole / "checkpoints").exists() or not any((whole / "checkpoints").iterdir())

    killed = prepared(tmp_path / "killed")
    run = align_cli(killed)
    deadline = time.monotonic() + 300
    cursors = lambda: list((killed / "checkpoints").glob("align-*/last/cursor.json"))
    while not cursors() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, run.communicate()[1][-3000:]
    os.kill(run.pid, signal.SIGKILL)  # mid-way: after the first update's checkpoint, before the last update
    run.communicate()
    assert run.returncode == -9
    [folder] = (killed / "checkpoints").glob("align-*")
    update = json.loads((AlignCheckpoint(folder).latest() / "cursor.json").read_text())["update"]
    assert 1 <= update < STAGE["align"]["updates"]
    assert not any((killed / f).exists() for f in OUTPUTS)  # nothing half-written under a final name
    run = align_cli(killed)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert f"resuming the alignment run after update {update} from" in err
    for f in OUTPUTS:
        assert (killed / f).read_bytes() == (whole / f).read_bytes(), f
    assert not any((killed / "checkpoints").iterdir())  # a finished run leaves no checkpoint
