"""The DVC front-end: dvc.yaml is the stage DAG of stitchvm.stages.GRAPH, and real `dvc repro` / `dvc exp run` work.

The end-to-end tests run real DVC in a real git repository under tmp_path (the repo's stitchvm/, dvc.yaml and DVC
project files, a reduced params.yaml); nothing is written into the checkout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stitchvm.stages import BOOTSTRAP, GRAPH

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: its dvc, and its python for the stage commands
DVC = str(VENV_BIN / "dvc")
REGISTERED = "stitchvm-value"
# the embedded default, shrunk to about a minute of CPU over the 7 stage subprocesses (storage.root stays `data`)
REDUCED = {
    "prompts": {"train": 2, "val": 0, "test": 2},
    "samples": {"source": "smooth", "per_prompt": 8},
    "noisy": {"probe_size": 16, "sigmas": [0.1, 0.5, 0.9]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 12, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 6, "fit": {"steps": 4, "batch_size": 8}},
    "evaluate": {"batch_size": 8, "mc_rollouts": 2, "mc_sigmas": [0.5]},
    "guidance": {"steps": 3, "prompts": 2, "per_prompt": 1, "particles": 2, "best_of_n": 2},
    "align": {"method": "nft-stitchvm", "updates": 2, "prompts_per_update": 1, "group_size": 2, "steps": 4,
              "eval_prompts": 1, "eval_seeds": [0], "eval_every": 1, "lora_rank": 4, "lora_alpha": 8},
}
EXP_STEPS = 6


# ---- dvc.yaml, read as plain YAML ---------------------------------------------------------------------------------
def _paths(entries) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (each entry a path or a one-key mapping {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _keys(entries) -> list[str]:
    """Param keys of a `params` list (plain keys; a {file: [keys]} mapping contributes its keys)."""
    out = []
    for e in entries or []:
        out += [e] if isinstance(e, str) else [k for keys in e.values() for k in keys]
    return out


def _under(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def dvc_edges(stages: dict) -> dict[str, set[str]]:
    """stage -> the stages it depends on: a dep equal to, under or above one of their outputs (as DVC builds its DAG)."""
    outs = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
            for name, s in stages.items()}
    return {name: {other for other, o in outs.items() if other != name
                   for dep in _paths(s.get("deps")) for out in o if _under(dep, out) or _under(out, dep)}
            for name, s in stages.items()}


def test_dvc_yaml_is_the_stage_graph():
    stages = dvc_stages()
    assert list(stages) == list(GRAPH)
    assert dvc_edges(stages) == {name: set(up) for name, up in GRAPH.items()}


def test_dvc_stages_call_the_library_and_name_real_files_and_params():
    stages, params = dvc_stages(), yaml.safe_load((ROOT / "params.yaml").read_text())
    outs = [o for s in stages.values() for o in _paths(s.get("outs")) + _paths(s.get("metrics"))]
    for name, s in stages.items():
        assert re.fullmatch(rf"python -m stitchvm( --no-progress)? {name}( --no-progress)?", s["cmd"]), s["cmd"]
        deps = _paths(s["deps"])
        assert f"stitchvm/stages/{name}.py" in deps
        for dep in deps:  # code (a file or a folder of data files) that exists, or an upstream output
            assert (ROOT / dep).exists() or any(_under(dep, o) for o in outs), f"{name}: dep {dep} is neither"
        for key in _keys(s.get("params")):  # DVC refuses a stage whose param key is not in params.yaml
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: param {key} is not in params.yaml"
                node = node[part]
        for out in _paths(s.get("outs")) + _paths(s.get("metrics")):  # shared state stays out of DVC
            assert not any(_under(out, p) for p in ("mlflow.db", "mlruns", "checkpoints")), out
    assert _paths(stages["evaluate"]["metrics"]) == ["reports/eval.json"]
    # the prompt source is a dep whatever it is: the built-in set's module, or a file under the committed prompts/
    assert {"stitchvm/world/prompt_set.py", "prompts"} <= set(_paths(stages["prompts"]["deps"]))
    # the run records (timings, run ids) are never DVC's: DVC would hash them
    assert not any(_under(p, "reports/runs") for s in stages.values()
                   for p in _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")))
    # the shipped world is never rebuilt by `dvc repro` (not even -f): only `make world` unfreezes its stages
    assert {name for name, s in stages.items() if s.get("frozen")} == set(BOOTSTRAP)
    top = {k: v for e in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
           for k, v in ([(e, None)] if isinstance(e, str) else e.items())}
    assert top["reports/eval_plot.json"]["x"] == "sigma"
    assert top["reports/eval_plot.json"]["y"] == ["stitchvm", "tweedie"]
    assert "reports/eval.png" in top


# ---- real DVC in a git repository under tmp_path --------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env(cwd: Path) -> dict:
    """The venv first on PATH, telemetry off, and DVC's global/system config and site cache beside the project."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONPATH"}
    home = cwd.parent / f"{cwd.name}-dvc-home"
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PYTHONUNBUFFERED="1",
               DVC_SITE_CACHE_DIR=str(home / "site-cache"), DVC_GLOBAL_CONFIG_DIR=str(home / "global"),
               DVC_SYSTEM_CONFIG_DIR=str(home / "system"))
    return env


