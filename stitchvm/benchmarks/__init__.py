"""Benchmarks (`python -m stitchvm bench <name> --profile NAME --out PATH`): tables on stdout, JSON on disk.

A profile is a params file: `default` is the project's params.yaml (the embedded world on CPU), any other NAME is
`profiles/NAME.yaml` (e.g. `arch`: the real SD3.5-Medium / CLIP ViT-L/14 sizes with random weights, for a GPU),
or a path to a YAML file.
"""
from __future__ import annotations

from pathlib import Path

from stitchvm.config import Params, load_params

PROFILE_DIR = Path("profiles")


def profile_path(name: str) -> Path:
    """The params file of profile `name` (see the module docstring)."""
    if name == "default":
        return Path("params.yaml")
    path = PROFILE_DIR / f"{name}.yaml"
    if path.is_file():
        return path
    if Path(name).suffix in (".yaml", ".yml"):
        return Path(name)
    known = ", ".join(["default", *sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))])
    raise FileNotFoundError(f"unknown profile {name!r}: no {path} (known profiles: {known}; or pass a .yaml path)")


def load_profile(name: str) -> tuple[str, Params]:
    """`(name, params)` of a profile; a missing file or bad params fail with the file named."""
    path = profile_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {path} does not exist")
    return name, load_params(path)
