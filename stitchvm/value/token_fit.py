"""Stage 1b: fit the stitch to the teacher's tokens entering reward block j, by gradient descent.

Stage 1 (search.py) fits F alone, linear, by least squares: the stitched patch tokens s(u_{≤i}(z_t)) against the
teacher's patch tokens entering block j of the clean image, r_{<j}(D(z0)) (minus the position embeddings, which the
model adds back). This fits F and G together on that same objective,

    L_fit = mean over patches of ||s(u_{≤i}(z_t, t)) - (r_{<j}(D(z0)) - pos)||² / D,   z_t = (1 - t) z0 + t ε,

with t drawn as stage 2 draws it. The tail r_{≥j}, the class token and the position embeddings stay as they are:
with a good fit the teacher's own tail reads the stitched tokens. Why: on the embedded world how well the stitch
reproduces these tokens is most of the value's quality (docs/results.md, "Where the student loses the teacher").

The teacher's tokens do not depend on t or ε, so they are computed once per clean latent (`entry_tokens`), held in
the reward's dtype on the CPU: N · P · D values (the world's 2304 training latents: 57 MB in float32; SD3.5 + CLIP
ViT-L at 1024², 256 patches × 1024: 0.5 MB per latent in bf16).

Data parallel under torchrun as stage 2 is: every rank draws the whole global batch from the seeded generator and
fits its slice; the averaged gradients make each step the global batch's, so every rank ends with the same stitch.
"""
from __future__ import annotations

import torch
from stitchvm.progress import tqdm

from stitchvm import distributed
from stitchvm.config import FitConfig
from stitchvm.diffusion.flow import forward_noise, logit_normal
from stitchvm.lr_schedule import warmup_cosine
from stitchvm.models.backbone import Backbone, upcast
from stitchvm.models.reward import ClipReward
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.search import patch_targets


@torch.no_grad()
def entry_tokens(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, j: int, batch_size: int,
                 progress: bool = True) -> torch.Tensor:
    """(N, C, H, W) clean latents -> (N, P, D) the teacher's patch tokens entering block j of D(z0), minus their
    position embeddings, in the reward's dtype on the CPU."""
    out = []
    for start in tqdm(range(0, len(z0), batch_size), desc="teacher tokens", disable=not progress):
        pixels = backbone.decode(z0[start:start + batch_size].to(backbone.device))
        patches, _ = patch_targets(reward, pixels, j, factor=1)  # (B·P, D), float32 at least
        out.append(patches.view(len(pixels), -1, patches.shape[-1]).to(reward.dtype).cpu())  # (B, P, D)
    return torch.cat(out)


def token_variance(targets: torch.Tensor) -> float:
    """Mean over channels of the tokens' variance (over latents and patches): L_fit of the best constant, so that
    L_fit / this is the fraction of the variance left unexplained (stage 1's normalised error)."""
    return upcast(targets).flatten(0, 1).var(0, unbiased=False).mean().item()


def fit_stitch(model: StitchedValueModel, z0: torch.Tensor, targets: torch.Tensor, cfg: FitConfig,
               sigma_logit: tuple[float, float], seed: int, prompts: list[str] | None = None,
               progress: bool = True) -> list[dict]:
    """Fit `model.stitch` (F and G) to `targets` (N, P, D) from `entry_tokens` of the clean latents `z0`
    (N, C, H, W) for `cfg.steps` Adam steps; `prompts` (one per latent) feeds a head on the prompt branch.
    Returns the history: {"step", "lr", "fit", "fit_error"} per step (fit_error: L_fit over `token_variance`)."""
    if len(z0) != len(targets):
        raise ValueError(f"{len(z0)} clean latents but {len(targets)} token targets")
    if model.context == "prompt" and (prompts is None or len(prompts) != len(z0)):
        raise ValueError(f"a value model on the prompt branch needs one prompt per clean latent: got "
                         f"{0 if prompts is None else len(prompts)} for {len(z0)}")
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"train.fit.batch_size {cfg.batch_size} does not split into {world} processes: make it a "
                         f"multiple of {world}")
    share = distributed.rank_slice(cfg.batch_size)
    stitch = model.stitch
    params = list(stitch.parameters())
    device = next(stitch.parameters()).device
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    grid = model.head.grid(z0.shape[-2:])
    scale = token_variance(targets)
    history = []
    stitch.train()
    for step in tqdm(range(cfg.steps), desc="token fit", disable=not progress):
        idx = torch.randint(len(z0), (cfg.batch_size,), generator=gen)
        t = logit_normal(cfg.batch_size, *sigma_logit, gen)
        noise = torch.randn((cfg.batch_size, *z0.shape[1:]), generator=gen)
        idx, t, noise = idx[share], t[share], noise[share]  # this rank's slice of the global batch
        z_t = forward_noise(z0[idx], t, noise).to(device)  # (B, C, H, W)
        with torch.no_grad():  # the frozen backbone head
            u = model.head(z_t, t.to(device), None if prompts is None else [prompts[k] for k in idx.tolist()])
        with model.autocast():
            s = stitch(u, grid)  # (B, P, D), float32
        loss = (s - upcast(targets[idx]).to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params)
        opt.step()
        sched.step()
        fit = distributed.average(loss.detach()).item()  # the global batch's
        history.append({"step": step + 1, "lr": opt.param_groups[0]["lr"], "fit": fit, "fit_error": fit / scale})
    stitch.eval()
    return history
