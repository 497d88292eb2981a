"""The code location that retrains the embedded world: the job `world_bootstrap`, one op per bootstrap stage.

Separate from the main location (`pipelines`), where the world's six assets are external (the world as shipped,
observed by a sensor): each op here reports its world asset as materialised, with the new data version, so retraining
is always a deliberate job launch, never part of a "Materialize all". `dagster dev -w workspace.yaml` lists this
location as `world` (Jobs -> world_bootstrap -> Launchpad); from the command line, `dagster job execute -m
pipelines.world -j world_bootstrap` (or `make world`, which retrains it under DVC). It writes into $STITCHVM_WORLD or
the shipped folder.
"""
from __future__ import annotations

from dagster import Definitions

from assets import WORLD_BOOTSTRAP
from pipelines import EXECUTOR, resources

world_bootstrap = WORLD_BOOTSTRAP.to_job(executor_def=EXECUTOR)

defs = Definitions(jobs=[world_bootstrap], resources=resources())