def _run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(list(args), cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, f"{' '.join(args)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run


def _ran(run: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", run.stdout + run.stderr)


needs_dvc = pytest.mark.skipif(not (VENV_BIN / "dvc").is_file() or shutil.which("git") is None,
                               reason="needs dvc beside the test interpreter (the `pipeline` extra) and git")


@pytest.fixture(scope="module")
def project(dvc_project):
    """The session's project (conftest.py builds it once with build_project; tests/test_readme.py reads it too)."""
    return dvc_project


def build_project(tmp_path_factory) -> dict:
    """A fresh git repository holding the project's code and DVC files, after one `dvc repro` on reduced params."""
    root = tmp_path_factory.mktemp("dvc-project")
    shutil.copytree(ROOT / "stitchvm", root / "stitchvm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "prompts", root / "prompts")  # a dep of `prompts`
    (root / ".dvc").mkdir()
    # dvc.lock too: the shipped world is up to date with it, so repro skips the (long) bootstrap stages, as for a user
    (root / "reports").mkdir()
    world_reports = [p.relative_to(ROOT) for p in (ROOT / "reports").glob("world*")]  # the bootstrap's metrics
    for name in ("dvc.yaml", "dvc.lock", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", *world_reports):
        shutil.copy2(ROOT / name, root / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), REDUCED)
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"  # relative: each clone of the project tracks its own runs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, "git", "init", "-q")
    for key, value in (("user.name", "stitchvm tests"), ("user.email", "tests@stitchvm.invalid")):
        _run(root, "git", "config", key, value)  # in the repo's own config: `dvc exp run` commits too
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "project")
    first = _run(root, DVC, "repro")
    # what this repro recorded, before later tests change the workspace (`dvc exp run`)
    recorded = {name: (root / name).read_bytes() for name in ("dvc.lock", *_metrics(dvc_stages()))}
    return {"root": root, "params": params, "first": first, "recorded": recorded}


def _metrics(stages: dict) -> list[str]:
    return [m for s in stages.values() for m in _paths(s.get("metrics"))]


def _out_hashes(lock: bytes) -> dict[str, str]:
    """path -> md5 of every out in a dvc.lock (metrics and plots are outs there too)."""
    return {o["path"]: o["md5"] for s in yaml.safe_load(lock)["stages"].values() for o in s.get("outs", [])}


def _registry(project) -> dict:
    """alias -> version of the registered value model in the project's MLflow store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project['root'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # an earlier test may have set the global registry
    return dict(client.get_registered_model(REGISTERED).aliases)


@needs_dvc
@pytest.mark.e2e
def test_repro_runs_every_stage_and_writes_the_report(project):
    root, sigmas = project["root"], project["params"]["noisy"]["sigmas"]
    assert _ran(project["first"]) == [name for name in GRAPH if name not in BOOTSTRAP]
    report = json.loads((root / "reports/eval.json").read_text())
    assert sorted((r["sigma"], r["method"]) for r in report["eval"]) == sorted(
        [(s, m) for s in sigmas for m in ("stitchvm", "tweedie")] + [(0.5, "monte-carlo")])
    assert report["monte_carlo"]["rollouts"] == 2 and report["monte_carlo"]["sigmas"] == [0.5]
    assert all(-1 <= r["spearman_within_prompt_vs_mc"] <= 1 for r in report["eval"]
               if r["sigma"] == 0.5 and r["method"] != "monte-carlo")
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == set(GRAPH)
    # the shipped world matches dvc.lock: its bootstrap stages are up to date without running
    assert "up to date" in _run(root, DVC, "status", "--with-deps", "world_report").stdout
    assert (root / "reports/eval_plot.json").is_file() and (root / "reports/eval.png").is_file()
    assert (root / "data/value_model/config.json").is_file()


@needs_dvc
@pytest.mark.e2e
def test_dvc_builds_the_same_dag(project):
    dot = _run(project["root"], DVC, "dag", "--dot").stdout
    edges = set(re.findall(r'"?([\w-]+)"?\s*->\s*"?([\w-]+)"?', dot))
    assert edges == {(up, name) for name, ups in GRAPH.items() for up in ups}


@needs_dvc
@pytest.mark.e2e
def test_second_repro_runs_nothing(project):
    again = _run(project["root"], DVC, "repro")
    assert _ran(again) == [] and "up to date" in again.stdout


@needs_dvc
@pytest.mark.e2e
def test_train_and_evaluate_publish_to_the_registry(project):
    root = project["root"]
    summary = json.loads((root / "reports/runs/train.json").read_text())  # the run record names the run and version
    assert "model_version" not in json.loads((root / "data/train/summary.json").read_text())
    aliases = _registry(project)
    assert str(aliases["candidate"]) == summary["model_version"]
    if json.loads((root / "reports/eval.json").read_text())["gate"]["passed"]:
        assert str(aliases["champion"]) == summary["model_version"]
    else:
        assert "champion" not in aliases


@needs_dvc
@pytest.mark.e2e
def test_metrics_and_plots_show(project):
    root = project["root"]
    assert "reports/eval.json" in _run(root, DVC, "metrics", "show").stdout
    _run(root, DVC, "plots", "show")
    html = (root / "dvc_plots/index.html").read_text()
    (title,) = [e["reports/eval_plot.json"]["title"] for e in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
                if isinstance(e, dict) and "reports/eval_plot.json" in e]
    assert title in html and "eval.png" in html
    assert '"field": "step"' not in html  # the σ plot is drawn once, from the top-level definition


@needs_dvc
@pytest.mark.e2e
def test_a_clean_clone_records_the_same_hashes_and_tracks_the_prompt_file(project, tmp_path):
    """Issue 17: every out is a pure function of params, code and inputs. A clean clone (its own DVC cache, MLflow
    store and checkpoints) reproduces the pipeline and records every out's md5 as the first repro did; the run facts
    went to the run records instead."""
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(project["root"]), str(clone))
    assert _ran(_run(clone, DVC, "repro")) == [name for name in GRAPH if name not in BOOTSTRAP]  # nothing restored
    first, again = _out_hashes(project["recorded"]["dvc.lock"]), _out_hashes((clone / "dvc.lock").read_bytes())
    assert set(again) == set(first)
    assert {p: again[p] for p in first if again[p] != first[p]} == {}, "outs that differ between two identical runs"
    for stage in ("train", "evaluate", "guidance", "align"):
        assert json.loads((clone / "reports/runs" / f"{stage}.json").read_text()), stage
    # `dvc metrics diff` between the two runs shows no change
    for key, value in (("user.name", "stitchvm tests"), ("user.email", "tests@stitchvm.invalid")):
        _run(clone, "git", "config", key, value)
    _run(clone, "git", "add", "-A")
    _run(clone, "git", "commit", "-q", "-m", "second run")
    for name in _metrics(dvc_stages()):
        (clone / name).write_bytes(project["recorded"][name])
    assert json.loads(_run(clone, DVC, "metrics", "diff", "--json").stdout or "{}") == {}

    # the prompt file is a dependency of `prompts`: editing it makes `dvc status` report the stage changed
    (clone / "prompts/e2e.txt").write_text("".join(f"prompt number {k}\n" for k in range(6)))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["prompts"]["source"] = "prompts/e2e.txt"
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(clone, DVC, "repro", "--single-item", "prompts")
    assert "prompts" not in _run(clone, DVC, "status", "prompts").stdout
    with open(clone / "prompts/e2e.txt", "a") as f:
        f.write("one more prompt\n")
    status = _run(clone, DVC, "status", "prompts").stdout
    assert "prompts:" in status and "changed deps" in status, status


@needs_dvc
@pytest.mark.e2e
def test_exp_run_reruns_only_train_and_its_consumers(project):  # last: it changes the workspace
    root = project["root"]
    before = _registry(project)["candidate"]
    exp = _run(root, DVC, "exp", "run", "-S", f"train.steps={EXP_STEPS}")
    assert _ran(exp)[0] == "train" and sorted(_ran(exp)) == ["align", "evaluate", "guidance", "train"]
    assert json.loads((root / "data/train/summary.json").read_text())["steps"] == EXP_STEPS
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["steps"] == EXP_STEPS
    assert int(_registry(project)["candidate"]) == int(before) + 1
