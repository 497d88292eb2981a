"""Dagster assets over the pipeline stages: one asset per stage (same names, same DAG as stitchvm.stages.GRAPH).

Thin adapters: each asset runs its stage through its resource (`StitchVMResource.run_stage`: the params file, the
paths, `stage(name).run(...)`, which reads and writes the storage root) and turns the stage's summary into metadata.
Nothing passes through IO managers.

`ASSETS` are the value-model pipeline's assets (the main code location, `pipelines`), with the shipped world as the
external `WORLD_SPECS`; `WORLD_BOOTSTRAP` is the graph of the job that retrains the world (the code location
`pipelines.world`; assets/world.py says why a job).
"""
from assets import alignment, data, model, world
from assets.resources import MlflowResource, StitchVMResource

ASSETS = [*data.ASSETS, *model.ASSETS, *alignment.ASSETS]
CHECKS = [*data.CHECKS, *model.CHECKS]
WORLD_SPECS = world.SPECS
WORLD_BOOTSTRAP = world.BOOTSTRAP_GRAPH

__all__ = ["ASSETS", "CHECKS", "WORLD_BOOTSTRAP", "WORLD_SPECS", "MlflowResource", "StitchVMResource"]
