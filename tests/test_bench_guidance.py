"""`bench guidance` (run and counting modes), best-of-N, the `guidance` stage and its config."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from stitchvm.benchmarks import counting
from stitchvm.benchmarks import guidance_sweep
from stitchvm.benchmarks.guidance import judged_row, run as bench, setup
from stitchvm.config import (ConfigError, GUIDANCE_METHODS, ModelSpec, Params, RewardSpec, from_dict, GuidanceConfig,
                             load_params)
from stitchvm.guidance.methods import matched_best_of_n
from stitchvm.diffusion.sampling import sample
from stitchvm.guidance.fk import best_of_n

ROW_KEYS = {"method", "sec_per_sample", "peak_mem_mb", "reward_mean", "reward_std"}
TINY = {"backbone": {"source": "tiny:sd3"}, "reward": {"source": "tiny:clip", "kind": "clip"},
        "samples": {"source": "smooth"}}
SMALL_GUIDANCE = {"steps": 2, "prompts": 1, "per_prompt": 2, "batch_size": 2, "particles": 2, "proposals": 2,
                  "resample_every": 1, "window": [0.0, 1.0], "best_of_n": 2, "count_resolutions": [64]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids oversubscription (10× faster here); the bench's
    # subprocesses inherit OMP_NUM_THREADS
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


def profile(tmp_path, name="tiny", **guidance) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "guidance": {**SMALL_GUIDANCE, **guidance}}))
    return str(path)


# ---- run mode --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    prof = profile(tmp, methods=list(GUIDANCE_METHODS))
    first = bench(prof, str(tmp / "out.json"), progress=False, root=str(tmp / "root"), isolate=False)
    second = bench(prof, "", progress=False, root=str(tmp / "root"), isolate=False)
    return tmp, first, second


def test_bench_json_has_every_method_with_finite_numbers(bench_runs):
    tmp, report, _ = bench_runs
    written = json.loads((tmp / "out.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert {"device", "profile", "rows"} <= set(written) and written["device"].startswith("cpu")
    assert [r["method"] for r in written["rows"]] == list(GUIDANCE_METHODS)
    assert written["value_model"] == "untrained (4, 4)"  # the temp root holds no trained value model
    for row in written["rows"]:
        assert ROW_KEYS <= set(row)
        assert all(math.isfinite(row[k]) for k in ROW_KEYS - {"method"}), row
        assert row["sec_per_sample"] > 0 and row["peak_mem_mb"] >= 0 and row["reward_std"] >= 0
        assert row["samples"] == 2


def test_bench_reward_is_deterministic(bench_runs):
    _, first, second = bench_runs
    # best-of-n-matched's N comes from measured times, so only the others are compared
    fixed = [(a, b) for a, b in zip(first["rows"], second["rows"]) if a["method"] != "best-of-n-matched"]
    assert [a["reward_mean"] for a, _ in fixed] == [b["reward_mean"] for _, b in fixed]
    assert [a["reward_std"] for a, _ in fixed] == [b["reward_std"] for _, b in fixed]
    by = {r["method"]: r["reward_mean"] for r in first["rows"]}
    assert by["best-of-n"] >= by["unguided"]  # candidate 0 of best-of-N is the unguided sample


def test_best_of_n_matched_takes_the_n_of_fk_stitchvms_time(bench_runs):
    _, first, _ = bench_runs
    by = {r["method"]: r for r in first["rows"]}
    n = max(1, round(by["fk-stitchvm"]["sec_per_sample"] / by["unguided"]["sec_per_sample"]))
    assert by["best-of-n-matched"]["n"] == n and by["best-of-n"]["n"] == SMALL_GUIDANCE["best_of_n"]
    assert by["best-of-n-matched"]["reward_mean"] >= by["unguided"]["reward_mean"]


def test_matched_n_needs_its_reference_times():
    assert matched_best_of_n({"unguided": 0.1, "fk-stitchvm": 0.46}) == 5
    assert matched_best_of_n({"unguided": 0.1, "fk-stitchvm": 0.01}) == 1
    with pytest.raises(ValueError, match="list 'fk-stitchvm' before it"):
        matched_best_of_n({"unguided": 0.1})


def test_sweep_scale_zero_is_unguided_and_best_is_by_geneval(tmp_path):
    report = guidance_sweep.run(profile(tmp_path), tmp_path / "sweep.json", {"dps-stitchvm": [0.0, 5.0]},
                                progress=False, root=str(tmp_path / "root"))
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert report["split"] == "val" and [r["scale"] for r in report["rows"]] == [0.0, 5.0]
    params = load_params(profile(tmp_path))
    s = dataclasses.replace(setup(params, str(tmp_path / "root")), prompts=report["prompts"])
    unguided = judged_row(params, s, "unguided", params.guidance)
    assert report["rows"][0]["reward_mean"] == unguided["reward_mean"]  # DPS at scale 0 is the base sampler
    rows = [{"method": "m", "scale": 1.0, "geneval": 0.5, "reward_mean": 2.0},
            {"method": "m", "scale": 3.0, "geneval": 0.75, "reward_mean": 1.0},
            {"method": "m", "scale": 9.0, "geneval": 0.75, "reward_mean": 1.5}]
    assert guidance_sweep.best_scales(rows) == {"m": 9.0}


@pytest.mark.parametrize("text, message", [
    ("fk-stitchvm=1,2", "METHOD one of dps-tweedie, dps-stitchvm"),
    ("dps-stitchvm=", "expected METHOD=S1,S2"),
    ("dps-stitchvm=1,x", "scales must be numbers"),
    ("dps-tweedie=-1", "scales must be >= 0"),
])
def test_sweep_arguments_fail_with_messages(text, message):
    with pytest.raises(ValueError, match=message):
        guidance_sweep.parse_sweeps([text])


def test_isolated_worker_matches_in_process(bench_runs, tmp_path):
    _, first, _ = bench_runs
    report = bench(profile(tmp_path, methods=["unguided"]), "", progress=False, root=str(tmp_path / "root"),
                   isolate=True)
    (row,) = report["rows"]
    assert report["isolated"] and row["method"] == "unguided" and row["peak_mem_mb"] >= 0
    assert row["reward_mean"] == first["rows"][0]["reward_mean"]  # same seeds in a fresh process


# ---- best-of-N -------------------------------------------------------------------------------------------------
def test_best_of_n_picks_the_argmax(backbone):
    prompts = ["a red square", "a blue circle", "a green triangle"]
    brightness = lambda z, p: z.mean(dim=(1, 2, 3))
    z, scores = best_of_n(backbone, prompts, 2, 2.0, torch.Generator().manual_seed(5), brightness, n=3, eta=0.7)
    g = torch.Generator().manual_seed(5)
    cands = torch.stack([sample(backbone, prompts, 2, 2.0, g, eta=0.7) for _ in range(3)])  # (n, B, ...)
    values = torch.stack([brightness(c, prompts) for c in cands])  # (n, B)
    pick = values.argmax(0)
    assert len(set(pick.tolist())) > 1  # the test exercises a per-prompt choice
    assert torch.equal(z, cands[pick, torch.arange(3)]) and torch.equal(scores, values.max(0).values)
    one, _ = best_of_n(backbone, prompts, 2, 2.0, torch.Generator().manual_seed(5), brightness, n=1, eta=0.7)
    assert torch.equal(one, cands[0])
    with pytest.raises(ValueError, match="n \\(best-of-N candidates\\) must be an integer >= 1"):
        best_of_n(backbone, prompts, 2, 2.0, None, brightness, n=0)


# ---- counting mode ---------------------------------------------------------------------------------------------
def test_flop_counter_matches_closed_forms():
    x = torch.empty(8, 32, device="meta")
    with counting.FlopCounter() as fc:
        F.linear(x, torch.empty(16, 32, device="meta"))
    assert fc.get_total_flops() == 2 * 8 * 32 * 16
    img = torch.empty(2, 3, 10, 10, device="meta")
    with counting.FlopCounter() as fc:
        F.conv2d(img, torch.empty(5, 3, 3, 3, device="meta"), padding=1)
    assert fc.get_total_flops() == 2 * (2 * 5 * 10 * 10) * (3 * 3 * 3)
    b, h, s, d = 2, 4, 256, 16
    q = torch.empty(b, h, s, d, device="meta", requires_grad=True)
    k, v = torch.empty(b, h, s, d, device="meta"), torch.empty(b, h, s, d, device="meta")
    saved_math, saved_fused = counting.SavedActivations(), counting.SavedActivations()
    with counting.FlopCounter() as fc, saved_math():
        F.scaled_dot_product_attention(q.view_as(q), k, v)
    math_flops = fc.get_total_flops()
    with counting.FusedAttention(), counting.FlopCounter() as fc, saved_fused():
        out = F.scaled_dot_product_attention(q.view_as(q), k, v)
        torch.autograd.grad(out.sum(), q)
    assert math_flops == fc.get_flop_counts()["Global"][torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] \
        == 2 * (2 * b * h * s * s * d)
    assert fc.get_total_flops() > math_flops  # the backward is counted too
    assert saved_math.bytes >= b * h * s * s * 4 > saved_fused.bytes  # no N² probabilities saved


def test_count_orders_the_methods_on_tiny_models():
    rows = counting.count(ModelSpec("tiny:sd3"), RewardSpec("tiny:clip"), GuidanceConfig(value_i=3, value_j=2),
                          resolutions=(64,), progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == set(counting.COUNTED) and all(r["resolution"] == 64 for r in rows)
    flops = {m: r["tflops_per_step"] for m, r in by.items()}
    assert flops["dps-tweedie"] > flops["dps-stitchvm"] > flops["unguided"] > 0
    saved = {m: r["saved_activation_gb"] for m, r in by.items()}
    assert saved["dps-tweedie"] > saved["dps-stitchvm"] > 0
    assert saved["unguided"] == saved["fk-tweedie"] == saved["fk-stitchvm"] == 0  # no autograd
    r = counting.ratios(rows)["64"]
    assert r["tweedie_over_stitchvm_flops"] > 1 and r["stitchvm_over_tweedie_saved"] < 1


def test_count_mode_json_on_the_arch_presets(tmp_path):
    prof = profile(tmp_path, methods=["unguided", "dps-tweedie", "dps-stitchvm"])
    report = bench(prof, str(tmp_path / "count.json"), count=True, progress=False, resolutions=(64,))
    written = json.loads((tmp_path / "count.json").read_text())
    assert written["device"].startswith("meta") and written["backbone"] == "arch:sd3.5-medium"
    assert [r["method"] for r in written["rows"]] == ["unguided", "dps-tweedie", "dps-stitchvm"]
    for row in written["rows"]:
        assert row["resolution"] == 64 and math.isfinite(row["tflops_per_step"]) and row["tflops_per_step"] > 0
        assert math.isfinite(row["saved_activation_gb"])
    assert report["ratios"]["64"]["tweedie_over_stitchvm_flops"] > 1


# ---- the stage -------------------------------------------------------------------------------------------------
def test_guidance_stage_writes_report_grids_and_mlflow(tmp_path):
    from stitchvm.stages import guidance, prompts
    from stitchvm.stages.runtime import Paths, models
    from stitchvm.value.model import StitchedValueModel

    params = from_dict(Params, {**TINY, "storage": {"root": str(tmp_path / "data")},
                                "guidance": {**SMALL_GUIDANCE, "methods": ["unguided", "dps-stitchvm", "best-of-n"]},
                                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "g"}})
    paths = Paths.from_params(params, reports=tmp_path / "reports", track=True)
    with pytest.raises(FileNotFoundError, match="run the `train` stage first"):
        guidance.run(params, paths, progress=False)
    prompts.run(params, paths)
    backbone, reward = models(params)
    StitchedValueModel(backbone, reward, 3, 2).save_pretrained(tmp_path / "data" / "value_model")
    summary = guidance.run(params, paths, progress=False)
    report = json.loads((tmp_path / "reports" / "guidance.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["unguided", "dps-stitchvm", "best-of-n"]
    assert report["value_model"]["i"] == 3 and len(report["prompts"]) == 1
    # timings, the device and the value model's folder are the run record's (DVC hashes guidance.json)
    record = json.loads((tmp_path / "reports" / "runs" / "guidance.json").read_text())
    assert not any({"sec_per_sample", "peak_mem_mb"} & set(r) for r in report["rows"])
    assert "device" not in report and "path" not in report["value_model"]
    assert [r["method"] for r in record["rows"]] == [r["method"] for r in report["rows"]]
    assert all(r["sec_per_sample"] > 0 for r in record["rows"]) and record["mlflow"] == summary["mlflow"]
    for png in [summary["grid"], *summary["grids"].values()]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(summary["grids"]) == {"guidance/dps-stitchvm.png", "guidance/best-of-n.png"}
    assert set(summary["reward_gain"]) == {"dps-stitchvm", "best-of-n"} and summary["reward_gain"]["best-of-n"] >= 0
    assert summary["mlflow"]["logged"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow"]["run_id"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"guidance.json", "guidance.png", "guidance"}
    assert "guidance/dps-stitchvm/reward_mean" in client.get_run(run_id).data.metrics


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance, message", [
    ({"methods": ["dps-foo"]}, "guidance: unknown method 'dps-foo'"),
    ({"methods": []}, "guidance: methods must name at least one method"),
    ({"schedule_stitchvm": "window:0.9:0.1"}, "guidance: schedule 'window:0.9:0.1' is not"),
    ({"scale_tweedie": -1}, "guidance: guidance scales must be >= 0"),
    ({"eta": 1.5}, "guidance: eta must lie in"),
    ({"window": [0.5]}, "guidance: window must be"),
    ({"best_of_n": 0}, "guidance: best_of_n must be >= 1"),
    ({"steps": "ten"}, "guidance.steps: expected int"),
    ({"methods": ["unguided", "best-of-n-matched", "fk-stitchvm"]},
     "best-of-n-matched must come after unguided and fk-stitchvm"),
])
def test_guidance_config_fails_with_the_key_path(guidance, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Params, {"guidance": guidance})
    assert from_dict(Params, {"guidance": {"schedule_tweedie": "power:1.5"}}).guidance.schedule_tweedie == "power:1.5"


def test_geneval_uncertainty_is_stratified_by_category_with_the_prompt_as_the_unit():
    from statistics import variance

    from stitchvm.benchmarks.geneval_uncertainty import macro_mean_se, paired_differences, verdicts_by_prompt

    prompts = ["p", "q", "r", "p", "q", "r"]
    a = verdicts_by_prompt([True, False, True, True, True, False], prompts)
    assert a == {"p": [1, 1], "q": [0, 1], "r": [1, 0]}
    category_of = {"p": "counting", "q": "counting", "r": "position"}
    # counting: prompts p, q (accuracies 1, 0.5) are the units; position: one prompt, its two samples are
    mean_, se = macro_mean_se(a, category_of)
    assert mean_ == pytest.approx((0.75 + 0.5) / 2)
    assert se == pytest.approx(math.sqrt(variance([1.0, 0.5]) / 2 + variance([1, 0]) / 2) / 2)
    assert macro_mean_se({"p": [1]}, {"p": "counting"}) == (1.0, None)
    # the same estimator as the evaluator's overall score (mean over categories of the fraction correct)
    from stitchvm.world.evaluation import accuracy_by_category
    flat = [v for p in a for v in a[p]]
    cats = [category_of[p] for p in a for _ in a[p]]
    assert mean_ == pytest.approx(accuracy_by_category(torch.tensor(flat, dtype=torch.bool), cats)["overall"])
    b = {"p": [0, 0], "q": [0, 1], "r": [1, 1]}
    rows = [{"method": "fk-stitchvm", "verdicts": a}, {"method": "fk-tweedie", "verdicts": b},
            {"method": "unguided"}]  # a row without verdicts (no evaluator) is left out of the pairs
    (d,) = paired_differences(rows, category_of)
    assert (d["a"], d["b"]) == ("fk-stitchvm", "fk-tweedie")
    assert d["diff"] == pytest.approx(macro_mean_se(a, category_of)[0] - macro_mean_se(b, category_of)[0])
    per_prompt_counting = [1.0, 0.0]  # p: 1 - 0, q: 0.5 - 0.5
    per_sample_position = [0, -1]  # r: (1 - 1, 0 - 1)
    assert d["se"] == pytest.approx(math.sqrt(variance(per_prompt_counting) / 2 + variance(per_sample_position) / 2)
                                    / 2)
    assert d["z"] == pytest.approx(d["diff"] / d["se"])
    with pytest.raises(ValueError, match="different prompts"):
        paired_differences([rows[0], {"method": "fk-tweedie", "verdicts": {"p": [1], "s": [0]}}], category_of)


def test_bench_align_takes_the_profiles_own_prompt_split(tmp_path):
    """A profile on another's storage root with more test prompts evaluates on all of them (not the stored table's)."""
    from stitchvm.benchmarks.align import _prompts
    from stitchvm.stages.prompts import prompt_table
    from stitchvm.stages.upstream import PROMPTS

    from stitchvm.data.storage import open_root

    params = from_dict(Params, {"storage": {"root": str(tmp_path)}, "prompts": {"train": 4, "val": 0, "test": 2},
                                "align": {"eval_prompts": 33}})
    open_root(str(tmp_path)).write_table(PROMPTS, prompt_table(params))  # the stored split: 2 test prompts
    wide = dataclasses.replace(params, prompts=dataclasses.replace(params.prompts, test=9))
    train, evaluation = _prompts(wide)
    assert len(evaluation) == 9 and len(_prompts(params)[1]) == 2
    assert train == _prompts(params)[0]  # the same training prompts: only the evaluation widens
