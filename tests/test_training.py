
import pytest
import torch

from stitchvm.config import TrainConfig
from stitchvm.value.training import (TeacherTargets, build_optimizer, distillation_loss, grouped_batch, rank_loss,
                                     teacher_targets, train_value_model, trivial_loss)
from stitchvm.value.evaluation import NoisyEvalSet, evaluate_value_model, noise_grid
from stitchvm.diffusion.flow import forward_noise
from stitchvm.data.latent_fields import round_robin_prompts, smooth_latents
from stitchvm.value.ranking import spearman_within_groups
from stitchvm.value.search import search_stitch, stitched_from_search
from stitchvm.value.model import StitchedValueModel

from conftest import latents, resumed_after_a_crash

PROMPTS = ["a red square", "a green square", "a blue square", "a yellow square"]


def test_loss_matches_a_float64_rederivation(gen):
    e_s, e_t = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    h_s, h_t = torch.randn(3, 5, 6, generator=gen), torch.randn(3, 5, 6, generator=gen)
    sc_t = torch.randn(3, generator=gen)
    head = lambda e: e.sum(-1)
    parts = distillation_loss(e_s, h_s, TeacherTargets(e_t, h_t, sc_t), 0.5, head, 2.0)
    e_s, e_t, h_s, h_t, sc_t = (x.double() for x in (e_s, e_t, h_s, h_t, sc_t))
    emb = sum(((e_s[b] - e_t[b]) ** 2).sum() for b in range(3)) / 3
    tok = sum(((h_s[b, n] - h_t[b, n]) ** 2).sum() / 6 for b in range(3) for n in range(5)) / 15
    diff = (e_s.sum(-1) - sc_t).abs()
    sl1 = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()
    assert parts["loss"].item() == pytest.approx((emb + 0.5 * tok + 2.0 * sl1).item(), rel=1e-6)


def test_stitch_layer_gets_five_times_the_lr(backbone, reward):
    model = StitchedValueModel(backbone, reward, 2, 1)
    opt, sched = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=10, steps=100))
    stitch_ids = {id(p) for p in model.stitch.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == stitch_ids
    assert opt.param_groups[0]["lr"] == pytest.approx(5 * opt.param_groups[1]["lr"])
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-5)  # warm-up step 1 of 10
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4)
    n_trainable = len(model.trainable_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


def test_training_learns_the_value(backbone, reward):
    """Smooth latent fields: a tiny problem whose teacher scores really vary and are predictable from z_t."""
    gen = torch.Generator().manual_seed(0)
    z_train = smooth_latents(256, backbone.latent_channels, 16, gen)
    z_eval, ids = smooth_latents(64, backbone.latent_channels, 16, gen), round_robin_prompts(4, 16)
    train_t = teacher_targets(backbone, reward, z_train, 64)
    eval_t = teacher_targets(backbone, reward, z_eval, 64)
    text = reward.text_embeds(PROMPTS)
    teacher = reward.score_matrix(eval_t.embeds, text)[torch.arange(64), ids]
    # the spread check: within one prompt, teacher scores differ by far more than float noise
    assert min(teacher[ids == k].std().item() for k in range(4)) > 0.1

    t_probe = torch.rand(128, generator=gen)
    z_probe = forward_noise(z_train[:128], t_probe, torch.randn(z_train[:128].shape, generator=gen))
    result = search_stitch(backbone, reward, z_train[:128], z_probe, t_probe, 4, 32, progress=False)
    model = stitched_from_search(backbone, reward, result)
    t = torch.full((64,), 0.1)
    z_t = forward_noise(z_eval, t, torch.randn(z_eval.shape, generator=gen))

    def loss_and_rank():
        with torch.no_grad():
            e, h = model.embed(z_t, t)
        value = reward.score_matrix(e, text)[torch.arange(64), ids]
        return distillation_loss(e, h, eval_t, 1.0)["loss"].item(), spearman_within_groups(value, teacher, ids)

    loss0, rank0 = loss_and_rank()
    cfg = TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup_steps=15, checkpoint_every=1000)
    history = train_value_model(model, z_train, train_t, cfg, seed=0, progress=False)
    loss1, rank1 = loss_and_rank()
    assert history[-1]["loss"] < history[0]["loss"]
    assert loss1 < trivial_loss(eval_t, 1.0) < loss0
    assert rank1 > rank0 + 0.1


def test_resume_equals_an_uninterrupted_run(tmp_path, backbone, reward, gen):
    z0 = latents(backbone, 16, gen)
    targets = teacher_targets(backbone, reward, z0, 8)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    full = StitchedValueModel(backbone, reward, 2, 1)
    train_value_model(full, z0, targets, cfg, seed=5, checkpoint_dir=tmp_path / "a", progress=False)
    history, resumed = resumed_after_a_crash(backbone, reward, z0, targets, cfg, tmp_path / "b", crash_step=4)
    assert [r["step"] for r in history] == [4, 5, 6]
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "last.tmp").exists()


def test_evaluation_rows_and_floor(backbone, reward, gen):
    model = StitchedValueModel(backbone, reward, 2, 1)
    data = NoisyEvalSet(latents(backbone, 8, gen), round_robin_prompts(2, 4), PROMPTS[:2])
    noisy = noise_grid(data.z0, (0.25, 0.75), gen)
    report = evaluate_value_model(model, backbone, reward, data, noisy, batch_size=4, progress=False)
    assert [(r["sigma"], r["method"]) for r in report["eval"]] == [
        (0.25, "stitchvm"), (0.25, "tweedie"), (0.75, "stitchvm"), (0.75, "tweedie")]
    for row in report["eval"]:
        assert -1 <= row["spearman"] <= 1 and -1 <= row["spearman_within_prompt"] <= 1
        assert 0 <= row["recall_at_1"] <= 1 and row["ms_per_eval"] > 0 and row["distill_loss"] > 0
    assert report["trivial_loss"] > 0 and 0 <= report["teacher_recall_at_1"] <= 1


