"""One alignment run (DiffusionNFT or DRaFT) of a LoRA on the tiny float64 backbone, as tests/test_distributed_align.py
launches it: in-process (`main`, one process) or under torchrun
(`python -m torch.distributed.run --nproc-per-node=2 tests/torchrun_align.py METHOD OUT CKPT`). Rank 0 writes
OUT/adapters.safetensors (every adapter's LoRA tensors), OUT/history.json (the whole run's rows without the clock's
fields) and OUT/ran.json (the updates this launch ran) at the end.

The faults are injected here, never in the library:
  STITCHVM_KILL_AT_STEP=k  after update k (its checkpoint written) rank 0 SIGKILLs torchrun's agent, every worker and
                           itself, as when a machine is lost
  STITCHVM_FAIL_AT_STEP=k  rank 1 raises after update k, once, when rank 0's checkpoint of update k is on disk
                           (OUT/failed marks it, so the restarted run goes through)
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file

from stitchvm import distributed
from stitchvm.alignment.draft import train_draft
from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
from stitchvm.alignment.trainer import PolicyEvalSet
from stitchvm.config import AlignConfig, from_dict
from stitchvm.models.lora import TRAINED, LoraPolicy
from torchrun_train import float64_models, join_and_register, kill_every_process

PROMPTS = ["a red square", "a green circle", "a blue triangle"]
# 2 prompts × 2 rollouts per update (2 per rank on 2 ranks), micro-batches of 1, the η-SDE sampler (per-sample noise),
# 2 updates with an evaluation at the end; lr large enough that the adapters move well above rounding
CONFIG = dict(updates=2, prompts_per_update=2, group_size=2, steps=3, eta=1.0, lora_rank=2, lora_alpha=4.0,
              batch_size=1, eval_every=2, nft=dict(train_times=2, lr=1e-2), draft=dict(lr=1e-2, k=1))
CLOCK = ("wall_s", "sampling_s", "reward_s", "update_s")


def config(method: str) -> AlignConfig:
    return from_dict(AlignConfig, {**CONFIG, "method": method})


def fault(out: Path, pids: Path, ckpt: Path, ran: list[int]):
    """The callback that records the updates run and injects the fault the environment asks for."""
    kill_at = int(os.environ.get("STITCHVM_KILL_AT_STEP", 0))
    fail_at = int(os.environ.get("STITCHVM_FAIL_AT_STEP", 0))

    def on_update(row: dict) -> None:
        ran.append(row["step"])
        if kill_at and row["step"] == kill_at and distributed.rank() == 0:
            kill_every_process(pids)
        if fail_at and row["step"] == fail_at and distributed.rank() == 1 and not (out / "failed").exists():
            cursor = ckpt / "last" / "cursor.json"
            deadline = time.monotonic() + 60
            while not (cursor.is_file() and json.loads(cursor.read_text())["update"] == fail_at):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank 0 wrote no checkpoint of update {fail_at} in {ckpt}")
                time.sleep(0.05)
            (out / "failed").touch()
            raise RuntimeError(f"injected failure after update {fail_at}")

    return on_update


def main(method: str, out: Path, ckpt: Path) -> None:
    pids = join_and_register(out)
    backbone, reward = float64_models()
    nft = method.startswith("nft")
    policy = LoraPolicy(backbone, 2, 4.0, adapters=NFT_ADAPTERS if nft else (TRAINED,), seed=0)
    evalset = PolicyEvalSet(tuple(PROMPTS[:1]), (0,), 2)
    ran: list[int] = []
    train = train_nft if nft else train_draft
    history = train(policy, reward, PROMPTS, config(method), seed=5, evalset=evalset,
                    callback=fault(out, pids, ckpt, ran), checkpoint_dir=ckpt)
    if distributed.is_main():
        tensors = {f"{name}/{key}": t.detach().contiguous()
                   for name in policy.adapters for key, t in policy.lora_tensors(name).items()}
        save_file(tensors, str(out / "adapters.safetensors"))
        (out / "history.json").write_text(json.dumps([{k: v for k, v in r.items() if k not in CLOCK}
                                                      for r in history]))
        (out / "ran.json").write_text(json.dumps(ran))
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
