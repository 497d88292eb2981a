"""The Dagster front-end on real Dagster: in-process materialisation of every asset and check, the asset graph vs
the stage DAG, workspace.yaml and `dagster asset materialize --select '*'` on the command line, failing checks.
The world's bootstrap assets are not materialised here (tests/test_world_stages.py trains a reduced world)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from dagster import AssetCheckSeverity, AssetKey, AssetSelection, DagsterInstance, Definitions, materialize
from mlflow.tracking import MlflowClient

import pipelines
import pipelines.world
from assets import MlflowResource, StitchVMResource
from stitchvm.stages import BOOTSTRAP, GRAPH

ROOT = Path(__file__).resolve().parents[1]

# tests/test_smoke.py's reduced run, one evaluation σ, and a gate loose enough to pass (so `champion` is exercised)
SMALL = {
    "prompts": {"train": 2, "val": 0, "test": 2},
    "samples": {"source": "smooth", "per_prompt": 8},
    "storage": {"shard_size": 8},
    "noisy": {"probe_size": 16, "sigmas": [0.5]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 10},
    "evaluate": {"batch_size": 8, "gate_sigma": 0.5, "min_spearman_within_prompt": -1.0, "max_loss_ratio": 100.0,
                 "mc_rollouts": 2, "mc_sigmas": [0.5]},
    "guidance": {"steps": 3, "prompts": 2, "per_prompt": 1, "particles": 2, "best_of_n": 2},
    "align": {"method": "nft-stitchvm", "updates": 2, "prompts_per_update": 1, "group_size": 2, "steps": 4,
              "eval_prompts": 1, "eval_seeds": [0], "eval_every": 1, "lora_rank": 4, "lora_alpha": 8},
}
MODEL = "stitchvm-value"
METADATA = {
    "prompts": {"dagster/row_count", "path", "splits", "preview"},
    "samples": {"dagster/row_count", "path", "shards", "shards_written", "shards_written_ids", "shards_rewritten",
                "shard_size", "shard_table", "source", "latent_shape"},
    "labels": {"dagster/row_count", "path", "shards", "shards_written", "shards_written_ids", "shards_rewritten",
               "shard_size", "shard_table", "reward", "tensor_shapes"},
    "noisy": {"dagster/row_count", "probe_rows", "eval_rows", "sigmas", "probe_path", "eval_path"},
    "search": {"pair", "best_error", "pairs_searched", "kernel", "path", "error_table", "heatmap"},
    "truth": {"rollouts", "sigmas", "dagster/row_count", "mean_value", "seconds", "reused", "path"},
    "train": {"steps", "seconds", "samples_per_s", "first_loss", "final_loss", "pair", "path", "curve",
              "mlflow_run_id", "model_version", "mlflow_run_url", "model_version_url"},
    "align": {"method", "reward_before", "reward_after", "sec_per_update", "adapter", "reward_vs_time", "before_after",
              "model_version", "mlflow_run_url"},
    "guidance": {"rows", "reward_gain", "pair", "device", "report", "samples", "vs_unguided/dps-stitchvm"},
    "evaluate": {"dagster/row_count", "eval_table", "spearman_within_prompt@0.5", "distill_loss@0.5", "trivial_loss",
                 "gate_passed", "gate_checks", "champion", "model_version", "report", "plot", "model_version_url",
                 "monte_carlo_ceiling@0.5"},
}
CHECKS = {("samples", "samples_checksums"), ("labels", "labels_checksums"), ("labels", "labels_finite"),
          ("labels", "labels_complete"), ("evaluate", "eval_gate")}
REPO_OUTPUTS = ("mlruns", "mlflow.db", "data", "reports", "checkpoints")


def write_params(path: Path, root: Path, tracking_uri: str) -> Path:
    path.write_text(yaml.safe_dump({**SMALL, "storage": {**SMALL["storage"], "root": str(root)},
                                    "mlflow": {"tracking_uri": tracking_uri, "registered_model": MODEL}}))
    return path


def dagster_home(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


def resources(params: Path, base: Path, tracking_uri: str | None = None) -> dict:
    return {"stitchvm": StitchVMResource(params_path=str(params), reports_dir=str(base / "reports"),
                                         checkpoints_dir=str(base / "checkpoints")),
            "mlflow": MlflowResource(tracking_uri=tracking_uri, ui_url="http://127.0.0.1:5000")}


def with_resources(res: dict) -> Definitions:
    """The code location's assets, checks and jobs, bound to test resources."""
    defs = pipelines.defs
    return Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, resources=res)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Telemetry off, a temporary DAGSTER_HOME and MLflow store, cwd in tmp (MLflow's ./mlruns lands there)."""
    before = {p: (ROOT / p).exists() for p in REPO_OUTPUTS}
    tmp = tmp_path_factory.mktemp("dagster")
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                           "HF_HUB_OFFLINE": "1", "DAGSTER_HOME": str(dagster_home(tmp / "dagster_home"))}.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_UI_URL", raising=False)
        mp.chdir(tmp)
        yield {"tmp": tmp, "uri": uri, "params": write_params(tmp / "params.yaml", tmp / "data", uri)}
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])
    for p in REPO_OUTPUTS:  # nothing of the runs may land in the repository
        assert (ROOT / p).exists() == before[p], f"a test run created {ROOT / p}"


