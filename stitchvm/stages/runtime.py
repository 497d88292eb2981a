"""What every stage needs at run time: where outputs live, the models, and readable errors for missing inputs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from stitchvm.models.backbone import Backbone, build_backbone
from stitchvm.config import ModelSpec, Params, RewardSpec, check_device
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


DEVICE_ENV = "STITCHVM_DEVICE"  # set by the CLI's --device: this process and the ones it starts (bench workers)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`; `cuda[:N]` must be visible (a one-line error if not)."""
    device = check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch {torch.__version__} sees {torch.cuda.device_count()} CUDA "
                             f"device(s) (a CPU build of torch sees none; use --device cpu or auto)")
    return device


def stage_device(params: Params) -> str:
    """Where a stage runs: $STITCHVM_DEVICE (the CLI's --device) where set, else `params.device`, resolved."""
    return resolve_device(os.environ.get(DEVICE_ENV) or params.device)


def models(params: Params, device: str | None = None) -> tuple[Backbone, ClipReward]:
    """The backbone and reward of the params on `device` (default: `stage_device(params)`), built once per process
    (stages share them in-process)."""
    device = resolve_device(str(device)) if device else stage_device(params)
    return _backbone(params.backbone, device), _reward(params.reward, device)
