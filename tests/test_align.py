"""Training-time alignment: DiffusionNFT and DRaFT (terminal rewards and StitchVM), LoRA adapters, the `align` stage."""
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from stitchvm.alignment.trainer import PolicyEvalSet, evaluate_policy, scaled_window
from stitchvm.config import AlignConfig, ConfigError, Params, from_dict
from stitchvm.alignment.draft import train_draft
from stitchvm.models.lora import TRAINED, LoraPolicy
from stitchvm.alignment.nft import (NFT_ADAPTERS, bridge, ema_decay, nft_loss, old_decay, optimality, train_nft, x0_target)
from stitchvm.stages import align as align_stage
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths
from stitchvm.value.model import StitchedValueModel

from conftest import latents

PROMPTS = ["a red square", "a blue circle", "a green triangle"]
# the smallest run that exercises every code path: 1 prompt group of 2, 3 sampler steps, one regression time
TINY = dict(updates=1, prompts_per_update=1, group_size=2, steps=3, lora_rank=2, lora_alpha=4.0, batch_size=8,
            nft=dict(train_times=1, lr=1e-2), draft=dict(lr=1e-2, k=1))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def value_model(backbone, reward):
    return StitchedValueModel(backbone, reward, 2, 2).eval()


def cfg(method, nft=(), draft=(), **kw):
    """TINY with `kw` replacing shared keys and `nft` / `draft` merged into the method sections."""
    return from_dict(AlignConfig, {**TINY, "method": method, **kw, "nft": {**TINY["nft"], **dict(nft)},
                                   "draft": {**TINY["draft"], **dict(draft)}})


