"""The shipped world in Dagster: external assets in the main code location (never materialised there), observed by
the sensor `world_observation` with a data version per part; retraining in the code location `pipelines.world`.
The workspace test loads workspace.yaml as `dagster dev` does and checks what the UI launches."""
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context

import pipelines
import pipelines.world
from assets import StitchVMResource
from stitchvm.models.world_source import SHIPPED
from stitchvm.stages import BOOTSTRAP, GRAPH

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = set(GRAPH) - set(BOOTSTRAP)


def test_the_main_location_observes_the_world_and_cannot_materialise_it():
    graph = pipelines.defs.resolve_asset_graph()
    for name in BOOTSTRAP:
        node = graph.get(AssetKey(name))
        assert node.group_name == "world" and not node.is_materializable and not node.is_executable, name
        assert {k.to_user_string() for k in node.parent_keys} == set(GRAPH[name])
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == PIPELINE  # "Materialize all"
    assert [s.name for s in pipelines.defs.sensors] == ["world_observation"]
    assert {j.name for j in pipelines.defs.jobs} == {"stitchvm_all"}


def test_the_world_location_retrains_the_world_with_a_job_and_defines_no_asset():
    assert not pipelines.world.defs.resolve_asset_graph().get_all_asset_keys()
    job = pipelines.world.defs.resolve_job_def("world_bootstrap")
    assert {node.name: {d.node for d in deps.values()} for node, deps in job.graph.dependencies.items()} == \
        {name: set(GRAPH[name]) for name in BOOTSTRAP}  # an op per stage, after its upstream stages


def tick(reports: Path, instance: DagsterInstance, cursor: str | None):
    """One evaluation of the sensor; its observations are recorded in `instance` as the daemon does."""
    context = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"stitchvm": StitchVMResource(reports_dir=str(reports))})
    result = pipelines.world_observation(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return {e.asset_key.to_user_string(): e for e in result.asset_events}, result.cursor


def recorded_version(instance: DagsterInstance, name: str) -> str:
    """The data version Dagster holds for asset `name` (the one downstream staleness is computed from)."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    record = instance.get_latest_data_version_record(AssetKey(name))
    return extract_data_version_from_entry(record.event_log_entry).value


def sha256_of(files: list[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: str(f.relative_to(base))):
        digest.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def test_the_sensor_records_each_part_with_the_hash_of_its_files(tmp_path, monkeypatch):
    """A copy of the shipped world has the shipped world's versions; an unchanged world records nothing; a changed
    part records a new version for that part alone; a missing part is recorded as missing, with its path."""
    world, reports = tmp_path / "world", tmp_path / "reports"
    shutil.copytree(SHIPPED, world)
    reports.mkdir()
    shutil.copy(ROOT / "reports" / "world.json", reports / "world.json")
    monkeypatch.setenv("STITCHVM_WORLD", str(world))
    instance = DagsterInstance.ephemeral()

    first, cursor = tick(reports, instance, None)
    assert set(first) == set(BOOTSTRAP)
    versions = {name: event.tags["dagster/data_version"] for name, event in first.items()}
    # the hash of each part's files, computed here from the writers' folders
    assert versions["world_clip"] == sha256_of([f for f in (world / "clip").rglob("*") if f.is_file()], world)
    assert versions["world_backbone"] == sha256_of(
        [f for part in ("scheduler", "tokenizer", "transformer") for f in (world / part).rglob("*") if f.is_file()],
        world)
    assert versions["world_report"] == sha256_of([reports / "world.json"], reports)
    report = json.loads((reports / "world.json").read_text())
    assert first["world_report"].metadata["evaluator_accuracy"].value == report["evaluator_accuracy"]
    assert first["world_evaluator"].metadata["evaluator_accuracy"].value == report["evaluator_accuracy"]
    assert first["world_report"].metadata["vae_psnr"].value == pytest.approx(report["vae_psnr"])
    for name, version in versions.items():  # recorded: the world is present on this instance
        assert recorded_version(instance, name) == version

    assert tick(reports, instance, cursor)[0] == {}  # nothing changed, nothing recorded

    head = world / "aesthetic.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + bytes([head.read_bytes()[-1] ^ 1]))
    (world / "evaluator.safetensors").unlink()
    changed, _ = tick(reports, instance, cursor)
    assert set(changed) == {"world_aesthetic", "world_evaluator"}
    assert changed["world_aesthetic"].tags["dagster/data_version"] not in ("missing", versions["world_aesthetic"])
    assert changed["world_evaluator"].tags["dagster/data_version"] == "missing"
    assert changed["world_evaluator"].metadata["missing"].value == [str(world / "evaluator.safetensors")]


def test_a_pipeline_materialisation_records_the_observed_world_version(tmp_path):
    """With the world observed, `samples` (below world_clip, world_vae, world_backbone) records their data versions
    as its inputs' versions: what Dagster compares to mark it stale after a part is retrained."""
    from dagster import materialize

    from assets.data import prompts, samples
    from assets.world import SPECS

    instance = DagsterInstance.ephemeral()
    observed, _ = tick(ROOT / "reports", instance, None)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"storage": {"root": str(tmp_path / "data"), "shard_size": 4},
                                  "prompts": {"train": 1, "val": 0, "test": 1},
                                  "samples": {"source": "smooth", "per_prompt": 4}}))
    result = materialize([*SPECS, prompts, samples], instance=instance, resources={"stitchvm": StitchVMResource(
        params_path=str(params), reports_dir=str(tmp_path / "reports"))})
    assert result.success
    (mat,) = result.asset_materializations_for_node("samples")
    for name in GRAPH["samples"]:
        expected = observed[name].tags["dagster/data_version"] if name in BOOTSTRAP else \
            recorded_version(instance, name)
        assert mat.tags[f"dagster/input_data_version/{name}"] == expected, name


@pytest.mark.e2e
def test_the_workspace_loads_both_locations_without_collisions(tmp_path, monkeypatch):
    """workspace.yaml as `dagster dev` loads it: the world's keys are defined once (external, in the main location),
    the UI finds no asset defined in two locations (it refuses to launch those), Dagster warns of no duplicate, the
    workspace's materialisable assets (the UI's "Materialize all") are the pipeline's, and the `world` location
    holds the job `world_bootstrap`."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(ROOT)
    query = ("query($keys: [AssetKeyInput!]!) { assetNodeDefinitionCollisions(assetKeys: $keys) "
             "{ assetKey { path } } }")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DagsterInstance.get() as instance, \
                WorkspaceProcessContext(instance, WorkspaceFileTarget([str(ROOT / "workspace.yaml")])) as process:
            context = process.create_request_context()
            entries = context.get_code_location_entries()
            assert {name: entry.load_error for name, entry in entries.items()} == {"stitchvm": None, "world": None}
            graph = context.asset_graph
            for name in BOOTSTRAP:
                infos = graph.get(AssetKey(name)).repo_scoped_asset_infos
                assert [(i.handle.location_name, i.asset_node.is_executable) for i in infos] == \
                    [("stitchvm", False)], name
            assert {k.to_user_string() for k in graph.materializable_asset_keys} == PIPELINE
            (world,) = entries["world"].code_location.get_repositories().values()
            assert world.has_job("world_bootstrap")
            result = execute_dagster_graphql(context, query, {"keys": [{"path": [n]} for n in GRAPH]})
            assert result.errors is None and result.data["assetNodeDefinitionCollisions"] == []
    assert not [w for w in caught if "multiple code locations" in str(w.message)]
