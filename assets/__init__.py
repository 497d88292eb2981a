"""Dagster assets over the pipeline stages: one asset per stage (same names, same DAG as stitchvm.stages.GRAPH).

Thin adapters: each asset runs its stage through its resource (`StitchVMResource.run_stage`: the params file, the
paths, `stage(name).run(...)`, which reads and writes the storage root) and turns the stage's summary into metadata.
Nothing passes through IO managers.
"""
from assets import alignment, data, model, world
from assets.resources import MlflowResource, StitchVMResource

ASSETS = [*world.ASSETS, *data.ASSETS, *model.ASSETS, *alignment.ASSETS]
CHECKS = [*data.CHECKS, *model.CHECKS]

__all__ = ["ASSETS", "CHECKS", "MlflowResource", "StitchVMResource"]
