"""The world's "aesthetic" score: a LAION-layout MLP head on the world CLIP's image embedding.

The score is a learned predictor of a simple, visible image property, `image_property`: the *salience* of the shapes,
the mean colour distance of the pixels to the background colour (the median of the border pixels). It grows with the
shapes' area (count, size) and their colour contrast with the background, so it varies a lot within a prompt ("a red
circle" can be small on a bright background or large on a dark one; about two thirds of its variance is within
colour + shape), and guidance can plausibly raise it (bigger, more contrasting shapes).

The head is `stitchvm.models.reward.AestheticHead(projection_dim)` with LAION's default widths and is fed exactly what
`ClipReward.score` feeds it (the l2-normalised image embedding of `ClipReward.image_features`), so
`build_reward(RewardSpec(source=clip_dir, kind="aesthetic", head=path))` loads the saved head unchanged. It is trained
to predict the property standardised by its mean and std on a fixed batch of scenes (`STATS_SEED`), so the score is in
units of standard deviations.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from stitchvm.progress import tqdm

from stitchvm.config import RewardSpec
from stitchvm.value.ranking import spearman
from stitchvm.models.reward import AestheticHead, ClipReward, build_reward
from stitchvm.world import scenes
from stitchvm.lr_schedule import warmup_cosine

HELD_OUT_SEED = 2_000_039  # held-out scenes for Spearman / R²
STATS_SEED = 2_000_041  # the fixed batch that standardises the property
N_STATS = 2048


def image_property(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B,) salience: mean over pixels of ‖x - background‖₂ in [0, 1] RGB units,
    the background being the per-channel median of the border pixels."""
    x = (pixels.float() + 1) / 2
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (B, 3, P)
    background = border.median(dim=-1).values  # (B, 3)
    return (x - background[..., None, None]).norm(dim=1).mean(dim=(1, 2))


def property_statistics(n: int = N_STATS, seed: int = STATS_SEED) -> tuple[float, float]:
    """Mean and std of `image_property` on `n` fixed scenes (the standardisation of the head's target)."""
    values = image_property(scenes.make_scenes(n, torch.Generator().manual_seed(seed))[0])
    return values.mean().item(), values.std().item()


@torch.no_grad()
def clip_embeddings(reward: ClipReward, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(B, E) normalised image embeddings, exactly those `ClipReward.score` gives the head."""
    return torch.cat([reward.image_features(pixels[k:k + batch_size])[0] for k in range(0, len(pixels), batch_size)])


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST (the fraction of the target's variance the prediction explains)."""
    return 1.0 - ((prediction - target).pow(2).sum() / (target - target.mean()).pow(2).sum()).item()


def train_aesthetic(clip_dir: str | Path, n_steps: int, batch_size: int, generator: torch.Generator,
                    progress: bool = True, *, lr: float = 1e-3, weight_decay: float = 0.0, warmup: int | None = None,
                    eval_every: int = 0, n_eval: int = 1000, seed: int = 0,
                    on_step: Callable[[dict], None] | None = None) -> tuple[AestheticHead, list[dict]]:
    """Train the head on the frozen CLIP at `clip_dir` to predict the standardised `image_property`, on `n_steps`
    fresh batches of `batch_size` scenes from `generator` (MSE; AdamW, warm-up + cosine; `seed` seeds the head).

    History: per-step dicts (step, loss, lr, seconds), with held-out `spearman`, `r2` and `baseline_mse` (1.0 for the
    constant predictor, up to the sampling error of the standardisation) every `eval_every` steps and at the end;
    `on_step(entry)` is called with each. Returns `(head, history)` with the head in eval mode.
    """
    reward = build_reward(RewardSpec(source=str(clip_dir), kind="clip"))
    mean, std = property_statistics()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(reward.clip.config.projection_dim)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(0.05 * n_steps)) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, warmup))
    if eval_every:
        pixels = scenes.make_scenes(n_eval, torch.Generator().manual_seed(HELD_OUT_SEED))[0]
        held_out = clip_embeddings(reward, pixels), (image_property(pixels) - mean) / std
    history, shown, start = [], {}, time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc="world aesthetic", unit="step")
    for step in bar:
        pixels = scenes.make_scenes(batch_size, generator)[0]  # (B, 3, 32, 32)
        target = (image_property(pixels) - mean) / std  # (B,)
        loss = (head(clip_embeddings(reward, pixels)) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        entry = dict(step=step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                     seconds=time.perf_counter() - start)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
            entry.update(evaluate_head(head, *held_out))
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        shown = {"rho": entry["spearman"]} if "spearman" in entry else shown
        bar.set_postfix(loss=f"{entry['loss']:.3f}", **{k: f"{v:.3f}" for k, v in shown.items()})
    head.eval().requires_grad_(False)
    return head, history


@torch.no_grad()
def evaluate_head(head: AestheticHead, embeds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Held-out Spearman, R² and the constant predictor's MSE for standardised targets."""
    was_training = head.training
    head.eval()
    pred = head(embeds)
    head.train(was_training)
    return dict(spearman=spearman(pred, target), r2=r_squared(pred, target), baseline_mse=target.pow(2).mean().item())


def save_head(head: AestheticHead, path: str | Path) -> int:
    """The head's state dict as float32 safetensors (the layout `stitchvm.models.reward._build_head` loads); returns bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path.stat().st_size