def test_evaluation_by_category_restricts_to_each_categorys_prompts(backbone, reward, gen):
    model = StitchedValueModel(backbone, reward, 2, 1)
    z0 = latents(backbone, 12, gen)
    ids = round_robin_prompts(3, 4)
    data = NoisyEvalSet(z0, ids, PROMPTS[:3], ["counting", "colors", "counting"])
    noisy = noise_grid(z0, (0.5,), gen)
    mc = {0.5: torch.randn(12, generator=gen)}
    report = evaluate_value_model(model, backbone, reward, data, noisy, batch_size=6, progress=False, true_values=mc)
    section = report["by_category"]
    assert set(section) == {"counting", "colors"} and set(section["colors"]) == {"stitchvm", "tweedie", "monte-carlo"}
    # one category alone: its rows equal an evaluation of that category's prompts only
    keep = ids == 1
    alone = evaluate_value_model(model, backbone, reward, NoisyEvalSet(z0[keep], torch.zeros(4, dtype=torch.long),
                                                                       PROMPTS[1:2]),
                                 {0.5: noisy[0.5][keep]}, batch_size=6, progress=False, true_values={0.5: mc[0.5][keep]})
    row = next(r for r in alone["eval"] if r["method"] == "tweedie")
    got = section["colors"]["tweedie"]["sigma_0.5"]
    assert got["spearman_within_prompt_vs_mc"] == pytest.approx(row["spearman_within_prompt_vs_mc"])
    assert got["spearman_within_prompt"] == pytest.approx(row["spearman_within_prompt"])
    with pytest.raises(ValueError, match="2 categories for 3 prompts"):
        NoisyEvalSet(z0, ids, PROMPTS[:3], ["a", "b"])


def test_tweedie_at_sigma_zero_is_the_teacher(backbone, reward, gen):
    """At σ = 0, ẑ0 = z0 exactly, so the Tweedie baseline must reproduce the teacher perfectly."""
    model = StitchedValueModel(backbone, reward, 2, 1)
    data = NoisyEvalSet(smooth_latents(8, 4, 16, gen), round_robin_prompts(2, 4), PROMPTS[:2])
    row = evaluate_value_model(model, backbone, reward, data, noise_grid(data.z0, (0.0,), gen), batch_size=8,
                   progress=False)["eval"][1]
    assert row["method"] == "tweedie"
    assert row["spearman"] == pytest.approx(1.0) and row["distill_loss"] < 1e-9


def test_training_feeds_each_latents_prompt_to_a_prompt_head(backbone, reward, gen):
    z0 = latents(backbone, 6, gen)
    targets = teacher_targets(backbone, reward, z0, 6)
    prompts = PROMPTS[:2] * 3
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=100)
    with pytest.raises(ValueError, match="needs one prompt per clean latent: got 0 for 6"):
        train_value_model(StitchedValueModel(backbone, reward, 2, 1, context="prompt"), z0, targets, cfg, seed=0,
                 progress=False)
    runs = {}
    for name, p in (("own", prompts), ("swapped", prompts[::-1]), ("again", prompts)):
        model = StitchedValueModel(backbone, reward, 2, 1, context="prompt")
        runs[name] = train_value_model(model, z0, targets, cfg, seed=0, progress=False, prompts=p)[-1]["loss"]
    assert runs["own"] == runs["again"] and runs["own"] != runs["swapped"]  # the prompts reach the head


def test_rank_loss_matches_a_float64_listnet():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(12, generator=g), torch.randn(12, generator=g) * 3
    got = rank_loss(s, t, group_size=4, temperature=0.5)
    s64, t64 = s.double().view(3, 4) / 0.5, t.double().view(3, 4) / 0.5
    p, q = torch.softmax(t64, -1), torch.softmax(s64, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert rank_loss(t, t, 4, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    # ranking-only: shifting a group's scores by a constant changes nothing
    shifted = s + torch.arange(3).repeat_interleave(4) * 10.0
    assert rank_loss(shifted, t, 4, 0.5).item() == pytest.approx(got.item(), rel=1e-4)


def test_grouped_batches_share_prompt_time_and_noise(backbone, reward, gen):
    z0 = latents(backbone, 12, gen)
    targets = teacher_targets(backbone, reward, z0, 12)
    prompts = [PROMPTS[k % 3] for k in range(12)]
    group_of = torch.tensor([k % 3 for k in range(12)])
    members = [torch.nonzero(group_of == k).squeeze(1) for k in range(3)]
    idx = grouped_batch(group_of, members, 8, 4, torch.Generator().manual_seed(0))
    assert idx.shape == (8,) and all(len(set(group_of[idx[k:k + 4]].tolist())) == 1 for k in (0, 4))
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=100, group_size=4,
                      lambda_rank=1.0)
    history = train_value_model(StitchedValueModel(backbone, reward, 2, 1), z0, targets, cfg, seed=0,
                                progress=False, prompts=prompts)
    assert all(r["rank"] >= 0 and r["loss"] > r["embed"] for r in history)
    with pytest.raises(ValueError, match="groups latents by prompt"):
        train_value_model(StitchedValueModel(backbone, reward, 2, 1), z0, targets, cfg, seed=0, progress=False)
    with pytest.raises(ValueError, match="group_size must be >= 1 and divide batch_size"):
        TrainConfig(batch_size=8, group_size=3)
