"""Issue 17, deterministic outputs: what DVC hashes is a pure function of params, code and inputs; the run's facts
(times, memory, device, run ids, folders) go to the run records. The two-clone `dvc repro` check is the e2e test in
tests/test_dvc.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stitchvm.stages.evaluate import TIMED, split_report
from stitchvm.stages.run_record import join_rows, read_record, repo_relative, split_rows, write_record
from stitchvm.stages.upstream import read_train_run

ROOT = Path(__file__).resolve().parents[1]
SAVE_ADAPTER = """
import sys
from stitchvm.config import ModelSpec
from stitchvm.models.backbone import build_backbone
from stitchvm.models.lora import LoraPolicy
LoraPolicy(build_backbone(ModelSpec("tiny:sd3")), rank=2, alpha=4).save(sys.argv[1])
"""


def _save_adapter(folder: Path, hash_seed: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(folder)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return (folder / "adapter_config.json").read_bytes()


def test_adapter_config_is_byte_identical_under_any_hash_seed(tmp_path):
    """peft keeps target_modules as a set: written as it iterates, its order would follow PYTHONHASHSEED."""
    with ThreadPoolExecutor(2) as pool:  # two processes side by side: about one process's wall time
        first, second = pool.map(lambda seed: _save_adapter(tmp_path / seed, seed), ("1", "2"))
    assert first == second
    assert json.loads(first)["target_modules"] == sorted(json.loads(first)["target_modules"])


def test_eval_report_splits_into_metrics_and_run_record():
    rows = [{"sigma": s, "method": m, "spearman": 0.5, "ms_per_eval": 1.0 + s, "peak_mem_mb": 30.0}
            for s in (0.1, 0.5) for m in ("stitchvm", "tweedie")]
    report = {"eval": rows, "trivial_loss": 1.0, "monte_carlo": {"rollouts": 2, "sigmas": [0.5]}}
    quality, record = split_report(report)
    assert not any(set(TIMED) & set(r) for r in quality["eval"]) and quality["trivial_loss"] == 1.0
    assert quality["monte_carlo"] == {"rollouts": 2, "sigmas": [0.5]} and set(record) == {"eval"}
    assert join_rows(quality["eval"], record["eval"], ("sigma", "method")) == rows  # nothing lost
    assert report["eval"] is rows  # the returned report keeps everything


def test_rows_without_a_timed_row_join_unchanged():
    rows, timed = split_rows([{"method": "a", "x": 1, "t": 2}], ("t",), key=("method",))
    assert (rows, timed) == ([{"method": "a", "x": 1}], [{"method": "a", "t": 2}])
    assert join_rows([{"method": "b", "x": 3}], timed, ("method",)) == [{"method": "b", "x": 3}]
    assert join_rows(rows, None, ("method",)) == rows


def test_paths_in_reports_are_relative_to_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_relative(tmp_path / "data" / "value_model") == "data/value_model"
    assert repo_relative("reports/align.json") == "reports/align.json"
    assert repo_relative("s3://bucket/prefix/adapter") == "s3://bucket/prefix/adapter"
    assert repo_relative(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


def test_train_run_is_read_from_its_run_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the `train` stage first"):
        read_train_run(tmp_path)
    write_record(tmp_path, "train", {"seconds": 1.5, "run_id": "abc", "model_version": "3", "tracking_uri": "x"})
    assert read_train_run(tmp_path) == {"run_id": "abc", "model_version": "3", "tracking_uri": "x"}
    assert read_record(tmp_path, "train")["seconds"] == 1.5 and read_record(tmp_path, "align") is None
