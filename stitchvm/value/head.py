"""u_{≤i}: the frozen backbone run through patch embedding, timestep embedding and its first i blocks.

`context` picks the classifier-free-guidance branch the head reads:
- "empty" (METHOD.md's ∅, the unconditional branch): its context tokens go through `context_embedder` once, here,
  and are cached.
- "prompt": the latent's own prompt (the conditional branch). The value E[r | z_t, c] depends on c through the
  generator's posterior, which the unconditional branch cannot see; at high σ, where z_t says little, this is most
  of it.
Blocks after i are never run. The blocks are the backbone's in execution order (FLUX: its double-stream blocks, then
the single-stream ones), run through the family adapter of stitchvm/models/backbone.py. A guidance-distilled backbone
(FLUX.1-dev) has no unconditional branch: its head reads the branch at an embedded guidance scale (`guidance`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from stitchvm.models.backbone import Backbone

CONTEXTS = ("empty", "prompt")
Embeds = tuple[torch.Tensor, torch.Tensor]  # (B, L, joint_dim) prompt token states, (B, pooled_dim) pooled


class Stream(NamedTuple):
    """The transformer's state after a block: what the next block reads."""
    h: torch.Tensor  # (B, N, D) image tokens
    ctx: torch.Tensor | None  # (B, L, D) context tokens (None after SD3's last, context_pre_only, block)
    temb: torch.Tensor  # (B, D) time (+ guidance) + pooled text conditioning
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # FLUX's RoPE (cos, sin) over text + image ids; None for SD3


def check_context(context: str) -> str:
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} is not one of {CONTEXTS}")
    return context


class BackboneHead(nn.Module):
    def __init__(self, backbone: Backbone, depth: int, context: str = "empty"):
        super().__init__()
        if not 1 <= depth <= backbone.depth:
            raise ValueError(f"backbone block i={depth} is out of range: the backbone {backbone.spec.source!r} has "
                             f"{backbone.depth} blocks (valid i: 1..{backbone.depth})")
        self.context = check_context(context)
        self.family = backbone.family  # the family's adapter (stitchvm/models/backbone.py): how blocks are called
        self.patch_size = backbone.patch_size
        # the latents this head reads (the pyfunc signature's checks, stitchvm/stages/tracking.py)
        self.latent_channels = backbone.latent_channels
        self.native_latent_hw = (backbone.image_size // backbone.vae_scale,) * 2
        self.max_latent_side = self.family.max_latent_side  # SD3: its position table; FLUX (RoPE): None, any size
        for name, module in self.family.embedders().items():  # pos_embed, time_text_embed, … (FLUX: x_embedder)
            self.add_module(name, module)
        self.blocks = nn.ModuleList(backbone.blocks[:depth])
        self._encode_prompts = backbone.encode_prompts
        self._prompt_cache: dict[str, Embeds] = {}
        embeds, pooled = backbone.encode_prompts([""])
        with torch.no_grad():
            self.register_buffer("null_context", self.family.embed_context(embeds), persistent=False)  # (1, L, D)
        self.register_buffer("null_pooled", pooled, persistent=False)  # (1, P)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen backbone's dtype (backbone.dtype): latents are cast to it on the way in."""
        return self.context_embedder.weight.dtype

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Embeds:
        """The prompts' conditioning (B, L, ·), (B, P); each prompt is encoded once and cached (frozen encoders)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            embeds, pooled = self._encode_prompts(missing)
            self._prompt_cache.update({p: (embeds[k:k + 1], pooled[k:k + 1]) for k, p in enumerate(missing)})
        embeds, pooled = zip(*(self._prompt_cache[p] for p in prompts))
        return torch.cat(embeds), torch.cat(pooled)

    def conditioning(self, b: int, prompts: list[str] | None = None, cond: Embeds | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) context tokens after `context_embedder` and (B, P) pooled embedding of the branch the head reads.
        A prompt head takes `prompts` (encoded and cached here) or their embeddings `cond` (a sampler's own)."""
        if self.context == "empty":
            return self.null_context.expand(b, -1, -1), self.null_pooled.expand(b, -1)
        if cond is None:
            if prompts is None or len(prompts) != b:
                raise ValueError(f"a head on the prompt branch needs one prompt per latent: got "
                                 f"{0 if prompts is None else len(prompts)} prompts for {b} latents")
            cond = self.encode(list(prompts))
        embeds, pooled = cond
        if embeds.shape[0] != b or pooled.shape[0] != b:
            raise ValueError(f"prompt embeddings for {embeds.shape[0]} latents, got {b} latents")
        return self.family.embed_context(embeds), pooled

    def run(self, z_t: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, pooled: torch.Tensor,
            guidance: float | None = None, each_block=None) -> Stream:
        """Embeddings and the head's blocks on the branch (ctx, pooled), under the caller's grad mode: the stream after
        block i, which the backbone's remaining blocks continue (guidance shares it). `guidance`: the embedded scale
        of a guidance-distilled backbone (None: its default). `each_block(h)` sees the image tokens after each block."""
        fam = self.family
        h = fam.embed_image(z_t.to(self.dtype))  # (B, N, D); float32 z_t into a bf16/fp16 backbone
        temb = fam.embed_time(t, pooled, guidance, h.dtype)  # (B, D)
        rotary = fam.rotary(tuple(z_t.shape[-2:]), ctx.shape[1], z_t.device)  # FLUX's RoPE; None for SD3
        for block in self.blocks:
            ctx, h = fam.run_block(block, h, ctx, temb, rotary)
            if each_block is not None:
                each_block(h)
        return Stream(h, ctx, temb, rotary)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None, all_blocks: bool = False,
                cond: Embeds | None = None, guidance: float | None = None):
        """(B, C, H, W), (B,) -> (B, N, D) image tokens after block i (or the list after every block 1..i)."""
        ctx, pooled = self.conditioning(z_t.shape[0], prompts, cond)  # (B, L, D), (B, P)
        outs = []
        stream = self.run(z_t, t, ctx, pooled, guidance, outs.append)
        return outs if all_blocks else stream.h