# ---- formulas --------------------------------------------------------------------------------------------------
def test_nft_loss_equals_a_float64_evaluation_of_its_formula():
    g = torch.Generator().manual_seed(0)
    b, shape = 3, (3, 2, 4, 4)
    v, v_old, v_ref, z_t, x0 = (torch.randn(shape, generator=g) for _ in range(5))
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([1.0, 0.25, 0.0])
    beta, kl_w, c = 0.7, 1e-2, 5.0
    loss, _ = nft_loss(v, v_old, v_ref, z_t, t, x0, r, beta, kl_w, c)

    n = lambda x: x.double().numpy()  # independent: numpy float64, per sample, explicit loops
    total, kl = 0.0, 0.0
    for k in range(b):
        vp = beta * n(v)[k] + (1 - beta) * n(v_old)[k]
        vn = (1 + beta) * n(v_old)[k] - beta * n(v)[k]
        terms = []
        for vv in (vp, vn):
            err = n(z_t)[k] - float(t[k]) * vv - n(x0)[k]
            terms.append(np.mean(err ** 2) / max(np.mean(np.abs(err)), 1e-5))
        total += (float(r[k]) * terms[0] + (1 - float(r[k])) * terms[1]) / beta
        kl += np.mean((n(v)[k] - n(v_ref)[k]) ** 2)
    expected = c * total / b + kl_w * kl / b
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the normaliser is a stop-gradient: the gradient is the float64 one of the formula with fixed normalisers
    vd = v.double().requires_grad_(True)
    loss64, _ = nft_loss(vd, v_old.double(), v_ref.double(), z_t.double(), t.double(), x0.double(), r.double(), beta,
                         kl_w, c)
    assert loss64.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss64, vd)
    err_p = z_t.double() - t.double().view(-1, 1, 1, 1) * (beta * vd + (1 - beta) * v_old.double()) - x0.double()
    w = err_p.abs().mean((1, 2, 3), keepdim=True).detach()
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all() and w.min() > 0
    # the claim itself, (1): the closed-form gradient with w± held fixed, written out in numpy float64 per sample:
    # ∂L/∂v_k = 2 c t_k / (B N β) · (r_k e⁺_k (-β) / w⁺_k + (1 - r_k) e⁻_k β / w⁻_k) + 2 λ_KL / (B N) (v_k - v_ref,k)
    m = v[0].numel()
    closed = np.empty(shape)
    for k in range(b):
        tk, rk = float(t[k]), float(r[k])
        e_p = n(z_t)[k] - tk * (beta * n(v)[k] + (1 - beta) * n(v_old)[k]) - n(x0)[k]
        e_n = n(z_t)[k] - tk * ((1 + beta) * n(v_old)[k] - beta * n(v)[k]) - n(x0)[k]
        w_p, w_n = np.mean(np.abs(e_p)), np.mean(np.abs(e_n))
        closed[k] = (2 * c * tk / (b * m * beta) * (-beta * rk * e_p / w_p + beta * (1 - rk) * e_n / w_n)
                     + 2 * kl_w / (b * m) * (n(v)[k] - n(v_ref)[k]))
    np.testing.assert_allclose(grad.numpy(), closed, rtol=1e-10, atol=1e-14)
    assert np.allclose(w.flatten().numpy(), [np.mean(np.abs(n(z_t)[k] - float(t[k]) * (
        beta * n(v)[k] + (1 - beta) * n(v_old)[k]) - n(x0)[k])) for k in range(b)], rtol=1e-12)
    # (2): autograd of the loss written out again with the normaliser explicitly detached gives the same gradient;
    # left differentiable, a different one (the stop-gradient is not a no-op)
    def written(v64, stop):
        tb, rd = t.double().view(-1, 1, 1, 1), r.double()
        terms = []
        for vv in (beta * v64 + (1 - beta) * v_old.double(), (1 + beta) * v_old.double() - beta * v64):
            e = z_t.double() - tb * vv - x0.double()
            norm = e.abs().mean((1, 2, 3), keepdim=True)
            terms.append((e ** 2 / (norm.detach() if stop else norm)).mean((1, 2, 3)))
        kl64 = ((v64 - v_ref.double()) ** 2).mean((1, 2, 3)).mean()
        return c * ((rd * terms[0] + (1 - rd) * terms[1]) / beta).mean() + kl_w * kl64

    v_stop, v_live = v.double().requires_grad_(True), v.double().requires_grad_(True)
    (g_stop,) = torch.autograd.grad(written(v_stop, True), v_stop)
    (g_live,) = torch.autograd.grad(written(v_live, False), v_live)
    torch.testing.assert_close(grad, g_stop, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(grad, g_live, rtol=1e-3, atol=1e-6)


def test_bridge_reduces_to_flow_matching_at_tau_zero_and_is_the_time_derivative():
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.4, 0.05], dtype=torch.float64)
    z_t, u = bridge(z0, 0.0, t, eps)
    tb = t.view(-1, 1, 1, 1)
    assert torch.equal(u, eps - z0)
    assert torch.allclose(z_t, (1 - tb) * z0 + tb * eps, rtol=0, atol=1e-15)
    assert torch.allclose(x0_target(z_t, t, u), z0, rtol=0, atol=1e-14)
    # τ > 0: u is d z_t / dt at fixed ε, and z_t has the forward process's marginal given z_τ
    s, t = 0.3, torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64)
    z_tau = z0[:3]
    h = 1e-6
    _, u = bridge(z_tau, s, t, eps[:3])
    fd = (bridge(z_tau, s, t + h, eps[:3])[0] - bridge(z_tau, s, t - h, eps[:3])[0]) / (2 * h)
    assert torch.allclose(u, fd, rtol=1e-6, atol=1e-8)
    zt1, _ = bridge(z_tau, s, torch.ones(3, dtype=torch.float64), eps[:3])
    assert torch.allclose(zt1, eps[:3], atol=1e-15)  # t = 1: pure noise whatever z_τ


