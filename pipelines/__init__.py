"""The Dagster code location: assets, checks, resources and the job `stitchvm_all`.

UI: `dagster dev -w workspace.yaml` from the repository root. Command line: `dagster asset materialize -m pipelines
--select '*'` (in dagster 1.13 that command takes a code location, -m/-f, not -w). `assets` and `pipelines` are
installed packages (`pip install -e .`), so both load from any working directory; relative paths (the params file,
reports, checkpoints, MLflow's ./mlruns) resolve against the working directory of the process.

The resources are configured through `dagster.EnvVar` (resolved when a run starts, shown as such in the UI):
STITCHVM_PARAMS / STITCHVM_REPORTS / STITCHVM_CHECKPOINTS (the params file and the local output folders) and
MLFLOW_TRACKING_URI / MLFLOW_UI_URL. A variable that is not set where the definitions load gives the default instead
(params.yaml, reports, checkpoints; no tracking URI, no UI links): Dagster fails a run on an unset EnvVar.

Steps run at most STITCHVM_MAX_CONCURRENT (default 2) at a time, and each step's torch takes STITCHVM_THREADS threads
(default: the machine's cores divided among those steps): a torch process takes every core by default, and two such
steps side by side ran 40× slower than one alone (the train step at 0.2 steps/s beside another step, 8.5 alone).

GPU stages share the `gpu` concurrency pool; set its limit to the number of GPUs of the machine with
`dagster instance concurrency set gpu <n>` (unlimited until set). Runs use the multiprocess executor (one process per
step, so independent assets such as `labels` and `noisy` run side by side); its step processes fork from a forkserver
that has imported this module (torch, diffusers, transformers) once, instead of each paying ~7 s of imports.
"""
from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job, multiprocess_executor

from assets import ASSETS, CHECKS, MlflowResource, StitchVMResource
from stitchvm.stages.runtime import THREADS_ENV, stage_threads


def env_or(name: str, default: str | None) -> EnvVar | str | None:
    """`EnvVar(name)` where the variable is set, else `default` (Dagster has no default for an unset EnvVar)."""
    return EnvVar(name) if name in os.environ else default


MAX_CONCURRENT = int(os.environ.get("STITCHVM_MAX_CONCURRENT", "2"))

stitchvm_all = define_asset_job("stitchvm_all", selection=AssetSelection.all() - AssetSelection.groups("world"),
                                description="materialise every pipeline stage (the shipped world as is) and run every "
                                            "check")
world_bootstrap = define_asset_job("world_bootstrap", selection=AssetSelection.groups("world"),
                                   description="retrain the embedded world (the bootstrap stages) into $STITCHVM_WORLD "
                                               "or the shipped folder")

defs = Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[stitchvm_all, world_bootstrap],
    executor=multiprocess_executor.configured({"max_concurrent": MAX_CONCURRENT,
                                               "start_method": {"forkserver": {"preload_modules": ["pipelines"]}}}),
    resources={
        "stitchvm": StitchVMResource(params_path=env_or("STITCHVM_PARAMS", "params.yaml"),
                                     reports_dir=env_or("STITCHVM_REPORTS", "reports"),
                                     checkpoints_dir=env_or("STITCHVM_CHECKPOINTS", "checkpoints"),
                                     threads=EnvVar.int(THREADS_ENV) if THREADS_ENV in os.environ
                                     else stage_threads(MAX_CONCURRENT)),
        "mlflow": MlflowResource(tracking_uri=env_or("MLFLOW_TRACKING_URI", None),
                                 ui_url=env_or("MLFLOW_UI_URL", None)),
    },
)
