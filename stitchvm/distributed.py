"""Data parallelism over the processes `torchrun` launches: the process group, each rank's share of the work, and the
gradient average that makes a step on W processes equal the step on one.

Unlaunched (no `WORLD_SIZE` > 1 in the environment) every function behaves as rank 0 of a world of 1 and touches no
collective, so library code calls them unconditionally and the single-process path stays what it was.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); a no-op unlaunched or when joined.
    On CUDA each process takes the GPU of its LOCAL_RANK, so `device="cuda"` means that process's own GPU."""
    if not launched() or dist.is_initialized():
        return
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        # torchrun keeps the store it shares with the workers across restarts, and the keys of the previous process
        # group can make this one fail to connect (pytorch/pytorch#135712)
        log.warning("torchrun restart %d on a shared rendezvous store: if the process group fails to form, launch "
                    "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", restarts)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """Processes on this machine (they share its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 writes what is written once: checkpoints, final outputs, logs."""
    return rank() == 0


def rank_share(items: list) -> list:
    """This rank's items, round robin (rank r of W takes items r, r + W, ...): what an item yields must depend on the
    item alone, never on which rank made it."""
    return items[rank()::world_size()]


def gather_share(items: list, done: list, notes: dict) -> tuple[list, dict]:
    """The counterpart of `rank_share`: every rank's `done` items and `notes` (keyed by item), in the order of `items`,
    on every rank. It waits for every rank, so on return every share is finished."""
    shares = gather_objects((done, notes))
    every_done = {item for d, _ in shares for item in d}
    every_note = {k: v for _, n in shares for k, v in n.items()}
    return [i for i in items if i in every_done], {i: every_note[i] for i in items if i in every_note}


def rank_slice(n: int) -> slice:
    """This rank's contiguous part of n rows (n must divide by the world size; the caller says why in its error)."""
    per_rank = n // world_size()
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks, in one all-reduce of a flat buffer. Each rank's loss is a mean
    over an equal share of the global batch, so the mean of the ranks' gradients is the global batch's gradient."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every rank: one graph
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def average(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a small tensor (per-rank loss terms -> the global batch's), returned as is unlaunched."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def broadcast_int(value: int) -> int:
    """Rank 0's value of an integer, on every rank."""
    if world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(box, src=0)
    return int(box.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` unlaunched."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, ...) rows concatenated in rank order, (W·n, ...), on every rank (each rank holds n rows): the
    inverse of taking `rank_slice` of the whole. Returned as is unlaunched."""
    if world_size() == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)
