"""The shipped, pretrained embedded world: where its weights live and how the `world:` sources load them.

The bootstrap stages (`stitchvm/stages/world_*.py`) write, and the repository ships (fp16 safetensors):

    stitchvm/world/pretrained/
        clip/            the world CLIPModel + its tokenizer (`world:clip`); its text tower is also the backbone's
                         two text encoders, stored once
        vae/             the AutoencoderKL (32×32×3 pixels <-> 8×8×4 latents)
        transformer/     the SD3Transformer2DModel (rectified flow, conditioned through the CLIP text tower)
        tokenizer/       the backbone's tokenizer (the world CLIP's, padding prompts to 16 tokens)
        scheduler/       the FlowMatchEulerDiscreteScheduler config (its shift)
        aesthetic.safetensors   the scalar head on the CLIP image embedding (`head: world`)

`STITCHVM_WORLD` points both the bootstrap stages and the `world:` sources at another folder (tests train a reduced
world there; the shipped one is never touched).

`world:sd3` assembles a `Backbone` from these parts with the same classes `from_pretrained` loads for a real SD3
folder (`backbone.pipeline.save_pretrained(path)` writes the standard layout for anyone who wants one folder).
"""
from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "world" / "pretrained"
WORLD_SOURCES = ("world:sd3", "world:clip")
WRITERS = {"clip": "world_clip", "vae": "world_vae", "transformer": "world_backbone", "scheduler": "world_backbone",
           "tokenizer": "world_backbone", "aesthetic.safetensors": "world_aesthetic",
           "evaluator.safetensors": "world_evaluator"}  # part -> the stage writing it


def world_dir() -> Path:
    """Where the world is read and written: $STITCHVM_WORLD, else the shipped folder."""
    return Path(os.environ.get("STITCHVM_WORLD") or SHIPPED)


def is_world(source: str) -> bool:
    return source.startswith("world:")


def world_path(part: str) -> Path:
    """The folder (or file) of one part of the shipped world; a missing part names the stage that writes it."""
    path = world_dir() / part
    if not path.exists():
        stage = WRITERS.get(part, "world_*")
        raise FileNotFoundError(f"the pretrained world has no {path}: run the `{stage}` stage "
                                f"(python -m stitchvm {stage}, or dvc repro {stage})")
    return path


def check_world_source(source: str) -> None:
    if source not in WORLD_SOURCES:
        raise ValueError(f"unknown world source {source!r} (known: {', '.join(WORLD_SOURCES)})")
