import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from stitchvm.__main__ import main
from stitchvm.config import load_params
from stitchvm.stages import BOOTSTRAP, GRAPH
from stitchvm.stages.tables import format_table

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prompts": {"train": 2, "val": 0, "test": 2},
    "samples": {"source": "smooth", "per_prompt": 8},
    "noisy": {"probe_size": 16, "sigmas": [0.1, 0.5, 0.9]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 10},
    "evaluate": {"batch_size": 8},
    # the consumers run in the smoke too: at the smallest sizes
    "guidance": {"steps": 2, "particles": 2, "best_of_n": 2, "prompts": 2, "per_prompt": 1, "batch_size": 2},
    "align": {"method": "nft-stitchvm", "updates": 1, "prompts_per_update": 1, "group_size": 2, "steps": 4,
              "eval_prompts": 1, "eval_seeds": [0], "batch_size": 2},
}

def _smoke(tmp_path: Path, params: dict, name: str) -> subprocess.CompletedProcess:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stitchvm", "smoke", "--params", str(f), "--out",
                           str(tmp_path / f"{name}.json"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_writes_the_report_and_is_deterministic(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    # the two runs side by side (each smoke process runs torch on one thread): the determinism check, two
    # independent processes on the same params, costs the wall time of about one run on a 2-core machine
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda name: _smoke(tmp_path, SMALL, name), ("a", "b")))
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "stitch search: chose (i, j)" in runs[0].stdout and "spearman_within_prompt" in runs[0].stdout
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert set(a["pair"]) == {"i", "j"}
    assert len(a["search"]) == 6 * 2 and all(set(r) == {"i", "j", "error"} for r in a["search"])
    assert [(r["sigma"], r["method"]) for r in a["eval"]] == [
        (s, m) for s in (0.1, 0.5, 0.9) for m in ("stitchvm", "tweedie")]
    keys = {"sigma", "method", "spearman", "spearman_within_prompt", "pearson", "ms_per_eval", "peak_mem_mb"}
    assert all(keys <= set(r) for r in a["eval"])
    # the built-in prompts carry categories: per-category rows; the world's evaluator judges only the world's
    # images (this run's backbone is tiny:sd3), so there is no `geneval` here
    assert a["by_category"] and set(a["by_category"]) <= {"single_object", "two_object", "counting", "colors",
                                                          "position", "color_attr"}
    assert a["params"]["backbone"]["source"] == "tiny:sd3" and "geneval" not in a
    # same params, same numbers (timings aside)
    strip = lambda rep: [{k: v for k, v in r.items() if k not in ("ms_per_eval", "peak_mem_mb")} for r in rep["eval"]]
    assert a["search"] == b["search"] and a["pair"] == b["pair"]
    np.testing.assert_equal(strip(a), strip(b))
    # every stage but the world bootstrap ran, the consumers included, with their results under their own keys
    assert list(a["timings_s"]) == [name for name in GRAPH if name not in BOOTSTRAP]
    assert [r["method"] for r in a["guidance"]["rows"]] == list(load_params(tmp_path / "a.yaml").guidance.methods)
    assert a["guidance"]["pair"] == a["pair"]
    assert a["align"]["method"] == "nft-stitchvm" and a["align"]["updates"] == 1
    assert {"reward_before", "reward_after"} <= set(a["align"])
    assert "guidance (" in runs[0].stdout and "align: nft-stitchvm, 1 updates" in runs[0].stdout


def test_bad_params_fail_with_the_key_path(tmp_path):
    run = _smoke(tmp_path, {"train": {"stpes": 3}}, "bad")
    assert run.returncode == 2
    assert "train.stpes: unknown key" in run.stderr


def test_smoke_defaults_to_the_smoke_profile_on_the_shipped_world(tmp_path, monkeypatch):
    params = load_params(ROOT / "profiles" / "smoke.yaml")
    assert (params.backbone.source, params.reward.source) == ("world:sd3", "world:clip")
    calls = []
    monkeypatch.setattr("stitchvm.smoke.run", lambda p, out, progress=True, threads=1: calls.append((p, out)))
    monkeypatch.chdir(ROOT)
    assert main(["smoke", "--out", str(tmp_path / "s.json")]) == 0
    assert calls == [(params, str(tmp_path / "s.json"))]
    calls.clear()
    assert main(["smoke", "--params", "params.yaml", "--out", str(tmp_path / "s.json")]) == 0
    assert calls[0][0] == load_params(ROOT / "params.yaml")


def test_format_table_right_aligns_and_formats_cells():
    rows = [{"method": "stitchvm", "spearman": 0.123456, "n": 3}, {"method": "tweedie", "spearman": None}]
    assert format_table(rows, ["method", "missing", "spearman", "n"]).splitlines() == [
        "  method  spearman  n",
        "stitchvm    0.1235  3",
        " tweedie         -  -",
    ]
    assert format_table(rows, ["method", "missing"], drop_missing=False).splitlines()[1] == "stitchvm        -"


