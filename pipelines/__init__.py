"""The main Dagster code location: the pipeline's assets, checks, resources, the job `stitchvm_all`, and the shipped
world as external assets kept current by the sensor `world_observation`.

UI: `dagster dev -w workspace.yaml` from the repository root. Command line: `dagster asset materialize -m pipelines
--select '*'` (in dagster 1.13 that command takes a code location, -m/-f, not -w). `assets` and `pipelines` are
installed packages (`pip install -e .`), so both load from any working directory; relative paths (the params file,
reports, checkpoints, MLflow's ./mlruns) resolve against the working directory of the process.

The resources are configured through `dagster.EnvVar` (resolved when a run starts, shown as such in the UI):
STITCHVM_PARAMS / STITCHVM_REPORTS / STITCHVM_CHECKPOINTS (the params file and the local output folders) and
MLFLOW_TRACKING_URI / MLFLOW_UI_URL. A variable that is not set where the definitions load gives the default instead
(params.yaml, reports, checkpoints; no tracking URI, no UI links): Dagster fails a run on an unset EnvVar.

STITCHVM_NPROC=N (default 0) launches the data-parallel stages (samples, labels, train, align) under torchrun with N
processes through Dagster Pipes (assets/torchrun.py); the assets stay unpartitioned.

Steps run at most STITCHVM_MAX_CONCURRENT (default 2) at a time, and each step's torch takes STITCHVM_THREADS threads
(default: the machine's cores divided among those steps): a torch process takes every core by default, and two such
steps side by side ran 40× slower than one alone (the train step at 0.2 steps/s beside another step, 8.5 alone).

GPU stages share the `gpu` concurrency pool; set its limit to the number of GPUs of the machine with
`dagster instance concurrency set gpu <n>` (unlimited until set). Runs use the multiprocess executor (one process per
step, so independent assets such as `labels` and `noisy` run side by side); its step processes fork from a forkserver
that has imported this module (torch, diffusers, transformers) once, instead of each paying ~7 s of imports.

The world (group `world`) is shipped, not rebuilt here: its assets are external (not materialisable), so "Materialize
all" and `--select '*'` leave it alone, and the sensor records it as observed, with a data version per part (the hash
of its files: a retrained part makes the assets below it stale). Retraining is the separate code location
`pipelines.world` (job `world_bootstrap`); workspace.yaml loads both (assets/world.py says why external specs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import (AssetSelection, DefaultSensorStatus, Definitions, EnvVar, SensorEvaluationContext, SensorResult,
                     define_asset_job, multiprocess_executor, sensor)

from assets import ASSETS, CHECKS, WORLD_SPECS, MlflowResource, StitchVMResource
from assets.world import observations
from stitchvm.stages.runtime import THREADS_ENV, stage_threads


def env_or(name: str, default: str | None) -> EnvVar | str | None:
    """`EnvVar(name)` where the variable is set, else `default` (Dagster has no default for an unset EnvVar)."""
    return EnvVar(name) if name in os.environ else default


MAX_CONCURRENT = int(os.environ.get("STITCHVM_MAX_CONCURRENT", "2"))
NPROC_ENV = "STITCHVM_NPROC"  # > 0: the data-parallel stages run under torchrun with that many processes (Pipes)

stitchvm_all = define_asset_job("stitchvm_all", selection=AssetSelection.all() - AssetSelection.groups("world"),
                                description="materialise every pipeline stage (the shipped world as is) and run every "
                                            "check")
EXECUTOR = multiprocess_executor.configured({"max_concurrent": MAX_CONCURRENT,
                                             "start_method": {"forkserver": {"preload_modules": ["pipelines"]}}})


def resources(nproc: int | None = None) -> dict:
    """The resources of both code locations, bound to the environment (module docstring); `nproc` instead of
    STITCHVM_NPROC (deploy/k8s/definitions.py: one torchrun process per GPU of the run's pod)."""
    return {
        "stitchvm": StitchVMResource(params_path=env_or("STITCHVM_PARAMS", "params.yaml"),
                                     reports_dir=env_or("STITCHVM_REPORTS", "reports"),
                                     checkpoints_dir=env_or("STITCHVM_CHECKPOINTS", "checkpoints"),
                                     threads=EnvVar.int(THREADS_ENV) if THREADS_ENV in os.environ
                                     else stage_threads(MAX_CONCURRENT),
                                     nproc=nproc if nproc is not None
                                     else EnvVar.int(NPROC_ENV) if NPROC_ENV in os.environ else 0),
        "mlflow": MlflowResource(tracking_uri=env_or("MLFLOW_TRACKING_URI", None),
                                 ui_url=env_or("MLFLOW_UI_URL", None)),
    }


@sensor(default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=60,
        description="records the shipped world's parts as observed, with the hash of their files as data version, "
                    "whenever one changes (and once on a fresh instance)")
def world_observation(context: SensorEvaluationContext, stitchvm: StitchVMResource) -> SensorResult:
    seen = json.loads(context.cursor or "{}")  # asset -> the data version last recorded
    current = observations(Path(stitchvm.reports_dir))
    changed = [o for o in current if seen.get(o.asset_key.to_user_string()) != o.tags["dagster/data_version"]]
    return SensorResult(asset_events=changed, cursor=json.dumps(
        {o.asset_key.to_user_string(): o.tags["dagster/data_version"] for o in current}))


defs = Definitions(
    assets=[*WORLD_SPECS, *ASSETS],
    asset_checks=CHECKS,
    jobs=[stitchvm_all],
    sensors=[world_observation],
    executor=EXECUTOR,
    resources=resources(),
)
