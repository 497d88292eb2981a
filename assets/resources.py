"""Dagster resources the assets take: where the params and local outputs are, and where MLflow tracks.

The instances are bound in `pipelines` (Definitions); the classes live here because the assets name them as
parameter types.
"""
from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext

from stitchvm.config import Params, load_params
from stitchvm.stages.runtime import Paths


class StitchVMResource(ConfigurableResource):
    """The params file (the single source of truth, shared with DVC and the CLI) and the local output folders.

    Defaults come from the environment (STITCHVM_PARAMS, STITCHVM_REPORTS, STITCHVM_CHECKPOINTS) when it is set,
    so `dagster dev` / `dagster asset materialize` can be pointed at another params file without editing code.
    Relative paths resolve against the working directory of the process (the repository root for `dagster dev`).
    """

    params_path: str = os.environ.get("STITCHVM_PARAMS", "params.yaml")
    reports_dir: str = os.environ.get("STITCHVM_REPORTS", "reports")
    checkpoints_dir: str = os.environ.get("STITCHVM_CHECKPOINTS", "checkpoints")

    def params(self) -> Params:
        return load_params(self.params_path)

    def paths(self, params: Params | None = None) -> Paths:
        return Paths.from_params(params or self.params(), reports=Path(self.reports_dir),
                                 checkpoints=Path(self.checkpoints_dir))


class MlflowResource(ConfigurableResource):
    """Where the stages' MLflow tracking goes; the stages do the logging themselves (stitchvm.stages.tracking).

    `tracking_uri`, when set, is exported as MLFLOW_TRACKING_URI before any asset of the run executes (an explicit
    `mlflow.tracking_uri` in params still wins). `ui_url` (default: env MLFLOW_UI_URL) makes run and model-version
    links clickable in the asset metadata.
    """

    tracking_uri: str | None = None
    ui_url: str | None = None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri

    def _ui(self) -> str | None:
        url = self.ui_url or os.environ.get("MLFLOW_UI_URL")
        return url.rstrip("/") if url else None

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
