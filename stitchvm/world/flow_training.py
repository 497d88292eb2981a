"""Pretraining the world's diffusion backbone: a small `SD3Transformer2DModel` trained by rectified flow.

The result is a `stitchvm.models.backbone.Backbone` with exactly the SD3 components: the transformer, the world VAE
(frozen), `FlowMatchEulerDiscreteScheduler`, and as `text_encoder` *and* `text_encoder_2` the world CLIP's text tower
(`CLIPTextModelWithProjection` loaded from the CLIP folder, frozen) with the world tokenizer. `save_backbone` writes
the SD3 folder layout, so `build_backbone(ModelSpec(source=folder))` and `StableDiffusion3Pipeline.from_pretrained`
load it like a real SD3 checkpoint.

Training follows the backbone's convention (`Backbone.velocity`, `stitchvm.diffusion.sampling`): `z_t = (1 - t) z0 + t ε`,
target `ε - z0`, the transformer fed `1000 · t`, t logit-normal; the conditioning is `Backbone.encode_prompts` of
partial captions (`scenes.sample_specs`, so short prompts such as "a red circle" are in distribution), replaced by
the empty prompt with probability `caption_dropout` (classifier-free guidance needs the unconditional model).

Why the context is collapsed while training: without T5 the SD3 pipeline appends 256 all-zero "T5" tokens to the
CLIP tokens. They enter every block as the same vector, so they stay identical, and attending to 256 identical keys
equals attending to one of them with its logit raised by log 256. Training therefore feeds the CLIP tokens plus one
zero token and adds log 256 to that key's attention logit (`collapsed_attention`); this is the same function up to
float rounding (a test checks it) at a fraction of the cost. For the same reason the world tokenizer pads to
`MAX_PROMPT_TOKENS` rather than 77 (the caption grammar needs at most 19 tokens).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from stitchvm.progress import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from stitchvm.models.backbone import Backbone, quiet_transformers
from stitchvm.config import ModelSpec
from stitchvm.world import scenes
from stitchvm.lr_schedule import warmup_cosine
from stitchvm.models.collapsed_attention import collapsed_attention

HELD_OUT_SEED = 2_000_029  # held-out scenes, noise and times for the evaluation loss
MAX_PROMPT_TOKENS = 24  # the backbone tokenizer's model_max_length (CLIP token states per prompt)
SCHEDULER_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler shift at sampling (8×8 latents need little shift)
SOURCE = "world:backbone"  # the spec source of a backbone built here (before it is saved and loaded by path)

# 8×8 latents in 2×2 patches: 16 image tokens (patch 1 costs 2.3× per training step on CPU; patch 2 reaches
# recognisable samples within the ~10 min budget)
WORLD_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
    num_attention_heads=4, pos_embed_max_size=4, qk_norm="rms_norm",
)


def world_transformer_config(text_hidden: int, text_proj: int, **overrides) -> dict:
    """`SD3Transformer2DModel` keyword arguments for two text encoders of width `text_hidden` and projection
    `text_proj`: the CLIP token states of both (2 · text_hidden) fill `joint_attention_dim`, the two pooled
    projections `pooled_projection_dim`; the context stream is as wide as the image stream (heads · head dim)."""
    cfg = dict(WORLD_TRANSFORMER, **overrides)
    cfg.setdefault("joint_attention_dim", 2 * text_hidden)
    cfg.setdefault("pooled_projection_dim", 2 * text_proj)
    cfg.setdefault("caption_projection_dim", cfg["num_attention_heads"] * cfg["attention_head_dim"])
    if cfg["joint_attention_dim"] < 2 * text_hidden or cfg["pooled_projection_dim"] != 2 * text_proj:
        raise ValueError(f"joint_attention_dim must be >= {2 * text_hidden} and pooled_projection_dim == "
                         f"{2 * text_proj} for two text encoders of width {text_hidden} / projection {text_proj}")
    return cfg


# ---- the collapsed context (stitchvm/world/attention.py) ------------------------------------------------------
def collapse_context(embeds: torch.Tensor, n_clip: int) -> tuple[torch.Tensor, int]:
    """(B, n_clip + M, D) SD3 token states whose last M rows are zero -> (B, n_clip + 1, D) and M."""
    tail = embeds[:, n_clip:]
    if tail.shape[1] < 1 or tail.abs().amax() != 0:
        raise ValueError("expected the SD3 conditioning to end in all-zero (absent T5) token states")
    return embeds[:, :n_clip + 1], tail.shape[1]


class _PromptCache:
    """Collapsed conditioning per prompt string (the text towers are frozen): (L, D) token states, (P,) pooled."""

    def __init__(self, backbone: Backbone):
        self.backbone, self.cache, self.multiplicity = backbone, {}, None

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            embeds, pooled = self.backbone.encode_prompts(missing)
            embeds, self.multiplicity = collapse_context(embeds, self.backbone.tokenizer.model_max_length)
            self.cache.update({p: (e, q) for p, e, q in zip(missing, embeds, pooled)})
        rows = [self.cache[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ---- the backbone ----------------------------------------------------------------------------------------------
def world_backbone(clip_dir: str | Path, vae: AutoencoderKL, config: dict | None = None, seed: int = 0,
                   shift: float = SCHEDULER_SHIFT, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Backbone:
    """An untrained world backbone: new transformer (seeded), the given VAE, the CLIP text tower twice (frozen)."""
    with quiet_transformers():  # loading the text tower of a CLIPModel folder reports the vision weights it skips
        text_encoders = [CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32) for _ in range(2)]
    tokenizers = [CLIPTokenizer.from_pretrained(clip_dir, model_max_length=max_prompt_tokens) for _ in range(2)]
    text_cfg = text_encoders[0].config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            **(config or world_transformer_config(text_cfg.hidden_size, text_cfg.projection_dim)))
    for m in (*text_encoders, vae):
        m.eval().requires_grad_(False)
    return Backbone(spec=ModelSpec(source=SOURCE), transformer=transformer, vae=vae,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder=text_encoders[0],
                    tokenizer=tokenizers[0], text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1])


def flow_batch(backbone: Backbone, prompts: _PromptCache, batch_size: int, generator: torch.Generator,
               caption_dropout: float):
    """One training batch: (z_t, t, token states, pooled, target velocity), all drawn from `generator`."""
    pixels, _, scene = scenes.make_scenes(batch_size, generator)
    specs = scenes.sample_specs(scene, generator)
    drop = torch.rand(batch_size, generator=generator) < caption_dropout
    captions = ["" if d else c for c, d in zip(scenes.captions_for(specs), drop.tolist())]
    z0 = backbone.encode(pixels)  # (B, 4, 8, 8)
    t = torch.sigmoid(torch.randn(batch_size, generator=generator))  # (B,) logit-normal
    eps = torch.randn(z0.shape, generator=generator)
    tt = t[:, None, None, None]
    embeds, pooled = prompts(captions)
    return (1 - tt) * z0 + tt * eps, t, embeds, pooled, eps - z0


def train_flow(clip_dir: str | Path, vae: AutoencoderKL, n_steps: int, batch_size: int, generator: torch.Generator,
               progress: bool = True, *, lr: float = 1e-3, caption_dropout: float = 0.1, weight_decay: float = 0.0,
               warmup: int | None = None, config: dict | None = None, shift: float = SCHEDULER_SHIFT,
               eval_every: int = 0, n_eval: int = 256, seed: int = 0,
               on_step: Callable[[dict], None] | None = None) -> tuple[Backbone, list[dict]]:
    """Train the world backbone's transformer by rectified flow (see the module docstring) for `n_steps` fresh
    batches of `batch_size` scenes from `generator`; the VAE and the text towers stay frozen.

    AdamW, linear warm-up (default 5% of the steps) then cosine decay to 5% of `lr`, gradient norm clipped at 1;
    `seed` seeds the transformer's initial weights. History: per-step dicts (step, loss, lr, seconds), with
    `eval_loss` (the flow loss on `n_eval` held-out scenes, noises and times, all captions kept) every `eval_every`
    steps and at the end; `on_step(entry)` is called with each. Returns `(backbone, history)`, everything frozen.
    """
    backbone = world_backbone(clip_dir, vae, config, seed, shift)
    transformer = backbone.transformer.train()
    prompts = _PromptCache(backbone)
    prompts([""])  # sets the multiplicity of the collapsed zero token
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    warmup = max(1, round(0.05 * n_steps)) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(n_steps, warmup))
    held_out = (flow_batch(backbone, prompts, n_eval, torch.Generator().manual_seed(HELD_OUT_SEED), 0.0)
                if eval_every else None)
    history, shown, start = [], {}, time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc="world flow", unit="step")
    with collapsed_attention(transformer, prompts.multiplicity):
        for step in bar:
            z_t, t, embeds, pooled, target = flow_batch(backbone, prompts, batch_size, generator, caption_dropout)
            loss = (backbone.velocity(z_t, t, embeds, pooled) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            opt.step()
            sched.step()
            entry = dict(step=step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                         seconds=time.perf_counter() - start)
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
                entry["eval_loss"] = flow_loss(backbone, held_out)
            history.append(entry)
            if on_step is not None:
                on_step(entry)
            shown = {"eval": entry["eval_loss"]} if "eval_loss" in entry else shown
            bar.set_postfix(loss=f"{entry['loss']:.4f}", **{k: f"{v:.4f}" for k, v in shown.items()})
    transformer.eval().requires_grad_(False)
    return backbone, history


@torch.no_grad()
def flow_loss(backbone: Backbone, batch, chunk: int = 128) -> float:
    """Mean squared velocity error on a fixed batch (z_t, t, token states, pooled, target), in eval mode."""
    was_training = backbone.transformer.training
    backbone.transformer.eval()
    total, n = 0.0, batch[0].shape[0]
    for k in range(0, n, chunk):
        z_t, t, embeds, pooled, target = (x[k:k + chunk] for x in batch)
        total += (backbone.velocity(z_t, t, embeds, pooled) - target).pow(2).sum().item()
    backbone.transformer.train(was_training)
    return total / batch[0].numel()


def save_backbone(backbone: Backbone, path: str | Path, dtype: torch.dtype = torch.float16) -> int:
    """Write the SD3 folder layout (model_index.json, transformer/, vae/, scheduler/, text_encoder[_2]/,
    tokenizer[_2]/; no T5) with the weights in `dtype`; returns the safetensors bytes.

    Copies are cast, so the backbone in memory keeps its weights.
    """
    path = Path(path)
    cast = {name: copy.deepcopy(getattr(backbone, name)).to(dtype)
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    pipeline = StableDiffusion3Pipeline(scheduler=backbone.scheduler, tokenizer=backbone.tokenizer,
                                        tokenizer_2=backbone.tokenizer_2, text_encoder_3=None, tokenizer_3=None,
                                        **cast)
    pipeline.save_pretrained(path, safe_serialization=True)
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))
