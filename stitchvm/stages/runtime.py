"""What every stage needs at run time: where outputs live, the models, and readable errors for missing inputs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from stitchvm.models.backbone import Backbone, build_backbone
from stitchvm.config import ModelSpec, Params, RewardSpec
from stitchvm.models.reward import ClipReward, build_reward
from stitchvm.data.storage import Storage, open_root


@dataclass(frozen=True)
class Paths:
    """Stage outputs go to `root` (local or s3://); reports and training checkpoints stay on local disk."""

    root: str
    storage_options: dict | None = None
    reports: Path = Path("reports")
    checkpoints: Path = Path("checkpoints")
    track: bool = True  # log to MLflow (the smoke run turns it off)

    @classmethod
    def from_params(cls, params: Params, **overrides) -> "Paths":
        return cls(root=params.storage.root, storage_options=params.storage.options, **overrides)

    def storage(self) -> Storage:
        return open_root(self.root, self.storage_options)


THREADS_ENV = "STITCHVM_THREADS"


def stage_threads(concurrent_steps: int = 1) -> int:
    """torch's CPU threads for one stage process: $STITCHVM_THREADS where set, else the machine's cores shared among
    the `concurrent_steps` stage processes that run side by side (a torch process takes every core by default, and
    two such processes on the same cores run many times slower than one after the other)."""
    value = os.environ.get(THREADS_ENV)
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected a positive integer (torch threads per stage)")
        return int(value)
    return max(1, (os.cpu_count() or 1) // max(1, concurrent_steps))


def set_stage_threads(concurrent_steps: int = 1) -> int:
    """Set torch's CPU threads for this stage process (`stage_threads`); returns the number."""
    n = stage_threads(concurrent_steps)
    torch.set_num_threads(n)
    return n


def needs(stage: str) -> str:
    """The hint attached to a missing upstream output."""
    return f"run the `{stage}` stage first (python -m stitchvm {stage})"


@lru_cache(maxsize=4)
def _backbone(spec: ModelSpec, device: str) -> Backbone:
    return build_backbone(spec, device)


@lru_cache(maxsize=4)
def _reward(spec: RewardSpec, device: str) -> ClipReward:
    return build_reward(spec, device)


def models(params: Params, device: str | None = None) -> tuple[Backbone, ClipReward]:
    """The backbone and reward of the params, built once per process (stages share them in-process)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _backbone(params.backbone, device), _reward(params.reward, device)
