"""The Kubernetes example (deploy/k8s/): its definitions load as `dagster definitions validate` loads them, and
they agree with the Helm values on the GPUs of a run pod (the torchrun processes of the data-parallel stages)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import Definitions

import pipelines

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


def k8s_definitions():
    spec = importlib.util.spec_from_file_location("stitchvm_k8s_definitions", K8S / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_k8s_location_is_the_pipeline_with_a_gpu_per_torchrun_process():
    module = k8s_definitions()
    Definitions.validate_loadable(module.defs)
    assert {k.to_user_string() for k in module.defs.resolve_asset_graph().get_all_asset_keys()} == \
        {k.to_user_string() for k in pipelines.defs.resolve_asset_graph().get_all_asset_keys()}
    assert module.defs.resources["stitchvm"].nproc == module.GPUS
    job = module.defs.resolve_job_def("stitchvm_all")
    limits = json.loads(job.tags["dagster-k8s/config"])["container_config"]["resources"]["limits"]
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    assert int(limits["nvidia.com/gpu"]) == int(launcher["limits"]["nvidia.com/gpu"]) == module.GPUS
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    grpc = {d["name"]: d["dagsterApiGrpcArgs"] for d in values["dagster-user-deployments"]["deployments"]}
    assert grpc["stitchvm"][:2] == ["-f", "deploy/k8s/definitions.py"]
    assert grpc["world"][:2] == ["-m", "pipelines.world"]


@pytest.mark.e2e
def test_dagster_definitions_validate_loads_the_k8s_example(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = str(Path(sys.executable).with_name("dagster"))
    proc = subprocess.run([dagster, "definitions", "validate", "-f", "deploy/k8s/definitions.py"], cwd=ROOT,
                          env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "All code locations passed validation" in proc.stderr + proc.stdout