def _fake_reports(folder: Path, consumers: bool = True) -> None:
    """The DVC metrics (quality only) and the run records (their timings, keyed by sigma and method / by method)."""
    (folder / "runs").mkdir(parents=True)
    rows = [{"sigma": s, "method": m, "spearman": 0.5, "spearman_within_prompt": 0.25, "pearson": 0.75,
             "distill_loss": 0.125, "recall_at_1": 1.0} for s in (0.1, 0.5) for m in ("stitchvm", "tweedie")]
    (folder / "runs" / "evaluate.json").write_text(json.dumps({
        "eval": [{"sigma": r["sigma"], "method": r["method"], "ms_per_eval": 1.5, "peak_mem_mb": 30.0} for r in rows]}))
    (folder / "eval.json").write_text(json.dumps({
        "eval": rows, "trivial_loss": 1.177, "teacher_recall_at_1": 0.99,
        "gate": {"sigma": 0.5, "checks": {"spearman_within_prompt": False, "loss_below_trivial": True},
                 "passed": False},
        "by_sigma": {"stitchvm": {"sigma_0.1": {"spearman": 0.5}}}}))
    if consumers:
        (folder / "guidance.json").write_text(json.dumps({
            "value_model": {"i": 6, "j": 1},
            "rows": [{"method": m, "reward_mean": r, "reward_std": 1.0, "samples": 24, "steps": 10}
                     for m, r in (("unguided", 13.03), ("dps-stitchvm", 13.28))]}))
        (folder / "runs" / "guidance.json").write_text(json.dumps({
            "device": "cpu", "value_model": {"path": "data/value_model"},
            "rows": [{"method": m, "sec_per_sample": t, "peak_mem_mb": 16.0}
                     for m, t in (("unguided", 0.01), ("dps-stitchvm", 0.03))]}))
        (folder / "align.json").write_text(json.dumps({
            "method": "nft-stitchvm", "updates": 60, "reward_before": 11.12, "reward_after": 11.66,
            "reward_gain": 0.54, "curve": [{"step": 0, "eval_reward": 11.12}]}))
        (folder / "runs" / "align.json").write_text(json.dumps({
            "sec_per_update": 1.47, "curve": [{"step": 0, "wall_s": 0.0}]}))


def test_summary_prints_the_evaluation_and_where_the_outputs_are(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reports = tmp_path / "reports"
    _fake_reports(reports)
    assert main(["summary", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("sigma"))
    assert header.split() == ["sigma", "method", "spearman", "spearman_within_prompt", "pearson", "recall_at_1",
                              "distill_loss", "ms_per_eval", "peak_mem_mb"]
    assert sum(line.split()[:2] in (["0.1", "stitchvm"], ["0.5", "tweedie"]) for line in lines) == 2
    assert "(i, j) = (6, 1)" in out and "gate at sigma 0.5: not passed" in out
    assert "dps-stitchvm" in out and "11.12 -> 11.66" in out
    # the timings come from the run records, each on its own row
    guidance = next(line for line in lines if line.split()[:1] == ["dps-stitchvm"])
    assert guidance.split()[1:3] == ["0.03", "16"] and "1.47 s/update" in out
    assert f"{reports}/runs/" in out
    assert max(len(line) for line in lines) < 160  # short lines, not `dvc metrics show`'s thousands of columns
    params = load_params(ROOT / "params.yaml")
    for where in (f"{reports}/", f"{params.storage.root}/value_model", f"{params.storage.root}/adapter", "mlflow.db",
                  f"`{params.mlflow.registered_model}`"):
        assert where in out, where


def test_summary_without_consumers_or_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    reports = tmp_path / "reports"
    _fake_reports(reports, consumers=False)
    assert main(["summary", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert "stitchvm" in out and "guidance (" not in out and "align (" not in out and "/adapter" not in out
    (reports / "eval.json").unlink()
    assert main(["summary", "--reports", str(reports)]) == 1
    assert "eval.json" in capsys.readouterr().err


PROGRESS = """
import time
from stitchvm.progress import tqdm
bar = tqdm(range(200), desc="steps")
for i in bar:
    bar.set_postfix(loss=i / 7)
    time.sleep(0.002)
print("done", flush=True)
"""


def _progress(**env) -> subprocess.CompletedProcess:
    """The loop above with stdout and stderr to pipes; bytes decoded as they are (text mode would turn \r into \n)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STITCHVM_PROGRESS")} | env
    run = subprocess.run([sys.executable, "-c", PROGRESS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=120)
    run.stdout, run.stderr = run.stdout.decode(), run.stderr.decode()
    return run


def test_progress_bars_write_plain_lines_where_stderr_is_not_a_terminal():
    run = _progress()
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n"
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr  # no redraws: one line per report
    assert len(lines) == 2, run.stderr  # start and end: a 0.5 s loop is well within the 30 s between lines
    assert lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%") and "200/200" in lines[-1]
    faster = _progress(STITCHVM_PROGRESS_INTERVAL="0.1")  # a shorter interval: more lines, still plain
    assert "\r" not in faster.stderr and len(faster.stderr.splitlines()) > 2
    assert _progress(STITCHVM_PROGRESS="0").stderr == ""  # off
    assert "\r" in _progress(STITCHVM_PROGRESS="1").stderr  # forced: tqdm's own live bar
