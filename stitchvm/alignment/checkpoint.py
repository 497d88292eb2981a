"""Checkpoints of an alignment run (NFT, DRaFT), so that a run killed at any instant resumes to the same result.

`dir/last/` holds everything the next update reads: the LoRA tensors of every adapter (the trained policy, NFT's old
policy and evaluation EMA), the optimiser, the shared generator, the history so far (evaluation rows included), the
evaluations' rewards and latents (the stage's before / after grid and GenEval curve read them) and the training wall
time; `cursor.json` says how far the run got, in updates and in global samples (rollouts of every rank). Rank 0 writes
it after each update (every rank holds the same state after an averaged step); every rank reads it, so under several
machines `dir` must be on a shared disk.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from stitchvm import checkpoint_folder, distributed
from stitchvm.alignment.trainer import PolicyEvalSet
from stitchvm.models.lora import LoraPolicy

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """Where a restored run continues: the next update is `update` (0-based), after these history rows."""
    update: int
    history: list[dict]
    wall: float


class AlignCheckpoint:
    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else None

    def save(self, update: int, samples: int, policy: LoraPolicy, optimiser: torch.optim.Optimizer,
             generator: torch.Generator, history: list[dict], evalset: PolicyEvalSet | None, wall: float) -> None:
        """The state after `update` updates (`samples` rollouts in all); rank 0 only, a no-op without a folder."""
        if self.dir is None or not distributed.is_main():
            return
        tmp = checkpoint_folder.fresh_tmp(self.dir)
        tensors = {f"{name}/{key}": t.detach().contiguous().cpu()
                   for name in policy.adapters for key, t in policy.lora_tensors(name).items()}
        save_file(tensors, str(tmp / "adapters.safetensors"))
        evaluations = [] if evalset is None else [(r.cpu(), z.cpu()) for r, z in evalset.results]
        torch.save({"optimizer": optimiser.state_dict(), "generator": generator.get_state(), "history": history,
                    "evaluations": evaluations, "wall": wall}, tmp / "state.pt")
        (tmp / "cursor.json").write_text(json.dumps({"update": update, "samples": samples}))  # the marker, last
        checkpoint_folder.swap_in(self.dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        return checkpoint_folder.latest(self.dir, "cursor.json")

    def restore(self, policy: LoraPolicy, optimiser: torch.optim.Optimizer, generator: torch.Generator,
                evalset: PolicyEvalSet | None, rollouts_per_update: int) -> Resumed | None:
        """Load the last checkpoint into the policy, optimiser, generator and evaluation set; None if there is none."""
        last = self.latest()
        cursor = {"update": 0, "samples": 0} if last is None else json.loads((last / "cursor.json").read_text())
        main_update = distributed.broadcast_int(cursor["update"])
        if cursor["update"] != main_update:
            raise ValueError(f"rank {distributed.rank()} finds an alignment checkpoint at update {cursor['update']} in "
                             f"{self.dir}, rank 0 at update {main_update}: put the checkpoint folder on a disk every "
                             f"machine shares")
        if last is None:
            return None
        if cursor["samples"] != cursor["update"] * rollouts_per_update:
            raise ValueError(f"{last} was written with {cursor['samples'] // max(cursor['update'], 1)} rollouts per "
                             f"update, this run makes {rollouts_per_update}: delete {self.dir} to start afresh")
        tensors = load_file(str(last / "adapters.safetensors"))
        with torch.no_grad():
            for name in policy.adapters:
                for key, t in policy.lora_tensors(name).items():
                    t.copy_(tensors[f"{name}/{key}"])
        state = torch.load(last / "state.pt", weights_only=True)
        optimiser.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if evalset is not None:
            device = policy.backbone.device
            evalset.results[:] = [(r.to(device), z.to(device)) for r, z in state["evaluations"]]
        if distributed.is_main():  # a warning, so that it reaches stderr where logging is not configured
            log.warning("resuming the alignment run after update %d from %s", cursor["update"], last)
        return Resumed(cursor["update"], state["history"], state["wall"])


def start_or_resume(ckpt: AlignCheckpoint, policy: LoraPolicy, optimiser: torch.optim.Optimizer,
                    generator: torch.Generator, evalset: PolicyEvalSet | None, rollouts_per_update: int,
                    first_row: Callable[[], dict], callback: Callable[[dict], None] | None) -> Resumed:
    """The restored run, or a fresh one whose history starts with `first_row()` (the base policy's evaluation row:
    computed only when there is no checkpoint to resume)."""
    resumed = ckpt.restore(policy, optimiser, generator, evalset, rollouts_per_update)
    if resumed is not None:
        return resumed
    row = first_row()
    if callback:
        callback(row)
    return Resumed(0, [row], 0.0)
