import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prompts": {"train": 2, "val": 0, "test": 2},
    "samples": {"source": "smooth", "per_prompt": 8},
    "noisy": {"probe_size": 16, "sigmas": [0.1, 0.5, 0.9]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 10},
    "evaluate": {"batch_size": 8},
}

def _smoke(tmp_path: Path, params: dict, name: str) -> subprocess.CompletedProcess:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stitchvm", "smoke", "--params", str(f), "--out",
                           str(tmp_path / f"{name}.json"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_writes_the_report_and_is_deterministic(tmp_path):
    runs = [_smoke(tmp_path, SMALL, name) for name in ("a", "b")]
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
    # same params, same numbers (timings aside)
    strip = lambda rep: [{k: v for k, v in r.items() if k not in ("ms_per_eval", "peak_mem_mb")} for r in rep["eval"]]
    assert a["search"] == b["search"] and a["pair"] == b["pair"]
    np.testing.assert_equal(strip(a), strip(b))


def test_bad_params_fail_with_the_key_path(tmp_path):
    run = _smoke(tmp_path, {"train": {"stpes": 3}}, "bad")
    assert run.returncode == 2
    assert "train.stpes: unknown key" in run.stderr
