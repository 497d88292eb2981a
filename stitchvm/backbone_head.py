"""u_{≤i}: the frozen backbone run through patch embedding, timestep embedding and its first i blocks.

The conditioning is the empty prompt (the null branch of classifier-free guidance); its context tokens go through
`context_embedder` once, here, and are cached. Blocks after i are never run.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone


class BackboneHead(nn.Module):
    def __init__(self, backbone: Backbone, depth: int):
        super().__init__()
        if not 1 <= depth <= backbone.depth:
            raise ValueError(f"backbone block i={depth} is out of range: the backbone {backbone.spec.source!r} has "
                             f"{backbone.depth} blocks (valid i: 1..{backbone.depth})")
        tr = backbone.transformer
        self.patch_size = tr.config.patch_size
        self.pos_embed, self.time_text_embed = tr.pos_embed, tr.time_text_embed
        self.blocks = nn.ModuleList(tr.transformer_blocks[:depth])
        embeds, pooled = backbone.encode_prompts([""])
        with torch.no_grad():
            self.register_buffer("null_context", tr.context_embedder(embeds), persistent=False)  # (1, L, D)
        self.register_buffer("null_pooled", pooled, persistent=False)  # (1, P)
        self.requires_grad_(False)

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, all_blocks: bool = False):
        """(B, C, H, W), (B,) -> (B, N, D) image tokens after block i (or the list after every block 1..i)."""
        b = z_t.shape[0]
        h = self.pos_embed(z_t).contiguous()  # (B, N, D)
        temb = self.time_text_embed(t * 1000, self.null_pooled.expand(b, -1))  # (B, D)
        ctx = self.null_context.expand(b, -1, -1)  # (B, L, D)
        outs = []
        for block in self.blocks:
            ctx, h = block(h, ctx, temb)
            outs.append(h)
        return outs if all_blocks else h
