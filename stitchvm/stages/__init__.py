"""The pipeline stages: one function `run(params, paths) -> summary` each, called by both front-ends.

`GRAPH` is the stage DAG (stage -> upstream stages); DVC's dvc.yaml and the Dagster asset graph must both equal it.
"""
from importlib import import_module

GRAPH: dict[str, tuple[str, ...]] = {
    # bootstrap: pretrain the embedded world (shipped in stitchvm/world/pretrained/, so normally up to date)
    "world_clip": (),
    "world_vae": (),
    "world_backbone": ("world_clip", "world_vae"),
    "world_aesthetic": ("world_clip",),
    "world_evaluator": (),
    "world_report": ("world_clip", "world_vae", "world_backbone", "world_aesthetic", "world_evaluator"),
    # the value-model pipeline (its models come from params; the world's edges are the `world:` sources)
    "prompts": (),
    "samples": ("prompts", "world_clip", "world_vae", "world_backbone"),
    "labels": ("samples", "world_clip", "world_vae", "world_aesthetic"),
    "noisy": ("samples",),
    "search": ("noisy", "samples"),
    "truth": ("noisy", "samples", "world_clip", "world_vae", "world_backbone", "world_aesthetic"),  # Monte Carlo value
    "train": ("search", "samples", "labels"),
    "evaluate": ("train", "truth", "noisy", "samples", "labels", "prompts", "world_evaluator"),
    # consumers of the value model: inference-time guidance (and training-time alignment)
    "guidance": ("train", "prompts", "world_evaluator"),
    "align": ("train", "prompts", "world_evaluator"),
}
PARTITIONED = ("samples", "labels")  # one partition per shard
BOOTSTRAP = tuple(name for name in GRAPH if name.startswith("world_"))
CONSUMERS = ("guidance", "align")  # use the value model; not part of producing and evaluating it
VALUE_PIPELINE = tuple(name for name in GRAPH if name not in BOOTSTRAP + CONSUMERS)


def stage(name: str):
    """The module of stage `name` (its `run` does the work)."""
    if name not in GRAPH:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(GRAPH)})")
    return import_module(f"{__name__}.{name}")
