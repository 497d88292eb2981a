"""`bench value`: training variants judged against the Monte Carlo value, on a small pipeline run of the world."""
import json

import pytest
import torch
import yaml

from stitchvm.benchmarks.truth import reliability_rows, run as bench_truth
from stitchvm.benchmarks.value import VARIANTS, run as bench
from stitchvm.config import load_params
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths

SMALL = {
    "prompts": {"source": "builtin", "train": 6, "val": 0, "test": 2},
    "samples": {"per_prompt": 4, "steps": 3, "batch_size": 16},
    "noisy": {"probe_size": 16, "sigmas": [0.5, 0.75]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 100},
    "evaluate": {"batch_size": 8, "mc_rollouts": 2, "mc_sigmas": [0.5]},
}


@pytest.mark.e2e
def test_bench_value_trains_each_variant_against_one_monte_carlo_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile = tmp_path / "small.yaml"
        profile.write_text(yaml.safe_dump({**SMALL, "storage": {"root": str(tmp_path / "data")}}))
        params = load_params(profile)
        paths = Paths.from_params(params, reports=tmp_path / "reports", track=False)
        for name in ("prompts", "samples", "labels", "noisy", "search"):
            stage(name).run(params, paths, progress=False)
        with pytest.raises(FileNotFoundError, match="run the `truth` stage first"):  # the bench reads the stored truth
            bench(str(profile), tmp_path / "x.json", steps=3, variants=["distill"], progress=False)
        stage("truth").run(params, paths, progress=False)
        variants = ["distill", "prompt-head+rank", "fit-wide"]
        report = bench(str(profile), tmp_path / "bench.json", steps=3, variants=variants, progress=False)
        stage("train").run(params, paths, progress=False)
        truth = bench_truth(str(profile), tmp_path / "truth.json", rollouts=4, progress=False)
        again = bench_truth(str(profile), tmp_path / "truth2.json", rollouts=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("monte-carlo", "-"), ("tweedie", "-"), ("stitchvm", "distill"), ("stitchvm", "fit-wide"),
        ("stitchvm", "prompt-head+rank")]
    assert all(-1 <= r["spearman_within_prompt"] <= 1 for r in rows)
    assert all("spearman_within_prompt_vs_mc" in r for r in rows if r["method"] != "monte-carlo")
    assert report["variants"] == {v: VARIANTS[v] for v in variants} and set(report["train_seconds"]) == set(variants)
    assert set(report["by_category"]["distill"]) <= {"single_object", "two_object", "counting", "colors", "position",
                                                     "color_attr"}
    with pytest.raises(ValueError, match="unknown variants"):
        bench(str(profile), tmp_path / "x.json", variants=["nope"])
    # bench truth on the trained model: a row per σ and method, seeded (the same numbers twice)
    assert [(r["sigma"], r["method"]) for r in truth["rows"]] == [(0.5, "stitchvm"), (0.5, "tweedie")]
    assert truth["rows"] == again["rows"] and truth["by_category"] == again["by_category"]
    assert all(-1 <= r["vs_mc"] <= 1 and -1 <= r["split_half"] <= 1 for r in truth["rows"])
    with pytest.raises(ValueError, match="even integer"):
        bench_truth(str(profile), tmp_path / "x.json", rollouts=3)


def test_variant_configs_change_the_profiles_train_section_as_they_say():
    from stitchvm.benchmarks.value import variant_config

    train = load_params("params.yaml").train
    assert variant_config(train, "fit", None) == (train, (None, 3))  # `fit` is the default profile's own recipe
    cfg, key = variant_config(train, "fit-half-lr2x", None)
    assert (cfg.steps, cfg.fit.steps, cfg.fit.lr, cfg.fit.batch_size, cfg.residual_width) == (0, 3000, 2e-3, 16, 192)
    assert key == (None, 3)
    cfg, _ = variant_config(train, "fit-wide", steps=7)  # --steps: the fit's steps; stage 2 stays off
    assert (cfg.steps, cfg.fit.steps, cfg.residual_width, cfg.sigma_logit_mean) == (0, 7, 384, -1.0)
    cfg, key = variant_config(train, "prompt-head+rank", steps=7)  # a distillation: stage 2's steps, no fit
    assert (cfg.steps, cfg.fit.steps, cfg.lambda_rank, cfg.residual_width, cfg.residual_kernel) == (7, 0, 1.0, 0, 1)
    assert key == ("prompt", 1) and train.fit.steps == 6000  # the profile's own config untouched


def test_reliability_rows_follow_spearman_brown_and_the_attenuation_formula():
    """Two halves of a noisy measurement: split-half = their within-prompt Spearman, reliability by Spearman-Brown,
    and a method's agreement with the truth = its agreement with the mean of both halves / √reliability."""
    from stitchvm.value.ranking import spearman_within_groups

    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(4).repeat_interleave(50)  # 4 prompts × 50 latents
    truth = torch.randn(200, generator=gen)
    half_a, half_b = (truth + torch.randn(200, generator=gen) for _ in range(2))
    method = truth + 0.5 * torch.randn(200, generator=gen)
    (row,) = reliability_rows(0.5, {"m": method}, half_a, half_b, groups)
    split = spearman_within_groups(half_a, half_b, groups)
    assert row["split_half"] == pytest.approx(split)
    assert row["reliability_R"] == pytest.approx(2 * split / (1 + split))
    assert row["perfect_vs_mc"] == pytest.approx(split ** 0.5)
    vs_mc = spearman_within_groups(method, (half_a + half_b) / 2, groups)
    assert row["vs_mc"] == pytest.approx(vs_mc)
    assert row["vs_true"] == pytest.approx(vs_mc / (2 * split / (1 + split)) ** 0.5)
    # the correction recovers the agreement with the truth itself (up to sampling noise of 200 latents)
    assert abs(row["vs_true"] - spearman_within_groups(method, truth, groups)) < 0.1
    (same,) = reliability_rows(0.5, {"m": method}, half_a, half_a, groups)  # identical halves: no MC noise
    assert same["reliability_R"] == pytest.approx(1.0) and same["vs_true"] == pytest.approx(same["vs_mc"])
