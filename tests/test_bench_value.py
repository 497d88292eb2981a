"""`bench value`: training variants judged against the Monte Carlo value, on a small pipeline run of the world."""
import json

import pytest
import torch
import yaml

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
        variants = ["distill", "prompt-head+rank"]
        report = bench(str(profile), tmp_path / "bench.json", steps=3, variants=variants, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("monte-carlo", "-"), ("tweedie", "-"), ("stitchvm", "distill"), ("stitchvm", "prompt-head+rank")]
    assert all(-1 <= r["spearman_within_prompt"] <= 1 for r in rows)
    assert all("spearman_within_prompt_vs_mc" in r for r in rows if r["method"] != "monte-carlo")
    assert report["variants"] == {v: VARIANTS[v] for v in variants} and set(report["train_seconds"]) == set(variants)
    assert set(report["by_category"]["distill"]) <= {"single_object", "two_object", "counting", "colors", "position",
                                                     "color_attr"}
    with pytest.raises(ValueError, match="unknown variants"):
        bench(str(profile), tmp_path / "x.json", variants=["nope"])