@pytest.fixture(scope="module")
def run(env):
    """One in-process execution of the `stitchvm_all` job (every asset and check), shared by the tests."""
    defs = with_resources(resources(env["params"], env["tmp"], env["uri"]))
    instance = DagsterInstance.ephemeral()
    result = defs.resolve_job_def("stitchvm_all").execute_in_process(instance=instance)
    return result


def test_asset_graph_is_the_stage_graph():
    """The main location's graph is the stage DAG, the world's bootstrap stages as its external (shipped) assets;
    the `world` location (pipelines.world) retrains them with a job of one op per bootstrap stage, in DAG order."""
    graph = pipelines.defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(GRAPH)
    for name, upstream in GRAPH.items():
        assert {k.to_user_string() for k in graph.get(AssetKey(name)).parent_keys} == set(upstream), name
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {"prompts": "data", "samples": "data", "labels": "data", "noisy": "data",
                      "search": "model", "truth": "model", "train": "model", "evaluate": "model",
                      "guidance": "alignment", "align": "alignment", **{n: "world" for n in BOOTSTRAP}}
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == set(GRAPH) - set(BOOTSTRAP)
    pools = {name: pipelines.defs.resolve_assets_def(name).op.pool for name in GRAPH if name not in BOOTSTRAP}
    assert {n for n, p in pools.items() if p == "gpu"} == {"samples", "labels", "search", "truth", "train",
                                                                  "evaluate", "guidance", "align"}
    job_keys = pipelines.defs.resolve_job_def("stitchvm_all").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in job_keys} == set(GRAPH) - set(BOOTSTRAP)
    world = pipelines.world.defs.resolve_job_def("world_bootstrap").graph  # the retraining job: an op per stage
    assert {node.name for node in world.nodes} == set(BOOTSTRAP)
    assert {node.name: {d.node for d in deps.values()} for node, deps in world.dependencies.items()} == \
        {name: set(GRAPH[name]) for name in BOOTSTRAP}


