"""Dagster resources the assets take: where the params and local outputs are, and where MLflow tracks.

The classes read nothing from the environment: their instances are configured in `pipelines` (Definitions), where
the environment comes in through `dagster.EnvVar`. The classes live here because the assets name them as parameter
types.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from dagster import (ConfigurableResource, DagsterInvariantViolationError, Failure, InitResourceContext,
                     OpExecutionContext)

from stitchvm.__main__ import DATA_PARALLEL  # the stages the command line runs under torchrun
from stitchvm.config import ConfigError, Params, load_params
from stitchvm.stages import stage
from stitchvm.stages.runtime import Paths

from assets.progress_log import progress_to_log
from assets.torchrun import launch, torchrun_command


# The failures a stage expects and names in one line (as the CLI's, stitchvm/__main__.py): a step fails with that line
# as a dagster Failure, without a retry (a bad params file or a missing input fails the same way again).
EXPECTED = (FileNotFoundError, PermissionError, ConnectionError, ValueError)  # ConfigError is a ValueError


class StageRun(NamedTuple):
    """What an asset gets back from running its stage: the params and paths it ran on, and the stage's summary."""

    params: Params
    paths: Paths
    summary: dict


class StitchVMResource(ConfigurableResource):
    """The params file (the single source of truth, shared with DVC and the CLI) and the local output folders.

    Relative paths resolve against the working directory of the process (the repository root for `dagster dev`).
    `pipelines` binds these fields to STITCHVM_PARAMS / STITCHVM_REPORTS / STITCHVM_CHECKPOINTS where they are set.
    """

    params_path: str = "params.yaml"
    reports_dir: str = "reports"
    checkpoints_dir: str = "checkpoints"
    threads: int = 0  # torch CPU threads per step (0: torch's default); `pipelines` shares the cores among the steps
    nproc: int = 0  # > 0: the data-parallel stages run under torchrun with this many processes, through Dagster Pipes

    def params(self) -> Params:
        try:
            return load_params(self.params_path)
        except ConfigError as e:
            raise Failure(description=str(e), allow_retries=False) from None

    def paths(self, params: Params | None = None) -> Paths:
        return Paths.from_params(params or self.params(), reports=Path(self.reports_dir),
                                 checkpoints=Path(self.checkpoints_dir))

    def run_stage(self, name: str, **kwargs) -> StageRun:
        """Run the library stage `name` (`stitchvm.stages.<name>.run`) on the params file; it reads and writes the
        storage root itself. `kwargs` go to the stage's `run` (e.g. `shards=`).

        Inside a Dagster step the stage's progress bars also go to the run's event log (assets/progress_log.py); with
        `nproc` > 0 a data-parallel stage runs under torchrun in a Pipes session (assets/torchrun.py)."""
        params = self.params()
        paths = self.paths(params)
        context = current_step()
        if self.nproc > 0 and name in DATA_PARALLEL and context is not None and not kwargs:
            command = torchrun_command(name, self.nproc, self.params_path, self.reports_dir, self.checkpoints_dir)
            return StageRun(params, paths, launch(context, name, command))
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            if context is None:
                summary = stage(name).run(params, paths, progress=False, **kwargs)
            else:
                with progress_to_log(context.log):
                    summary = stage(name).run(params, paths, progress=True, **kwargs)
        except EXPECTED as e:
            raise Failure(description=f"stitchvm {name}: {e}", allow_retries=False) from None
        return StageRun(params, paths, summary)


def current_step() -> OpExecutionContext | None:
    """The context of the Dagster step running now (None outside one: the resource used as a plain object)."""
    try:
        return OpExecutionContext.get()
    except DagsterInvariantViolationError:
        return None


class MlflowResource(ConfigurableResource):
    """Where the stages' MLflow tracking goes; the stages do the logging themselves (stitchvm.stages.tracking).

    `tracking_uri`, when set, is exported as MLFLOW_TRACKING_URI before any asset of the run executes (an explicit
    `mlflow.tracking_uri` in params still wins). `ui_url` makes run and model-version links clickable in the asset
    metadata (`pipelines` binds both to MLFLOW_TRACKING_URI / MLFLOW_UI_URL where they are set).
    """

    tracking_uri: str | None = None
    ui_url: str | None = None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri

    def _ui(self) -> str | None:
        return self.ui_url.rstrip("/") if self.ui_url else None

    def run_url(self, run_id: str, tracking_uri: str | None = None) -> str | None:
        """Link to a run in the MLflow UI (None without a UI address)."""
        ui = self._ui()
        if ui is None:
            return None
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, name: str, version: str) -> str | None:
        ui = self._ui()
        return f"{ui}/#/models/{name}/versions/{version}" if ui else None
