"""World assets: the embedded world the pipeline reads through its `world:` model sources (group `world`).

The trained world ships with the repository (stitchvm/world/pretrained/, or $STITCHVM_WORLD): in Dagster its six
parts are external assets (`SPECS`), never materialisable, so no "Materialize all" (of a location or of the whole
workspace) and no `dagster asset materialize --select '*'` can retrain it. The main code location (`pipelines`)
holds them; its sensor `world_observation` records each part as observed (`observations`): a data version that is
the hash of the part's files, and the world's evaluation (reports/world.json) as metadata, so a fresh instance shows
the world as present and a retrained part marks the assets below it stale.

Retraining is the op job `world_bootstrap` of the code location `pipelines.world`: one op per bootstrap stage
(`OPS`, ordered as GRAPH), each reporting a materialisation of its world asset with the new data version. A job, not
assets, on purpose. With the same keys in two code locations (dagster 1.13; the collisions checked by loading such
workspaces and asking the webserver's GraphQL, what the UI launches together read from its launch code):
- materialisable in both: Dagster warns of duplicates, and the UI refuses to launch the key;
- observable source assets here + materialisable assets in `pipelines.world`: Dagster accepts them, but an
  observable source asset has an op, and the UI refuses to launch a key that ops define in two locations
  ("defined in multiple code locations");
- external specs here + materialisable assets in `pipelines.world`: no collision, but the workspace-wide
  "Materialize all" would select assets of two locations, which the UI does not launch together;
- external specs here + a job reporting materialisations (this module): no asset is defined twice, every
  "Materialize all" is the pipeline's, and retraining is a deliberate job launch.
"""

import hashlib
import json
from pathlib import Path

from dagster import (AssetMaterialization, AssetObservation, AssetSpec, DependencyDefinition, GraphDefinition, In,
                     MetadataValue, Nothing, OpDefinition, OpExecutionContext, Out, op)

from stitchvm.models.world_source import WRITERS, world_dir
from stitchvm.stages import BOOTSTRAP, GRAPH

from assets.metadata import png_md, stage_doc as doc
from assets.resources import StitchVMResource

GROUP = "world"
REPORT_KEYS = ("vae_psnr", "clip_zero_shot_count", "clip_zero_shot_color", "clip_binding_swap_colour",
               "prompt_pair_win_rate", "aesthetic_spearman")  # reports/world.json numbers shown on world_report


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


def bootstrap_op(name: str) -> OpDefinition:
    """The op running bootstrap stage `name`: it retrains one part of the world and reports the world asset `name`
    as materialised, with the stage's summary and the new data version (the hash `observation` records)."""
    @op(name=name, ins={upstream: In(Nothing) for upstream in GRAPH[name]}, out=Out(Nothing), description=doc(name))
    def _op(context: OpExecutionContext, stitchvm: StitchVMResource) -> None:
        summary = stitchvm.run_stage(name).summary
        version = observation(name, Path(stitchvm.reports_dir)).tags["dagster/data_version"]
        context.log_event(AssetMaterialization(asset_key=name, metadata=summary_metadata(summary),
                                               tags={"dagster/data_version": version}))

    return _op


OPS = [bootstrap_op(name) for name in BOOTSTRAP]
# the retraining job's graph: each op after the ops of its upstream stages
BOOTSTRAP_GRAPH = GraphDefinition(
    name="world_bootstrap", node_defs=OPS,
    dependencies={name: {upstream: DependencyDefinition(upstream) for upstream in GRAPH[name]} for name in BOOTSTRAP},
    description="retrain the embedded world (the bootstrap stages) into $STITCHVM_WORLD or the shipped folder")
SPECS = [AssetSpec(name, group_name=GROUP, deps=list(GRAPH[name]), description=doc(name),
                   metadata={"shipped": "stitchvm/world/pretrained/ ($STITCHVM_WORLD); retrain with the job "
                                        "`world_bootstrap` of the `pipelines.world` location or `make world`"})
         for name in BOOTSTRAP]  # the world as shipped, in the main location


# ---- observation of the shipped world -----------------------------------------------------------------------------
def part_files(name: str, reports: Path) -> list[Path]:
    """The files that make the world asset `name`: the weights, configs and tokenizers its stage installs into the
    world folder, or (`world_report`) the world's evaluation report."""
    if name == "world_report":
        return [reports / "world.json"]
    root = world_dir()
    files = []
    for part in sorted(p for p, writer in WRITERS.items() if writer == name):
        path = root / part
        files += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return files


def data_version(files: list[Path], base: Path) -> str | None:
    """sha256 over the files' relative names and bytes (None when one is missing): equal worlds, equal versions."""
    digest = hashlib.sha256()
    for f in files:
        if not f.is_file():
            return None
        digest.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def observation(name: str, reports: Path) -> AssetObservation:
    """One world asset as it is on disk now: its data version and where it lives; `world_report` and
    `world_evaluator` also carry the world's evaluation (reports/world.json), when present."""
    base = reports if name == "world_report" else world_dir()
    files = part_files(name, reports)
    version = data_version(files, base)
    metadata = {"files": len(files), "bytes": sum(f.stat().st_size for f in files if f.is_file()),
                "path": MetadataValue.path(str((files[0] if name == "world_report" else base).resolve()))}
    if version is None:
        missing = [str(f) for f in files if not f.is_file()] or [f"{base} has no {name} part"]
        metadata["missing"] = MetadataValue.json(missing)
    report_path = reports / "world.json"
    if name in ("world_report", "world_evaluator") and report_path.is_file():
        report = json.loads(report_path.read_text())
        metadata["evaluator_accuracy"] = MetadataValue.json(report.get("evaluator_accuracy", {}))
        if name == "world_report":
            metadata["generator_accuracy"] = MetadataValue.json(report.get("generator_accuracy", {}))
            metadata.update({k: float(report[k]) for k in REPORT_KEYS if k in report})
    return AssetObservation(asset_key=name, metadata=metadata,
                            tags={"dagster/data_version": version or "missing"})


def observations(reports: Path) -> list[AssetObservation]:
    """Every world asset's observation (the sensor records them when a data version changes)."""
    return [observation(name, reports) for name in BOOTSTRAP]
