"""The Dagster code location: assets, checks, resources and the job `stitchvm_all`.

UI: `dagster dev -w workspace.yaml` from the repository root (dagster resolves the workspace's `working_directory: .`
against the current directory). Command line: `dagster asset materialize -m pipelines --select '*'` from the root
(in dagster 1.13 that command takes a code location, -m/-f, not -w). The params file and the local output folders
come from STITCHVM_PARAMS / STITCHVM_REPORTS / STITCHVM_CHECKPOINTS (defaults: params.yaml, reports, checkpoints).

GPU stages share the `gpu` concurrency pool; set its limit to the number of GPUs of the machine with
`dagster instance concurrency set gpu <n>` (unlimited until set). Runs use the multiprocess executor (one process per
step, so independent assets such as `labels` and `noisy` run side by side); its step processes fork from a forkserver
that has imported this module (torch, diffusers, transformers) once, instead of each paying ~7 s of imports.
"""
import os

from dagster import AssetSelection, Definitions, define_asset_job, multiprocess_executor

from assets import ASSETS, CHECKS, MlflowResource, StitchVMResource

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
    executor=multiprocess_executor.configured({"start_method": {"forkserver": {"preload_modules": ["pipelines"]}}}),
    resources={
        "stitchvm": StitchVMResource(),
        "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                                 ui_url=os.environ.get("MLFLOW_UI_URL")),
    },
)