def test_optimality_handles_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r = optimality(rewards, groups)
    assert torch.isfinite(r).all()
    assert torch.equal(r[:3], torch.full((3,), 0.5))  # the zero-variance group is neutral
    std = rewards.double().std(unbiased=False)
    adv = (torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64) - 1.0) / (std + 1e-4)
    assert torch.allclose(r[3:].double(), (adv.clamp(-5, 5) / 5 * 0.5 + 0.5), atol=1e-7)
    flat = optimality(torch.full((4,), 3.0), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(flat, torch.full((4,), 0.5))  # every reward equal: std = 0, still no NaN
    big = optimality(torch.tensor([0.0, 0.0, 300.0]), torch.tensor([0, 0, 0]), clip=1.0)  # A = (-.71, -.71, 1.41)
    assert big[2] == 1.0 and big[0] == big[1] and 0 < big[0] < 0.5  # clipped at c, then mapped to [0, 1]


def test_decay_schedules():
    assert [old_decay(k) for k in (0, 1, 250, 499, 500, 10_000)] == [0.0, 0.001, 0.25, 0.499, 0.5, 0.5]
    assert old_decay(10, rate=0.1, cap=0.3) == 0.3
    assert [ema_decay(k) for k in (0, 1, 80, 81, 1000)] == [0.1, 2 / 11, 81 / 90, 0.9, 0.9]


def test_scaled_window():
    assert scaled_window((12, 17), 25, 25) == (12, 17)
    assert scaled_window((12, 17), 25, 10) == (5, 7)
    assert scaled_window((3, 7), 10, 10) == (3, 7)
    assert scaled_window((12, 17), 25, 3) == (1, 2)
    with pytest.raises(ValueError, match="stopping early needs at least 2 sampler steps"):
        scaled_window((12, 17), 25, 1)


# ---- LoRA ------------------------------------------------------------------------------------------------------
def test_fresh_lora_is_an_exact_no_op_and_leaves_the_backbone_alone(backbone, gen):
    policy = LoraPolicy(backbone, rank=4, alpha=8, adapters=NFT_ADAPTERS)
    names = {n.rsplit(".", 1)[0].split(".")[-1] for n in policy.lora_tensors()}
    assert {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= names
    z, t = latents(backbone, 2, gen), torch.tensor([0.9, 0.3])
    embeds, pooled = backbone.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        base = backbone.velocity(z, t, embeds, pooled)
        for adapter in (*NFT_ADAPTERS, None):
            with policy.use(adapter) as bb:
                assert torch.equal(bb.velocity(z, t, embeds, pooled), base)
    trainable = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():  # switching really switches: only the adapter in use changes the output
        for p in policy.parameters("ema"):
            p.add_(0.05)
        with policy.use("ema") as bb:
            moved = bb.velocity(z, t, embeds, pooled)
        assert not torch.equal(moved, base)
        for adapter in (TRAINED, "old", None):
            with policy.use(adapter) as bb:
                assert torch.equal(bb.velocity(z, t, embeds, pooled), base)
        assert policy.active == TRAINED
        assert trainable == [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in backbone.transformer.parameters())
    assert not any("lora" in n for n, _ in backbone.transformer.named_parameters())  # the shared copy is untouched


def test_old_policy_update_is_exactly_the_stated_ema(backbone):
    policy = LoraPolicy(backbone, rank=2, alpha=4, adapters=NFT_ADAPTERS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in (TRAINED, "old"):
            for p in policy.parameters(name):
                p.copy_(torch.randn(p.shape, generator=g))
    theta = {k: v.detach().clone() for k, v in policy.lora_tensors(TRAINED).items()}
    old = {k: v.detach().clone() for k, v in policy.lora_tensors("old").items()}
    eta = old_decay(137)
    policy.ema_("old", TRAINED, eta)
    for k, v in policy.lora_tensors("old").items():
        assert torch.equal(v, old[k] * eta + theta[k] * (1 - eta))  # exactly: η·old + (1-η)·θ, same float ops
    assert all(torch.equal(v, theta[k]) for k, v in policy.lora_tensors(TRAINED).items())
    policy.ema_("old", TRAINED, 0.0)
    assert all(torch.equal(v, theta[k]) for k, v in policy.lora_tensors("old").items())


def test_adapter_save_and_load_round_trip(backbone, gen, tmp_path):
    policy = LoraPolicy(backbone, rank=2, alpha=4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    folder = policy.save(tmp_path / "adapter")
    assert {f.name for f in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                  "stitchvm_adapter.json"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    loaded = LoraPolicy.from_pretrained(backbone, folder)
    z, t = latents(backbone, 1, gen), torch.tensor([0.5])
    embeds, pooled = backbone.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        a = policy.backbone.velocity(z, t, embeds, pooled)
        assert torch.equal(loaded.backbone.velocity(z, t, embeds, pooled), a)
        assert not torch.equal(backbone.velocity(z, t, embeds, pooled), a)


# ---- short runs ------------------------------------------------------------------------------------------------
def _lora_b(policy, name=TRAINED):
    return torch.cat([v.detach().flatten() for k, v in policy.lora_tensors(name).items() if k.endswith("lora_B")])


def test_nft_changes_the_adapter_and_is_deterministic(backbone, reward):
    runs = []
    for _ in range(2):
        policy = LoraPolicy(backbone, 2, 4, adapters=NFT_ADAPTERS)
        history = train_nft(policy, reward, PROMPTS, cfg("nft"), seed=5)
        runs.append((policy, history))
    (p1, h1), (p2, h2) = runs
    assert _lora_b(p1).abs().max() > 0  # B starts at zero
    assert torch.equal(_lora_b(p1), _lora_b(p2))
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]
    assert strip(h1) == strip(h2)
    row = h1[-1]
    assert row["tau"] == 3 and row["train_times"] == 1 and np.isfinite(row["loss"])
    assert {"sampling_s", "reward_s", "update_s", "wall_s"} <= set(row)
    # after the first step (k = 0) η = 0: θ_old = θ; θ_ema = d·θ_ema + (1-d)·θ with d = 0.1, from B = 0
    assert torch.equal(_lora_b(p1, "old"), _lora_b(p1))
    assert torch.allclose(_lora_b(p1, "ema"), 0.9 * _lora_b(p1), rtol=0, atol=1e-9)


def test_nft_stitchvm_stops_early_and_trains_on_the_bridge(backbone, reward, value_model):
    policy = LoraPolicy(backbone, 2, 4, adapters=NFT_ADAPTERS)
    history = train_nft(policy, reward, PROMPTS, cfg("nft-stitchvm", updates=2, nft={"train_times": 0}), seed=1,
                        value_model=value_model)
    assert _lora_b(policy).abs().max() > 0
    for row in history[1:]:
        assert 1 <= row["tau"] <= 2 and row["train_times"] == row["tau"]  # grid times above σ_τ only
    with pytest.raises(ValueError, match="needs a trained stitched value model"):
        train_nft(LoraPolicy(backbone, 2, 4, adapters=NFT_ADAPTERS), reward, PROMPTS, cfg("nft-stitchvm"))


@pytest.mark.parametrize("method", ["draft", "draft-stitchvm"])
def test_draft_changes_the_adapter_and_is_deterministic(backbone, reward, value_model, method):
    evalset = PolicyEvalSet(tuple(PROMPTS[:1]), (0,), 2)
    outs = []
    for _ in range(2 if method == "draft" else 1):
        policy = LoraPolicy(backbone, 2, 4)
        history = train_draft(policy, reward, PROMPTS, cfg(method, checkpointing=method == "draft"), seed=2,
                              value_model=value_model, evalset=evalset)
        outs.append((_lora_b(policy), history))
    b, history = outs[0]
    assert b.abs().max() > 0
    assert history[0]["step"] == 0 and "eval_reward" in history[0] and "eval_reward" in history[-1]
    assert history[-1]["regulariser"] == 0.0  # the first update starts at θ = θ_ref (B = 0): v_θ = v_ref exactly
    assert history[-1]["tau"] == 3 if method == "draft" else 1 <= history[-1]["tau"] <= 2
    if method == "draft":
        strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]
        assert torch.equal(outs[1][0], b) and strip(outs[1][1]) == strip(history)


def test_evaluation_is_fixed_by_prompts_and_seeds(backbone, reward):
    evalset = PolicyEvalSet(tuple(PROMPTS[:2]), (0, 1), 2)
    m1, r1, z1 = evaluate_policy(backbone, reward, evalset)
    m2, r2, z2 = evaluate_policy(backbone, reward, evalset, batch_size=3)
    assert z1.shape[0] == 4 and torch.allclose(z1, z2, atol=1e-6) and m1 == pytest.approx(m2, rel=1e-5)
    assert torch.allclose(z1[0], evaluate_policy(backbone, reward, PolicyEvalSet(tuple(PROMPTS[:1]), (0,), 2))[2][0], atol=1e-5)


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"method": "ppo"}, r"align: method 'ppo' is not one of nft, nft-stitchvm, draft, draft-stitchvm"),
    ({"updates": 0}, r"align: updates must be >= 1, got 0"),
    ({"group_size": 1}, r"align: group_size must be >= 2 for DiffusionNFT"),
    ({"steps": 1}, r"align: steps must be >= 2"),
    ({"nft": {"beta": 0}}, r"align.nft: beta must be > 0"),
    ({"nft": {"lr": -1e-4}}, r"align.nft: lr must be > 0"),
    ({"draft": {"lr": 0}}, r"align.draft: lr must be > 0"),
    ({"nft": {"old_max": 1.5}}, r"align.nft: old_max must lie in \[0, 1\]"),
    ({"nft": {"tau_window": [17, 12]}},
     r"align.nft: tau_window \[17, 12\] must be \[lo, hi\] with 1 <= lo <= hi < tau_of"),
    ({"draft": {"tau_window": [3, 10]}}, r"align.draft: tau_window .* < tau_of \(10\)"),
    ({"method": "draft", "draft": {"k": 11}, "steps": 10}, r"align: draft.k \(11\) must be <= steps \(10\)"),
    ({"draft": {"k": 0}}, r"align.draft: k must be >= 1, got 0"),
    ({"draft": {"reg_weight": -1.0}}, r"align.draft: reg_weight must be >= 0"),
    ({"draft": {"k": 1.5}}, r"align.draft.k: expected int, got float"),
    ({"draft": {"nope": 1}}, r"align.draft.nope: unknown key"),
    ({"draft_lr": 1e-3}, r"align.draft_lr: unknown key"),
    ({"eval_seeds": []}, r"align: eval_seeds needs at least one seed"),
    ({"lora_rank": "32"}, r"align.lora_rank: expected int, got str"),
    ({"nope": 1}, r"align.nope: unknown key"),
])
def test_bad_config_values_fail_with_messages(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Params, {"align": values})
    assert from_dict(Params, {"align": {"method": "draft", "group_size": 1}}).align.group_size == 1