@pytest.mark.e2e
def test_materialize_all_assets_with_metadata_and_passing_checks(run, env):
    assert run.success
    for name, keys in METADATA.items():
        (mat,) = run.asset_materializations_for_node(name)
        assert keys <= set(mat.metadata), f"{name}: missing {keys - set(mat.metadata)}"
    md = {name: run.asset_materializations_for_node(name)[0].metadata for name in GRAPH if name not in BOOTSTRAP}
    assert md["samples"]["dagster/row_count"].value == 4 * 8 and md["samples"]["shards"].value == 4
    assert md["samples"]["shards_written"].value == 4 and md["labels"]["dagster/row_count"].value == 32
    assert md["search"]["heatmap"].value.startswith("![stitch search heatmap](data:image/png;base64,iVBOR")
    assert md["search"]["error_table"].value.startswith("| i | j | error |")
    assert "| stitchvm |" in md["evaluate"]["eval_table"].value and "data:image/png" in md["evaluate"]["plot"].value
    assert "| monte-carlo |" in md["evaluate"]["eval_table"].value
    assert -1 <= md["evaluate"]["monte_carlo_ceiling@0.5"].value <= 1
    assert Path(md["evaluate"]["report"].value) == env["tmp"] / "reports" / "eval.json"

    evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in run.get_asset_check_evaluations()}
    assert set(evaluations) == CHECKS
    failed = {k: e.metadata for k, e in evaluations.items() if not e.passed}
    assert not failed

    # the registered version is the one in the metadata; the passing gate made it champion
    version = md["train"]["model_version"].value.split("/")[-1]
    assert md["evaluate"]["gate_passed"].value is True and md["evaluate"]["champion"].value is True
    client = MlflowClient(env["uri"], registry_uri=env["uri"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version
    assert client.get_run(md["train"]["mlflow_run_id"].value).info.status == "FINISHED"
    assert md["train"]["model_version_url"].value == f"http://127.0.0.1:5000/#/models/{MODEL}/versions/{version}"


@pytest.mark.e2e
def test_a_corrupted_shard_fails_the_checksum_check(run, env, tmp_path):
    """Truncate one samples shard of a copy of the materialised root; only the check runs (a re-materialisation
    would rewrite the shard)."""
    assert run.success
    shutil.copytree(env["tmp"] / "data", tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", env["uri"])
    shard = tmp_path / "data" / "samples" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    defs = with_resources(resources(params, tmp_path))
    result = materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=DagsterInstance.ephemeral(),
                         selection=AssetSelection.checks_for_assets("samples"), raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "samples_checksums" and not evaluation.passed
    assert evaluation.metadata["bad_paths"].value == [str(shard)]
    assert result.asset_materializations_for_node("samples") == []


@pytest.mark.e2e
def test_non_finite_labels_fail_the_finite_check(run, env, tmp_path):
    """A NaN score written consistently (its shard's sha256 updated) passes the checksums but not the finite check."""
    from stitchvm.data.storage import open_root, read_shards, write_shard

    assert run.success
    shutil.copytree(env["tmp"] / "data", tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", env["uri"])
    storage = open_root(str(tmp_path / "data"))
    tensors, index = read_shards(storage, "labels", shards=[1], progress=False)
    tensors["score"][3] = float("nan")
    write_shard(storage, "labels", 1, tensors, index.select(["sample_id", "prompt_id", "split"]), first_row=8)
    defs = with_resources(resources(params, tmp_path))
    result = materialize([*defs.assets, *defs.asset_checks], resources=defs.resources,
                         instance=DagsterInstance.ephemeral(), selection=AssetSelection.checks_for_assets("labels"),
                         raise_on_error=False)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["labels_checksums"].passed and evaluations["labels_complete"].passed
    assert not evaluations["labels_finite"].passed
    assert evaluations["labels_finite"].metadata["non_finite"].value == {"embeds": 0, "score": 1, "tokens": 0}


@pytest.mark.e2e
def test_a_failed_gate_is_a_warning(run, env, tmp_path):
    """The gate check reads reports/eval.json; a report whose gate failed gives a WARN-severity failure."""
    report = json.loads((env["tmp"] / "reports" / "eval.json").read_text())
    report["gate"] = {**report["gate"], "checks": {"spearman_within_prompt": False, "loss_below_trivial": True},
                      "passed": False}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "eval.json").write_text(json.dumps(report))
    defs = with_resources(resources(env["params"], tmp_path))
    result = materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=DagsterInstance.ephemeral(),
                         selection=AssetSelection.checks_for_assets("evaluate"), raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "eval_gate" and not evaluation.passed
    assert evaluation.severity == AssetCheckSeverity.WARN
    assert evaluation.metadata["spearman_within_prompt"].value is False


@pytest.mark.e2e
def test_the_dagster_cli_materializes_everything(env, tmp_path):
    """The command line, in a fresh DAGSTER_HOME, on a params file given through STITCHVM_PARAMS: workspace.yaml
    loads with its two code locations (what `dagster dev -w workspace.yaml` reads), and `dagster asset materialize
    --select '*'` on the main location runs every pipeline asset and check with the location's multiprocess executor
    (the world is external there: `*` selects no world asset, and nothing retrains it).

    `dagster asset materialize` has no -w/--workspace option in dagster 1.13 (it takes a single code location:
    -m/-f/--package-name), so it is pointed at the `pipelines` module that workspace.yaml names: an installed package,
    found from the temporary cwd (and by the executor's forkserver, which preloads it) without any path set up."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", uri)
    cli_env = {**os.environ, "STITCHVM_PARAMS": str(params), "STITCHVM_REPORTS": str(tmp_path / "reports"),
               "STITCHVM_CHECKPOINTS": str(tmp_path / "checkpoints"), "MLFLOW_TRACKING_URI": uri,
               "DAGSTER_HOME": str(dagster_home(tmp_path / "dagster_home"))}
    dagster = str(Path(sys.executable).with_name("dagster"))
    # loads only (side by side with the run); from the repository root, where `dagster dev -w workspace.yaml` runs;
    # its own DAGSTER_HOME, as two processes creating one sqlite storage collide
    validate = subprocess.Popen([dagster, "definitions", "validate", "-w", "workspace.yaml"], cwd=ROOT,
                                env={**cli_env, "DAGSTER_HOME": str(dagster_home(tmp_path / "validate_home"))},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc = subprocess.run([dagster, "asset", "materialize", "-m", "pipelines", "--select", "*"],
                              cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
        validated = validate.communicate(timeout=120)[0]
    finally:
        if validate.poll() is None:
            validate.kill()
    assert validate.returncode == 0, validated[-4000:]
    assert "Validation successful for code location stitchvm" in validated
    assert "Validation successful for code location world" in validated
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RUN_SUCCESS" in proc.stderr and "STEP_FAILURE" not in proc.stderr
    for name, check in CHECKS:
        assert f"Asset check '{check}' on '{name}' passed" in proc.stderr
    assert json.loads((tmp_path / "reports" / "eval.json").read_text())["gate"]["passed"]
    assert MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(MODEL, "champion").version is not None
    assert (tmp_path / "mlruns").is_dir()  # MLflow's artifacts went to the cwd, not the repository


def test_changed_params_rewrite_stale_shards_in_dagster(tmp_path):
    """A shard made by other params is not reused: after `seed` changes, materialising `samples` again rewrites
    every shard (metadata says which and why), and materialising it once more writes nothing."""
    from assets.data import prompts, samples

    def materialise(seed: int) -> dict:
        params = tmp_path / f"params{seed}.yaml"
        params.write_text(yaml.safe_dump({"seed": seed, **{k: SMALL[k] for k in ("prompts", "samples")},
                                          "storage": {**SMALL["storage"], "root": str(tmp_path / "data")}}))
        result = materialize([prompts, samples], resources=resources(params, tmp_path),
                             instance=DagsterInstance.ephemeral())
        assert result.success
        return result.asset_materializations_for_node("samples")[0].metadata

    first = materialise(0)
    assert first["shards_written"].value == 4 and first["shards_rewritten"].value == {}
    changed = materialise(1)
    assert changed["shards_written"].value == 4
    assert set(changed["shards_rewritten"].value) == {"0", "1", "2", "3"}
    assert all("made by other params" in why for why in changed["shards_rewritten"].value.values())
    assert materialise(1)["shards_written"].value == 0
