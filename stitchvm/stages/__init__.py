"""The pipeline stages: one function `run(params, paths) -> summary` each, called by both front-ends.

`GRAPH` is the stage DAG (stage -> upstream stages); DVC's dvc.yaml and the Dagster asset graph must both equal it.
"""
from importlib import import_module

GRAPH: dict[str, tuple[str, ...]] = {
    "prompts": (),
    "samples": ("prompts",),
    "labels": ("samples",),
    "noisy": ("samples",),
    "search": ("noisy", "samples"),
    "train": ("search", "samples", "labels"),
    "evaluate": ("train", "noisy", "samples", "labels", "prompts"),
}
PARTITIONED = ("samples", "labels")  # one partition per shard


def stage(name: str):
    """The module of stage `name` (its `run` does the work)."""
    if name not in GRAPH:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(GRAPH)})")
    return import_module(f"{__name__}.{name}")