# ---- the stage -------------------------------------------------------------------------------------------------
def test_align_stage_end_to_end(backbone, reward, tmp_path, monkeypatch):
    """prompts → (a saved value model stands in for `train`) → align, tracked in a temporary MLflow."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = from_dict(Params, {
        "prompts": {"train": 2, "val": 0, "test": 1}, "storage": {"root": str(tmp_path / "data")},
        "mlflow": {"tracking_uri": uri, "experiment": "align-test", "registered_model": "vm"},
        "align": {**TINY, "method": "nft-stitchvm", "updates": 2, "eval_prompts": 1, "eval_seeds": [0, 1]}})
    paths = Paths.from_params(params, reports=tmp_path / "reports", checkpoints=tmp_path / "ckpt", track=True)
    stage("prompts").run(params, paths)
    with pytest.raises(FileNotFoundError, match="run the `train` stage first"):
        align_stage.run(params, paths, progress=False)
    StitchedValueModel(backbone, reward, 2, 2).save_pretrained(tmp_path / "data" / "value_model")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        summary = align_stage.run(params, paths, progress=False)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert summary["method"] == "nft-stitchvm" and summary["evaluated_adapter"] == "ema"
    assert [r["step"] for r in summary["curve"]] == [0, 1, 2]
    assert summary["reward_before"] == pytest.approx(summary["curve"][0]["eval_reward"], abs=1e-4)
    assert summary["reward_after"] == pytest.approx(summary["curve"][-1]["eval_reward"], abs=1e-4)
    assert summary["sec_per_update"] > 0 and summary["sampling_s"] > 0 and summary["update_s"] > 0
    for f in ("align.json", "align_curve.png", "align_grid.png"):
        assert (tmp_path / "reports" / f).stat().st_size > 0
    assert json.loads((tmp_path / "reports" / "align.json").read_text())["method"] == "nft-stitchvm"
    # what DVC hashes holds no run facts (times, run ids, folders): the run record does, with the wall-time plot
    report, record = (json.loads((tmp_path / "reports" / f).read_text()) for f in ("align.json", "runs/align.json"))
    assert report == json.loads((tmp_path / "data" / "align" / "summary.json").read_text())
    assert not {"seconds", "train_seconds", "sec_per_update", "sampling_s", "run_id", "adapter"} & set(report)
    assert not any("wall_s" in r for r in report["curve"]) and report["curve_png"] == "reports/align_curve.png"
    assert record["run_id"] == summary["run_id"] and record["adapter"] == "data/adapter"  # relative to the repo
    assert record["sec_per_update"] == summary["sec_per_update"]
    assert [set(r) for r in record["curve"]] == [{"step", "wall_s"}] * 3
    assert (tmp_path / "reports" / "runs" / "align_curve_wall.png").stat().st_size > 0
    adapter = tmp_path / "data" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    # the saved adapter reproduces the evaluated reward
    tuned = LoraPolicy.from_pretrained(backbone, adapter)
    evalset = PolicyEvalSet(tuple(summary["eval_prompts"]), tuple(summary["eval_seeds"]), params.align.steps)
    assert evaluate_policy(tuned.backbone, reward, evalset)[0] == pytest.approx(summary["reward_after"], abs=1e-4)
    # MLflow: metrics per update, the adapter registered with alias candidate
    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["align/reward_after"] == pytest.approx(summary["reward_after"], abs=1e-4)
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "align/eval_reward")]
    assert sorted(steps) == [0, 1, 2]
    assert {m.key for m in client.get_metric_history(summary["run_id"], "align/sampling_s")} == {"align/sampling_s"}
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("vm-adapter", "candidate")
    assert str(version.version) == summary["model_version"] and version.run_id == summary["run_id"]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_benchmark_row_and_table(tmp_path):
    """One method measured in-process (the benchmark runs each in a fresh process); no value model stored: an
    untrained one stands in for timing."""
    from stitchvm.benchmarks.align import format_table, measure

    profile = tmp_path / "bench.yaml"
    profile.write_text(json.dumps({"storage": {"root": str(tmp_path / "data")},
                                   "align": {**TINY, "updates": 2, "eval_prompts": 1, "eval_seeds": [0]}}))
    row = measure(str(profile), "nft-stitchvm", None)
    assert row["method"] == "nft-stitchvm" and row["value_model"] == "untrained (timing only)"
    assert row["sec_per_update"] > 0 and row["sampling_s"] > 0 and 1 <= row["mean_tau"] <= 2
    assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
    assert np.isfinite(row["reward_before"]) and np.isfinite(row["reward_after"])
    # evaluated at update 0 (the base model), then every eval_every and at the end; wall time grows
    assert [r["step"] for r in row["curve"]] == [0, 1, 2]  # eval_every 1 (the default)
    assert row["curve"][0]["wall_s"] == 0 < row["curve"][1]["wall_s"] < row["curve"][2]["wall_s"]
    assert row["reward_before"] == row["curve"][0]["eval_reward"] and row["reward_after"] == row["curve"][-1]["eval_reward"]
    assert row["geneval_before"] == row["curve"][0]["geneval"] and row["geneval_after"] == row["curve"][-1]["geneval"]
    assert all(r["geneval"] is None or 0 <= r["geneval"] <= 1 for r in row["curve"])
    table = format_table({"device": "cpu", "profile": "x", "updates": 2, "value_model": row["value_model"],
                          "rows": [row], "speedup": {"nft": 1.8}})
    assert "nft-stitchvm" in table and "speedup per update (nft / nft-stitchvm): 1.8x" in table


def test_seconds_to_reach_is_the_first_crossing():
    from stitchvm.benchmarks.align import seconds_to_reach

    curve = [{"wall_s": 0.0, "geneval": 0.3}, {"wall_s": 5.0, "geneval": 0.5}, {"wall_s": 9.0, "geneval": 0.4},
             {"wall_s": 12.0, "geneval": 0.6}]
    assert seconds_to_reach(curve, 0.5) == 5.0 and seconds_to_reach(curve, 0.55) == 12.0
    assert seconds_to_reach(curve, 0.3) == 0.0 and seconds_to_reach(curve, 0.7) is None
    assert seconds_to_reach(curve, None) is None
    assert seconds_to_reach([{"wall_s": 1.0, "geneval": None}], 0.1) is None


def test_seed_means_average_the_curves_and_read_the_time_off_the_mean():
    from stitchvm.benchmarks.align import seed_means

    def row(method, seed, points):
        return {"method": method, "seed": seed, "curve": [{"step": 5 * k, "wall_s": w, "eval_reward": 1.0 + k,
                                                           "geneval": g} for k, (w, g) in enumerate(points)]}

    rows = [row("nft", 0, [(0, 0.2), (10, 0.3), (20, 0.5)]), row("nft", 1, [(0, 0.2), (12, 0.4), (22, 0.3)]),
            row("nft-stitchvm", 0, [(0, 0.2), (6, 0.5), (12, 0.3)]),
            row("nft-stitchvm", 1, [(0, 0.2), (8, 0.3), (14, 0.5)])]
    m = seed_means(rows)
    assert [c["geneval"] for c in m["nft"]["curve"]] == pytest.approx([0.2, 0.35, 0.4])
    assert [c["wall_s"] for c in m["nft-stitchvm"]["curve"]] == pytest.approx([0, 7, 13])
    assert m["nft"]["geneval_after"] == pytest.approx(0.4) and m["nft"]["seeds"] == 2
    # the mean NFT+StitchVM curve (0.2, 0.4, 0.4) first reaches NFT's mean final 0.4 at its mean time 7 s
    assert m["nft-stitchvm"]["seconds_to_nft_final"] == pytest.approx(7.0)
    rows[3]["curve"].pop()
    with pytest.raises(ValueError, match="different steps"):
        seed_means(rows)
