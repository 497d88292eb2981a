"""One training run of a tiny float64 value model (the token fit, then stage 2), as tests/test_distributed.py launches it: plain `python` (one
process) or under torchrun (`python -m torch.distributed.run --nproc-per-node=2 tests/torchrun_train.py OUT CKPT`).
Rank 0 writes OUT/weights.safetensors (the trainable weights) and OUT/history.json at the end.

The faults are injected here, never in the library:
  STITCHVM_KILL_AT_STEP=k  after step k (its checkpoint written) rank 0 SIGKILLs torchrun's agent, every worker and
                           itself, as when a machine is lost
  STITCHVM_FAIL_AT_STEP=k  rank 1 raises at step k, once (OUT/failed marks it, so the restarted run goes through)
"""
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

from stitchvm import distributed
from stitchvm.config import FitConfig, ModelSpec, RewardSpec, TrainConfig
from stitchvm.models.backbone import build_backbone
from stitchvm.models.reward import build_reward
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.token_fit import entry_tokens, fit_stitch
from stitchvm.value.training import teacher_targets, train_value_model

PROMPTS = ["a red square", "a green square", "a blue square", "a yellow square"]
# 4 groups of 2 per step, i.e. 2 whole groups per rank on 2 ranks; checkpoints at steps 2, 4, 6
CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=2, group_size=2,
                     lambda_rank=0.5)
FIT = FitConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1)  # 4 latents per rank on 2 ranks


def float64_models():
    """The tiny presets in float64, so that 1 and 2 ranks differ by nothing but the order of a few sums."""
    backbone = build_backbone(ModelSpec("tiny:sd3"))
    for m in (backbone.transformer, backbone.vae, backbone.text_encoder, backbone.text_encoder_2):
        m.double()
    return backbone, build_reward(RewardSpec("tiny:clip")).double()


def join_and_register(out: Path) -> Path:
    """Join the process group (a no-op unlaunched) and record this rank's pid in OUT/pids/, which the kill fault
    reads; returns that folder."""
    torch.set_num_threads(1)
    distributed.init_from_env()
    pids = out / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{distributed.rank()}").write_text(str(os.getpid()))
    return pids


def kill_every_process(pids: Path) -> None:
    """SIGKILL torchrun's agent, every other rank registered in `pids` and this process, as when a machine is lost."""
    others = [int(p.read_text()) for p in pids.iterdir() if int(p.read_text()) != os.getpid()]
    for pid in [os.getppid(), *others, os.getpid()]:
        os.kill(pid, signal.SIGKILL)


def fault(out: Path, pids: Path):
    """The on_step hook that injects the fault the environment asks for (None: no fault)."""
    kill_at = int(os.environ.get("STITCHVM_KILL_AT_STEP", 0))
    fail_at = int(os.environ.get("STITCHVM_FAIL_AT_STEP", 0))

    def on_step(row: dict) -> None:
        if row["step"] == kill_at and distributed.rank() == 0:
            kill_every_process(pids)
        if row["step"] == fail_at and distributed.rank() == 1 and not (out / "failed").exists():
            (out / "failed").touch()
            raise RuntimeError(f"injected failure at step {fail_at}")

    return on_step


def main(out: Path, ckpt: Path) -> None:
    pids = join_and_register(out)
    backbone, reward = float64_models()
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(16, backbone.latent_channels, 16, 16, generator=gen, dtype=torch.float64)  # (N, C, h, w)
    prompts = [PROMPTS[k % 4] for k in range(16)]
    targets = teacher_targets(backbone, reward, z0, 8)
    model = StitchedValueModel(backbone, reward, 2, 1, residual_width=6, residual_kernel=3)
    fit_stitch(model, z0, entry_tokens(backbone, reward, z0, 1, 8, progress=False), FIT, (0.0, 1.0), seed=3,
               progress=False)  # a resumed run fits again: the same stitch, which stage 2's checkpoint then replaces
    history = train_value_model(model, z0, targets, CONFIG, seed=5, checkpoint_dir=ckpt, progress=False,
                                on_step=fault(out, pids), prompts=prompts)
    if distributed.is_main():
        save_file(model.trainable_state_dict(), str(out / "weights.safetensors"))
        (out / "history.json").write_text(json.dumps(history))
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
