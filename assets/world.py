"""World assets: the bootstrap stages that pretrain the embedded world (group `world`, job `world_bootstrap`).

The trained world ships with the repository, so these are materialised only to regenerate it; the value-model
assets depend on them through the `world:` model sources.
"""
from __future__ import annotations

from pathlib import Path

from dagster import AssetsDefinition, MaterializeResult, MetadataValue, asset

from stitchvm.stages import BOOTSTRAP, GRAPH

from assets.metadata import png_md, stage_doc as doc
from assets.resources import StitchVMResource

GROUP = "world"


def summary_metadata(summary: dict) -> dict:
    """Numbers as metadata values, PNG paths as inline images, the rest as JSON."""
    metadata = {}
    for key, value in summary.items():
        if isinstance(value, bool) or value is None:
            metadata[key] = MetadataValue.text(str(value))
        elif isinstance(value, (int, float)):
            metadata[key] = value
        elif isinstance(value, str) and value.endswith(".png") and Path(value).is_file():
            metadata[key] = png_md(Path(value).read_bytes(), key)
        elif isinstance(value, str):
            metadata[key] = MetadataValue.text(value)
        else:
            metadata[key] = MetadataValue.json(value)
    return metadata


def bootstrap_asset(name: str) -> AssetsDefinition:
    @asset(name=name, group_name=GROUP, deps=list(GRAPH[name]), description=doc(name))
    def _asset(stitchvm: StitchVMResource) -> MaterializeResult:
        return MaterializeResult(metadata=summary_metadata(stitchvm.run_stage(name).summary))

    return _asset


ASSETS = [bootstrap_asset(name) for name in BOOTSTRAP]
