"""Stage 2: train the stitched model onto the frozen teacher (off-policy distillation, no rollouts).

L = ||ẽ_s - ẽ_t||² + λ_tok · mean_tokens ||h_s - h_t||² / D  [+ λ_sc · SmoothL1(head(ẽ_s), head(ẽ_t))]
    [+ λ_rank · L_rank]
with t drawn logit-normal and z_t = (1 - t) z0 + t ε; the teacher sees the clean image D(z0).

The value is used to rank samples of one prompt (guidance, FK's potentials, alignment advantages), and the
embedding regression spends its capacity on every direction of the embedding alike, while that ranking lives along
one (the prompt's text direction). With `group_size` G > 1 each batch is B / G groups of G latents of one prompt
sharing t and ε (only the clean latents differ, as in DiNa-LRM's and LPO's same-prompt pairs), and L_rank is a
listwise (ListNet) loss within each group: the KL divergence from softmax(r_teacher / τ) to softmax(r_student / τ),
r the reward of each embedding for the group's prompt.

Data parallel under torchrun (`stitchvm.distributed`): the global batch `batch_size` is drawn whole on every rank
from the seeded generator and split into equal slices of whole groups; the averaged gradients make each step the
global batch's step, whatever the number of processes.

The rows come through a `torch.utils.data.DataLoader`: `BatchDraws` draws each step's rows, t and ε from the seeded
generator in the main process, exactly as a loop over tensors in memory would, and the loader fetches the rows, from
tensors in memory (`TensorRows`) or from the shards on disk through a bounded cache (`ShardRows`,
stitchvm/data/shard_dataset.py), with `num_workers` workers fetching ahead. The batches, and so the trained weights,
are the same bit for bit whichever the source and the number of workers.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from stitchvm.progress import tqdm

from stitchvm import checkpoint_folder, distributed
from stitchvm.models.backbone import Backbone, upcast
from stitchvm.config import TrainConfig
from stitchvm.data.shard_dataset import TensorRows, as_is
from stitchvm.lr_schedule import warmup_cosine
from stitchvm.diffusion.flow import forward_noise, logit_normal
from stitchvm.models.reward import ClipReward
from stitchvm.value.model import StitchedValueModel


@dataclass
class TeacherTargets:
    embeds: torch.Tensor  # (N, E) l2-normalised teacher image embeddings
    tokens: torch.Tensor  # (N, 1+P, D) teacher outputs of r_{≥j} on the clean image
    scores: torch.Tensor | None  # (N,) head scores for a scalar reward, else None

    def __len__(self) -> int:
        return len(self.embeds)

    def subset(self, idx: torch.Tensor) -> "TeacherTargets":
        return TeacherTargets(self.embeds[idx], self.tokens[idx], None if self.scores is None else self.scores[idx])

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.embeds.to(device), self.tokens.to(device),
                              None if self.scores is None else self.scores.to(device))


@torch.no_grad()
def teacher_targets(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, batch_size: int) -> TeacherTargets:
    """The teacher on decoded clean latents; computed once, since it does not depend on t or ε."""
    embeds, tokens = [], []
    for start in range(0, len(z0), batch_size):
        e, h = reward.image_features(backbone.decode(z0[start:start + batch_size].to(backbone.device)))
        embeds.append(e.cpu())
        tokens.append(upcast(h).cpu())  # float32 targets from a bf16 teacher (the student's outputs are float32)
    embeds = torch.cat(embeds)
    scores = reward.head_scores(embeds.to(reward.image_mean.device))
    scores = None if scores is None else scores.cpu()
    return TeacherTargets(embeds, torch.cat(tokens), scores)


def distillation_loss(embeds: torch.Tensor, tokens: torch.Tensor, target: TeacherTargets, lambda_tok: float,
                      score_fn: Callable | None = None, lambda_score: float = 0.0) -> dict[str, torch.Tensor]:
    """The loss and its terms; `embeds` (B, E) normalised, `tokens` (B, 1+P, D)."""
    emb = (embeds - target.embeds).pow(2).sum(-1).mean()
    tok = (tokens - target.tokens).pow(2).mean()  # = mean over tokens of ||Δh||² / D
    parts = {"embed": emb, "tokens": tok}
    loss = emb + lambda_tok * tok
    if score_fn is not None and target.scores is not None:
        parts["score"] = F.smooth_l1_loss(score_fn(embeds), target.scores)
        loss = loss + lambda_score * parts["score"]
    parts["loss"] = loss
    return parts


def trivial_loss(target: TeacherTargets, lambda_tok: float, lambda_score: float = 0.0,
                 score_fn: Callable | None = None) -> float:
    """The floor to beat: predict the mean teacher embedding and mean tokens for every input."""
    n = len(target)
    emb = target.embeds.mean(0, keepdim=True).expand(n, -1)
    tok = target.tokens.mean(0, keepdim=True).expand(n, -1, -1)
    parts = distillation_loss(emb, tok, target, lambda_tok)
    loss = parts["loss"]
    if score_fn is not None and target.scores is not None:
        const = target.scores.median().expand(n)  # the Smooth-L1-optimal constant is near the median
        loss = loss + lambda_score * F.smooth_l1_loss(const, target.scores)
    return loss.item()


def rank_loss(student: torch.Tensor, teacher: torch.Tensor, group_size: int, temperature: float) -> torch.Tensor:
    """ListNet within groups: (B,) rewards in groups of `group_size` consecutive rows -> KL(teacher || student)."""
    s = student.view(-1, group_size) / temperature
    t = teacher.view(-1, group_size) / temperature
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")


def grouped_batch(group_of: torch.Tensor, members: list[torch.Tensor], batch_size: int, group_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(B,) latent indices: B / G groups of G latents of one prompt each (with replacement), prompts uniform."""
    anchors = torch.randint(len(group_of), (batch_size // group_size,), generator=generator)
    out = []
    for a in group_of[anchors].tolist():
        pool = members[a]
        out.append(pool[torch.randint(len(pool), (group_size,), generator=generator)])
    return torch.cat(out)


def batch_share(cfg: TrainConfig) -> slice:
    """This rank's rows of the global batch. The ranking loss lives within groups of `group_size` consecutive rows,
    so each rank must hold whole groups; then the mean of the ranks' losses is the global batch's loss."""
    world, g = distributed.world_size(), cfg.group_size
    if cfg.batch_size % (world * g):
        raise ValueError(f"train.batch_size {cfg.batch_size} does not split into {world} processes of whole "
                         f"groups of train.group_size {g}: make it a multiple of {world * g}")
    return distributed.rank_slice(cfg.batch_size)


class BatchDraws(Sampler):
    """Each step's draws from the run's generator, in the order the training has always made them: the global batch's
    rows (whole groups of one prompt when `group_size` > 1), then t, then ε; yields this rank's rows (the loader
    fetches them, possibly ahead, in its workers) and queues this rank's t, ε, the rows and the generator's state
    after the step's draws in `pending`, which the loop takes in the same order. The state, not the generator (which
    may have run ahead for prefetching), is what a checkpoint of that step saves."""

    def __init__(self, n: int, latent_shape: tuple[int, ...], cfg: TrainConfig, generator: torch.Generator,
                 start: int, share: slice, group_of: torch.Tensor | None = None,
                 members: list[torch.Tensor] | None = None):
        self.n, self.latent_shape, self.cfg, self.gen, self.start, self.share = n, latent_shape, cfg, generator, \
            start, share
        self.group_of, self.members = group_of, members
        self.pending: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = deque()

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) rows, (B,) t, (B, C, H, W) ε of one global batch."""
        cfg, gen, g = self.cfg, self.gen, self.cfg.group_size
        if g > 1:
            idx = grouped_batch(self.group_of, self.members, cfg.batch_size, g, gen)
            t = logit_normal(cfg.batch_size // g, cfg.sigma_logit_mean, cfg.sigma_logit_std, gen).repeat_interleave(g)
            noise = torch.randn((cfg.batch_size // g, *self.latent_shape), generator=gen).repeat_interleave(g, 0)
        else:
            idx = torch.randint(self.n, (cfg.batch_size,), generator=gen)
            t = logit_normal(cfg.batch_size, cfg.sigma_logit_mean, cfg.sigma_logit_std, gen)
            noise = torch.randn((cfg.batch_size, *self.latent_shape), generator=gen)
        return idx, t, noise

    def __iter__(self):
        for _ in range(len(self)):
            idx, t, noise = self.draw()
            # every rank draws the whole global batch from the same generator and keeps its slice: the run does not
            # depend on the number of processes, and the generator's state is the same everywhere (one checkpoint)
            idx, t, noise = idx[self.share], t[self.share], noise[self.share]  # (B / W,), (B / W,), (B / W, C, H, W)
            self.pending.append((idx, t, noise, self.gen.get_state()))
            yield idx.tolist()


def row_loader(data: Dataset, draws: BatchDraws, num_workers: int) -> DataLoader:
    """Batches of rows in `draws`' order; the loader gets its own generator, so creating it leaves torch's global RNG
    (which a run's other draws may read) as it was."""
    return DataLoader(data, batch_sampler=draws, num_workers=num_workers, collate_fn=as_is,
                      generator=torch.Generator(), prefetch_factor=2 if num_workers else None)


def generator_at(state: torch.Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def build_optimizer(model: StitchedValueModel, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, object]:
    """AdamW with the stitching layer at `stitch_lr_mult` × lr; linear warm-up, then cosine decay to 10%."""
    stitch = list(model.stitch.parameters())
    stitch_ids = {id(p) for p in stitch}
    rest = [p for p in model.trainable_parameters() if id(p) not in stitch_ids]
    opt = torch.optim.AdamW(
        [{"params": stitch, "lr": cfg.lr * cfg.stitch_lr_mult}, {"params": rest, "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    factor = warmup_cosine(cfg.steps, cfg.warmup_steps, floor=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Checkpointer:
    """`dir/last/`: trainable weights, optimiser, scheduler, RNG and step. Rank 0 writes it (every rank holds the same
    state after an averaged step); every rank reads it, so under several machines `dir` must be on a shared disk."""

    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else None

    def save(self, step: int, model, opt, sched, generator: torch.Generator) -> None:
        if self.dir is None or not distributed.is_main():
            return
        tmp = checkpoint_folder.fresh_tmp(self.dir)
        save_file(model.trainable_state_dict(), str(tmp / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": generator.get_state()}, tmp / "state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))  # the marker, last
        checkpoint_folder.swap_in(self.dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        return checkpoint_folder.latest(self.dir, "step.json")

    def restore(self, model, opt, sched, generator: torch.Generator) -> int:
        """Load the last checkpoint if there is one; returns the step to continue from (0 if none)."""
        last = self.latest()
        step = 0 if last is None else json.loads((last / "step.json").read_text())["step"]
        main_step = distributed.broadcast_int(step)
        if step != main_step:
            raise ValueError(f"rank {distributed.rank()} finds checkpoint step {step} in {self.dir}, rank 0 step "
                             f"{main_step}: put the checkpoint folder on a disk every machine shares")
        if last is None:
            return 0
        model.load_state_dict(load_file(str(last / "model.safetensors")), strict=False)
        state = torch.load(last / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        return step


def train_value_model(model: StitchedValueModel, z0: torch.Tensor | Dataset, targets: TeacherTargets | None,
                      cfg: TrainConfig, seed: int, checkpoint_dir: str | Path | None = None, progress: bool = True,
                      on_step: Callable[[dict], None] | None = None, prompts: list[str] | None = None,
                      num_workers: int = 0) -> list[dict]:
    """Train `model` for `cfg.steps` steps (resuming from `checkpoint_dir/last` if present); returns the history.
    The data: `z0` (N, C, H, W) clean latents and their `targets` in memory, or `z0` a row dataset and `targets`
    None (e.g. `ShardRows` of `samples` and `labels`: rows {"latents", "embeds", "tokens"[, "score"]}, read from the
    shards as batches need them, by `num_workers` loader workers); both give the same run.
    `prompts` (one per clean latent) feeds a head on the prompt branch (`model.context == "prompt"`).
    Under torchrun each process computes its share of the global batch and the gradients are averaged, so every
    rank holds the same model and history, equal to one process's (up to rounding); rank 0 writes the checkpoints."""
    if targets is not None and len(z0) != len(targets):
        raise ValueError(f"{len(z0)} clean latents but {len(targets)} teacher targets")
    data = z0 if targets is None else TensorRows({"latents": z0, "embeds": targets.embeds, "tokens": targets.tokens,
                                                  **({} if targets.scores is None else {"score": targets.scores})})
    n = len(data)
    if model.context == "prompt" and (prompts is None or len(prompts) != n):
        raise ValueError(f"a value model on the prompt branch needs one prompt per clean latent: got "
                         f"{0 if prompts is None else len(prompts)} for {n}")
    distributed.init_from_env()  # under torchrun: join the process group (a no-op when already joined or unlaunched)
    share = batch_share(cfg)
    device = next(model.stitch.parameters()).device
    model.train()
    opt, sched = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    ckpt = Checkpointer(checkpoint_dir)
    start = ckpt.restore(model, opt, sched, gen)
    score_fn = model.reward.head_scores if model.reward.head is not None else None
    params = model.trainable_parameters()
    g = cfg.group_size
    group_of = members = None
    if g > 1:
        if prompts is None or len(prompts) != n:
            raise ValueError(f"train.group_size {g} groups latents by prompt: pass one prompt per clean latent")
        position = {p: k for k, p in enumerate(dict.fromkeys(prompts))}
        group_of = torch.tensor([position[p] for p in prompts])
        members = [torch.nonzero(group_of == k).squeeze(1) for k in range(len(position))]
    draws = BatchDraws(n, data.row_shape("latents"), cfg, gen, start, share, group_of, members)
    batches = iter(row_loader(data, draws, num_workers))
    history = []
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress or not distributed.is_main(), initial=start,
               total=cfg.steps)
    for step in bar:
        rows = next(batches)  # {"latents": (B / W, C, H, W), "embeds", "tokens"[, "score"]}
        idx, t, noise, drawn = draws.pending.popleft()
        z_t = forward_noise(rows["latents"], t, noise).to(device)
        batch_prompts = None if prompts is None else [prompts[k] for k in idx.tolist()]
        embeds, tokens = model.embed(z_t, t.to(device), batch_prompts)
        target = TeacherTargets(rows["embeds"], rows["tokens"], rows.get("score")).to(device)
        parts = distillation_loss(embeds, tokens, target, cfg.lambda_tok, score_fn, cfg.lambda_score)
        if g > 1 and cfg.lambda_rank > 0:
            reward = model.reward
            text = reward.prompt_embeds(batch_prompts)
            text = None if text is None else text.to(embeds)
            parts["rank"] = rank_loss(reward.score(embeds, text), reward.score(target.embeds, text), g,
                                      cfg.rank_temperature)
            parts["loss"] = parts["loss"] + cfg.lambda_rank * parts["rank"]
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        distributed.average_gradients(params)  # clipped after the average: the global batch's norm, on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        logged = distributed.average(torch.stack([v.detach() for v in parts.values()]))  # the global batch's terms
        row = {"step": step + 1, "lr": opt.param_groups[1]["lr"], "grad_norm": grad_norm.item(),
               **{k: v.item() for k, v in zip(parts, logged)}}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            ckpt.save(step + 1, model, opt, sched, generator_at(drawn))
        if on_step is not None:
            on_step(row)
    del batches  # stops the loader's workers
    model.eval()
    return history
